"""Every value is documented, and the README's values table is the one values.yaml yields."""

from __future__ import annotations

import values_doc


def test_every_value_has_a_description() -> None:
    assert values_doc.undocumented() == []


def test_readme_values_table_is_current() -> None:
    assert values_doc.README.read_text() == values_doc.rendered_readme(), (
        "charts/session-operator/README.md is stale: run "
        ".venv-chart/bin/python tests/chart/values_doc.py"
    )


def test_table_lists_the_install_essentials() -> None:
    keys = {key for key, _, _ in values_doc.documented()}
    for key in (
        "database.existingSecret",
        "watchNamespaces",
        "leaderElection.leaseName",
        "database.schema",
        "redis.prefix",
        "sessions.touchWindow",
        "logging.format",
        "extraEnv",
        "nodeSelector",
        "tolerations",
        "affinity",
        "priorityClassName",
        "imagePullSecrets",
        "podAnnotations",
        "crds.enabled",
        "crds.keep",
    ):
        assert key in keys
