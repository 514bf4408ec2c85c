"""RBAC is exactly what the operator calls (recorded from the real operator by
test_rbac_e2e.py), nothing more."""

from __future__ import annotations

import pytest

from conftest import CHART, MINIMAL, NAMESPACE, ci_cases, load_values, of_kind, render

WATCH = {
    ("", "pods"): {"list", "watch", "patch"},
    ("sessions.blockyard.io", "sessionpolicies"): {"list", "watch"},
    ("sessions.blockyard.io", "sessionpolicies/status"): {"patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
LEASE = {("coordination.k8s.io", "leases"): {"create", "get", "list", "watch", "patch"}}


def grants(role) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def lease_role(docs):
    (role,) = [r for r in of_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    return role


def test_cluster_wide_by_default() -> None:
    docs = render(MINIMAL)
    (cr,) = of_kind(docs, "ClusterRole")
    assert grants(cr) == WATCH
    (crb,) = of_kind(docs, "ClusterRoleBinding")
    assert crb["roleRef"]["name"] == cr["metadata"]["name"]
    (sa,) = of_kind(docs, "ServiceAccount")
    assert crb["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    (dep,) = of_kind(docs, "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_lease_access_only_in_the_lease_namespace_and_only_its_lease() -> None:
    docs = render(MINIMAL)
    role = lease_role(docs)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert grants(role) == LEASE
    for rule in role["rules"]:
        if rule["verbs"] != ["create"]:  # Kubernetes cannot restrict create by name
            assert rule["resourceNames"] == ["so-session-operator"]
    (binding,) = [b for b in of_kind(docs, "RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert binding["metadata"]["namespace"] == NAMESPACE
    # A lease elsewhere moves the Role with it.
    docs = render({**MINIMAL, "leaderElection": {"namespace": "ops", "leaseName": "sessions"}})
    role = lease_role(docs)
    assert role["metadata"]["namespace"] == "ops"
    assert ["sessions"] in [r.get("resourceNames") for r in role["rules"]]


def test_namespaced_watch_uses_roles_only() -> None:
    docs = render(load_values(CHART / "ci" / "namespaced-values.yaml"))
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    watch_roles = [r for r in of_kind(docs, "Role") if not r["metadata"]["name"].endswith("-leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in watch_roles) == ["apps", "shiny"]
    for role in watch_roles:
        assert grants(role) == WATCH
    bindings = [b for b in of_kind(docs, "RoleBinding") if b["roleRef"]["kind"] == "Role"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["apps", "session-system", "shiny"]
    (dep,) = of_kind(docs, "Deployment")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WATCH_NAMESPACES"]["value"] == "apps,shiny"


def test_pod_patch_only_with_pod_deletion_cost() -> None:
    docs = render({**MINIMAL, "rbac": {"podDeletionCost": False}})
    (cr,) = of_kind(docs, "ClusterRole")
    assert grants(cr)[("", "pods")] == {"list", "watch"}


@pytest.mark.parametrize("values", ci_cases())
def test_never_secrets_nor_wildcards(values) -> None:
    for role in of_kind(render(values), "ClusterRole") + of_kind(render(values), "Role"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"]
            assert "*" not in rule["resources"] + rule["verbs"] + rule["apiGroups"]
            assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_rbac_can_be_left_to_the_user() -> None:
    docs = render({**MINIMAL, "rbac": {"create": False}})
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io")]
