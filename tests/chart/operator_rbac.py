"""Writes the operator's RBAC exactly as the chart renders it, for the end-to-end tests on the
real control plane (tests/e2e/backend.rs applies it and runs the operator with a token of its
ServiceAccount, so a verb the chart lacks fails those tests).

    python tests/chart/operator_rbac.py OUT.json [cluster-wide|namespaced]

OUT.json: {"objects": [ServiceAccount, (Cluster)Roles, (Cluster)RoleBindings],
           "serviceAccount": {"namespace", "name"}, "lease": {"namespace", "name"}}."""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from conftest import MINIMAL, NAMESPACE, deep_merge, env_of, of_kind, operator_container, render, strip_meta  # noqa: E402

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# The e2e scenarios watch these namespaces (tests/e2e/harness.rs NS, and a second one).
E2E_NAMESPACES = ["apps", "other"]


def operator_rbac(mode: str) -> dict:
    values = MINIMAL if mode == "cluster-wide" else deep_merge(MINIMAL, {"watchNamespaces": E2E_NAMESPACES})
    docs = render(values, namespace=NAMESPACE)
    objects = [strip_meta(d) for kind in RBAC_KINDS for d in of_kind(docs, kind)]
    (sa,) = of_kind(docs, "ServiceAccount")
    env = env_of(operator_container(docs))
    return {
        "objects": objects,
        "serviceAccount": {"namespace": sa["metadata"]["namespace"], "name": sa["metadata"]["name"]},
        "lease": {"namespace": env["LEASE_NAMESPACE"]["value"], "name": env["LEASE_NAME"]["value"]},
    }


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in ("cluster-wide", "namespaced")):
        sys.exit(__doc__)
    mode = sys.argv[2] if len(sys.argv) == 3 else "cluster-wide"
    pathlib.Path(sys.argv[1]).write_text(json.dumps(operator_rbac(mode), indent=1))
