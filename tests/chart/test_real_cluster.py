"""The chart on a real API server (scripts/control-plane.sh: kube-apiserver v1.34 with RBAC and
default admission, kube-controller-manager, kube-scheduler, kwok nodes), through Helm's own Go
SDK: install, upgrade and uninstall in cluster-wide and namespaced modes, the migration hook
Job completed by the real Job controller, the rendered RBAC checked by the API server's own
authorizer (SubjectAccessReview), and the CRD's CEL rules enforced at `kubectl apply`.

Runs when REAL_KUBECONFIG names the control plane's admin kubeconfig (scripts/test-real.sh);
skipped loudly otherwise, failed when binaries are required (scripts/test.sh)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time

import helm_python as helm
import pytest
import yaml

from binaries import kubectl, required
from conftest import CHART, MINIMAL, deep_merge

# A release of its own: the e2e lane applies the operator's RBAC under the chart's default
# names (release `so`), which Helm would rightly refuse to adopt.
RELEASE = "real"
NAMESPACE = "helm-real"
SA = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-session-operator"


@pytest.fixture(scope="module")
def kubeconfig() -> pathlib.Path:
    path = os.environ.get("REAL_KUBECONFIG")
    if not path:
        message = "REAL_KUBECONFIG not set (scripts/test-real.sh starts a real control plane)"
        if required():
            pytest.fail(message)
        pytest.skip(message)
    return pathlib.Path(path)


def run(kubeconfig: pathlib.Path, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [kubectl(), "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(what: str, check, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def allowed(kubeconfig: pathlib.Path, verb: str, resource: str, namespace: str | None, group: str = "", name: str = "") -> bool:
    """The API server's authorizer (SubjectAccessReview) on one request of the operator's SA."""
    attrs = {"verb": verb, "resource": resource, "group": group}
    if namespace:
        attrs["namespace"] = namespace
    if name:
        attrs["name"] = name
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": SA, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"], "resourceAttributes": attrs},
    }
    out = run(kubeconfig, "create", "-o", "json", "-f", "-", stdin=json.dumps(review)).stdout
    return json.loads(out)["status"].get("allowed", False)


def prepare(kubeconfig: pathlib.Path, namespaces: list[str]) -> None:
    # Helm adopts only objects carrying its ownership labels: a CRD applied by hand (the e2e
    # lane applies it) makes `helm install` refuse, as it would on any cluster. A CRD kept by
    # an earlier uninstall of this release is adopted again.
    crd = run(kubeconfig, "get", "crd", "sessionpolicies.sessions.blockyard.io", "-o", "json", check=False)
    if crd.returncode == 0 and json.loads(crd.stdout)["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") != "Helm":
        run(kubeconfig, "delete", "crd", "sessionpolicies.sessions.blockyard.io", "--wait=true")
    for ns in [NAMESPACE, *namespaces]:
        run(kubeconfig, "create", "namespace", ns, check=False)
    run(
        kubeconfig, "-n", NAMESPACE, "create", "secret", "generic", "session-store",
        "--from-literal=database-url=postgres://nobody@127.0.0.1:1/none", check=False,
    )


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_helm_install_upgrade_uninstall(kubeconfig, mode) -> None:
    watch = [] if mode == "cluster-wide" else ["apps"]
    prepare(kubeconfig, ["apps"])
    values = deep_merge(MINIMAL, {"watchNamespaces": watch, "image": {"repository": "example.invalid/session-operator"}})
    config = helm.Config(kubeconfig_path=kubeconfig, namespace=NAMESPACE)
    chart = helm.Chart.load(CHART)
    try:
        release = config.install(chart, RELEASE, values, namespace=NAMESPACE, timeout=120, wait="hookOnly")
        assert release["status"] == "deployed", release
        # The pre-install hook Job (`migrate`) ran to completion under the real Job controller
        # (kwok completes its pod) and was deleted by its hook-delete-policy.
        jobs = json.loads(run(kubeconfig, "-n", NAMESPACE, "get", "jobs", "-o", "json").stdout)["items"]
        assert not jobs, [j["metadata"]["name"] for j in jobs]
        deployment = json.loads(run(kubeconfig, "-n", NAMESPACE, "get", "deployment", f"{RELEASE}-session-operator", "-o", "json").stdout)
        assert deployment["spec"]["replicas"] == 2
        wait_for(
            "the operator's pods scheduled and Ready (on kwok nodes)",
            lambda: json.loads(run(kubeconfig, "-n", NAMESPACE, "get", "deployment", f"{RELEASE}-session-operator", "-o", "json").stdout)
            .get("status", {})
            .get("readyReplicas")
            == 2,
        )
        run(kubeconfig, "get", "crd", "sessionpolicies.sessions.blockyard.io")

        # What the operator may do, decided by the real RBAC authorizer.
        scope = watch[0] if watch else None
        assert allowed(kubeconfig, "watch", "pods", "apps")
        assert allowed(kubeconfig, "patch", "sessionpolicies", "apps", "sessions.blockyard.io", "x") or allowed(
            kubeconfig, "patch", "sessionpolicies/status", "apps", "sessions.blockyard.io", "x"
        )
        assert allowed(kubeconfig, "create", "events", "apps", "events.k8s.io")
        assert allowed(kubeconfig, "patch", "leases", NAMESPACE, "coordination.k8s.io", f"{RELEASE}-session-operator")
        assert not allowed(kubeconfig, "patch", "leases", NAMESPACE, "coordination.k8s.io", "someone-else")
        assert not allowed(kubeconfig, "get", "secrets", "apps")
        assert not allowed(kubeconfig, "delete", "pods", "apps")
        assert allowed(kubeconfig, "list", "pods", "kube-system") == (scope is None), mode

        # Upgrade: a changed value reaches the Deployment, as revision 2.
        release = config.upgrade(chart, RELEASE, deep_merge(values, {"replicaCount": 3}), namespace=NAMESPACE, timeout=120, wait="hookOnly")
        assert (release["revision"], release["status"]) == (2, "deployed"), release
        deployment = json.loads(run(kubeconfig, "-n", NAMESPACE, "get", "deployment", f"{RELEASE}-session-operator", "-o", "json").stdout)
        assert deployment["spec"]["replicas"] == 3
    finally:
        uninstalled = config.uninstall(RELEASE, timeout=120, wait="watcher", ignore_not_found=True)
    assert "CustomResourceDefinition] sessionpolicies.sessions.blockyard.io" in uninstalled["info"], uninstalled["info"]
    # Uninstall removes the release's objects and keeps the CRD (helm.sh/resource-policy: keep).
    assert run(kubeconfig, "-n", NAMESPACE, "get", "deployment", f"{RELEASE}-session-operator", check=False).returncode != 0
    assert run(kubeconfig, "get", "clusterrole", f"{RELEASE}-session-operator", check=False).returncode != 0
    run(kubeconfig, "get", "crd", "sessionpolicies.sessions.blockyard.io")


def test_cel_rules_refuse_invalid_policies_at_apply(kubeconfig) -> None:
    crd = (pathlib.Path(CHART).parents[1] / "crds" / "sessionpolicies.sessions.blockyard.io.yaml").read_text()
    run(kubeconfig, "apply", "--server-side", "-f", "-", stdin=crd)
    run(kubeconfig, "wait", "--for=condition=Established", "crd/sessionpolicies.sessions.blockyard.io", "--timeout=60s")
    run(kubeconfig, "create", "namespace", "cel", check=False)

    def policy(name: str, spec: dict) -> str:
        return yaml.safe_dump(
            {"apiVersion": "sessions.blockyard.io/v1alpha1", "kind": "SessionPolicy", "metadata": {"name": name, "namespace": "cel"}, "spec": spec}
        )

    # Each of these passes the OpenAPI schema; only a CEL rule (x-kubernetes-validations) refuses it.
    for name, spec, message in [
        ("empty-selector", {"selector": {}}, "selector must name what it selects"),
        (
            "does-not-exist-alone",
            {"selector": {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}},
            "selector must name what it selects",
        ),
        (
            "exists-with-values",
            {"selector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}},
            "values may not be specified when operator is 'Exists' or 'DoesNotExist'",
        ),
        (
            "in-without-values",
            {"selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": []}]}},
            "values must be specified when operator is 'In' or 'NotIn'",
        ),
        ("sweep-every-nanosecond", {"selector": {"matchLabels": {"a": "b"}}, "idleSweepInterval": "1ns"}, "must be at least 1s"),
        ("label-without-key", {"selector": {"matchLabels": {"a": "b"}}, "workerId": {"from": "Label"}}, "workerId.key is required"),
    ]:
        proc = run(kubeconfig, "apply", "-f", "-", stdin=policy(name, spec), check=False)
        assert proc.returncode != 0, f"{name} was accepted"
        assert message in proc.stderr and "Invalid" in proc.stderr, proc.stderr
    run(kubeconfig, "apply", "-f", "-", stdin=policy("good", {"selector": {"matchLabels": {"a": "b"}}}))
    run(kubeconfig, "delete", "namespace", "cel", "--wait=false")
