"""The rendered chart against an API server: kube-emulator (crates/kube-emulator) with kubectl.

kubectl applies the whole render; every kind the emulator serves must be accepted (the CRD,
the Deployment, Services, Secrets), and the kinds it does not serve (RBAC, ServiceAccount,
PodDisruptionBudget, Job, NetworkPolicy, ServiceMonitor — it emulates no authorization, disruption
or batch controllers) are listed and checked against discovery, so nothing is dropped silently.
Then the installed CRD serves the example SessionPolicies and rejects the invalid one."""

from __future__ import annotations

import pathlib
import subprocess
import time

import pytest
import yaml

from binaries import binary, kubectl
from conftest import CHART, ROOT, load_values, render, strip_meta

EXAMPLES = ROOT / "examples"


class Cluster:
    def __init__(self, kubeconfig: pathlib.Path) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl = kubectl()

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.kubectl, "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def apply(self, docs: list[dict], check: bool = True) -> subprocess.CompletedProcess:
        return self.run("apply", "-f", "-", stdin=yaml.safe_dump_all(docs), check=check)

    def served_kinds(self) -> set[tuple[str, str]]:
        out = self.run("api-resources", "--no-headers", "-o", "wide").stdout
        kinds = set()
        for line in out.splitlines():
            cols = line.split()
            # NAME [SHORTNAMES] APIVERSION NAMESPACED KIND VERBS...
            idx = next(i for i, c in enumerate(cols) if c in ("true", "false"))
            kinds.add((cols[idx - 1], cols[idx + 1]))
        return kinds


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    emulator = binary("KUBE_EMULATOR_BIN", "kube-emulator")
    workdir = tmp_path_factory.mktemp("emulator")
    kubeconfig = workdir / "kubeconfig"
    log = (workdir / "emulator.log").open("w")
    proc = subprocess.Popen(
        [str(emulator), "--listen", "127.0.0.1:0", "--kubeconfig-out", str(kubeconfig)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not kubeconfig.exists():
            assert proc.poll() is None, (workdir / "emulator.log").read_text()
            assert time.monotonic() < deadline, "kube-emulator did not start"
            time.sleep(0.1)
        yield Cluster(kubeconfig)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


NOT_EMULATED = {
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("policy/v1", "PodDisruptionBudget"),
    ("batch/v1", "Job"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}


def test_render_applies_and_crd_serves_the_examples(cluster) -> None:
    values = load_values(EXAMPLES / "values-production.yaml")
    values["database"] = {"url": "postgres://operator:pw@db:5432/sessions"}
    values["redis"] = {"url": "redis://redis:6379"}
    docs = [strip_meta(d) for d in render(values)]
    namespaces = {"session-system", "apps", "notebooks"}
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in sorted(namespaces)])

    served = cluster.served_kinds()
    applicable = [d for d in docs if (d["apiVersion"], d["kind"]) in served]
    skipped = {(d["apiVersion"], d["kind"]) for d in docs} - served
    # Only kinds the emulator is documented not to serve are left out.
    assert skipped <= NOT_EMULATED, skipped
    assert {d["kind"] for d in applicable} >= {"CustomResourceDefinition", "Deployment", "Service", "Secret"}
    out = cluster.apply(applicable).stdout
    for doc in applicable:
        assert f"/{doc['metadata']['name']} created" in out or f"/{doc['metadata']['name']} configured" in out

    # The Deployment is stored as rendered (the emulator runs no pods for it).
    name = next(d["metadata"]["name"] for d in applicable if d["kind"] == "Deployment")
    dep = yaml.safe_load(cluster.run("-n", "session-system", "get", "deployment", name, "-o", "yaml").stdout)
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"] == ["run"]

    # The CRD from the chart is established and serves SessionPolicies.
    crd = yaml.safe_load(cluster.run("get", "crd", "sessionpolicies.sessions.blockyard.io", "-o", "yaml").stdout)
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}.get("Established") == "True"
    for path in sorted(EXAMPLES.glob("sessionpolicy-*.yaml")):
        (policy,) = yaml.safe_load_all(path.read_text())
        cluster.apply([policy])
        got = yaml.safe_load(
            cluster.run("-n", policy["metadata"]["namespace"], "get", "sp", policy["metadata"]["name"], "-o", "yaml").stdout
        )
        assert got["spec"]["selector"] == policy["spec"]["selector"]
        assert got["spec"]["migration"]["onReplace"] == policy["spec"]["migration"]["onReplace"]
    listed = cluster.run("get", "sessionpolicies", "-A", "-o", "name").stdout.split()
    assert len(listed) == len(list(EXAMPLES.glob("sessionpolicy-*.yaml")))


def test_invalid_example_is_rejected_by_the_api(cluster) -> None:
    (policy,) = yaml.safe_load_all((EXAMPLES / "invalid" / "sessionpolicy-invalid.yaml").read_text())
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}])
    proc = cluster.apply([policy], check=False)
    assert proc.returncode != 0
    print(proc.stderr)
    assert "Invalid" in proc.stderr or "invalid" in proc.stderr, proc.stderr
    assert "spec.selector" in proc.stderr, proc.stderr
    assert cluster.run("-n", "apps", "get", "sp", "broken", check=False).returncode != 0
