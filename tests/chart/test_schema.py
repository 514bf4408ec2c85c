"""values.schema.json: Helm rejects bad values with a message naming the value."""

from __future__ import annotations

import json

import pytest

import helm_python as helm
from conftest import CHART, MINIMAL, deep_merge, render

BAD = [
    ({"replicaCount": "two"}, "/replicaCount", "want integer"),
    ({"replicaCount": -1}, "/replicaCount", "minimum"),
    ({"logging": {"format": "xml"}}, "/logging/format", "json"),
    ({"leaderElection": {"leaseDuration": "15 seconds"}}, "/leaderElection/leaseDuration", "pattern"),
    ({"sessions": {"touchWindow": "5min"}}, "/sessions/touchWindow", "pattern"),
    ({"watchNamespaces": ["Apps"]}, "/watchNamespaces/0", "pattern"),
    ({"watchNamespaces": "apps"}, "/watchNamespaces", "want array"),
    ({"database": {"url": "mysql://db/x"}}, "/database/url", "pattern"),
    ({"database": {"tls": {"sslMode": "on"}}}, "/database/tls/sslMode", "verify-full"),
    ({"redis": {"url": "http://redis:6379"}}, "/redis/url", "pattern"),
    ({"metrics": {"port": 70000}}, "/metrics/port", "maximum"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "IfNotPresent"),
    ({"image": {"digest": "latest"}}, "/image/digest", "pattern"),
    ({"crds": {"enabled": "yes"}}, "/crds/enabled", "want boolean"),
    ({"replicaCount": 3, "leaderElection": {"enabled": False}}, "/leaderElection/enabled", "true"),
    ({"databse": {"url": "postgres://x"}}, "additional properties 'databse'", ""),
    ({"metrics": {"serviceMonitor": {"enable": True}}}, "additional properties 'enable'", ""),
    ({"podDisruptionBudget": {"maxUnavailable": "half"}}, "/podDisruptionBudget/maxUnavailable", ""),
]


@pytest.mark.parametrize("override,where,what", BAD, ids=[b[1] for b in BAD])
def test_bad_values_are_rejected_with_a_message(chart, override, where, what) -> None:
    values = deep_merge(MINIMAL, override)
    with pytest.raises(helm.HelmValuesError) as exc:
        chart.validate_schema(chart.merge_values(values))
    assert where in str(exc.value) and what in str(exc.value), str(exc.value)
    # Rendering (what install/upgrade do) applies the same schema.
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_defaults_and_ci_values_satisfy_the_schema(chart) -> None:
    chart.validate_schema(chart.merge_values({}))
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        import yaml

        chart.validate_schema(chart.merge_values(yaml.safe_load(path.read_text())))


def test_schema_covers_every_top_level_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    import yaml

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])
