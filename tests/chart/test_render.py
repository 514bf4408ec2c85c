"""Lint, render matrix and Kubernetes 1.34 schema validation of every rendered object."""

from __future__ import annotations

import helm_python as helm
import kubernetes_validate
import pytest

from conftest import CHART, CI_VALUES, MINIMAL, ci_cases, load_values, of_kind, render, strip_meta

# kubernetes-validate 1.37.0 ships schemas for 1.34 (checked below), so we validate against
# exactly the version the emulator and k8s-openapi feature (v1_34) target.
KUBE_VERSION = "1.34.0"


def test_kubernetes_validate_ships_1_34() -> None:
    import importlib.resources

    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    assert (schemas / "v1.34.0-local-strict").is_dir()


@pytest.mark.parametrize("values", [None] + CI_VALUES, ids=lambda v: getattr(v, "name", "chart-defaults"))
def test_lint_reports_no_errors(values) -> None:
    report = helm.lint(
        CHART,
        load_values(values) if values else None,
        strict=True,
        namespace="session-system",
        kube_version="v1.34.0",
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    # Severity 1 (info) is only "icon is recommended": the project has no logo.
    assert not problems and not report["errors"], report


def test_defaults_alone_fail_with_a_clear_message() -> None:
    """Without any store the operator cannot run: the install fails at once, naming the value."""
    with pytest.raises(helm.HelmRenderError, match="database.existingSecret"):
        render({})


@pytest.mark.parametrize("values", ci_cases())
def test_matrix_renders_and_validates_against_kubernetes_1_34(values) -> None:
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "Service", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # no upstream schema: see test_service_monitor_shape
        try:
            kubernetes_validate.validate(strip_meta(doc), KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({doc['__template__']}): {exc}")


@pytest.mark.parametrize("values", ci_cases())
def test_standard_labels_on_every_object(values) -> None:
    for doc in render(values):
        labels = doc["metadata"].get("labels", {})
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/part-of",
            "helm.sh/chart",
        ):
            assert key in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks {key}"


def test_namespaced_objects_name_their_namespace() -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for doc in render(MINIMAL):
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace"), f"{doc['kind']}/{doc['metadata']['name']}"


def test_service_monitor_shape() -> None:
    docs = render(load_values(CHART / "ci" / "monitoring-values.yaml"))
    (sm,) = of_kind(docs, "ServiceMonitor")
    (svc,) = of_kind(docs, "Service")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]


def test_service_monitor_off_by_default() -> None:
    assert not of_kind(render(MINIMAL), "ServiceMonitor")
    assert not of_kind(render(MINIMAL), "NetworkPolicy")


def test_network_policy_allows_what_the_operator_needs() -> None:
    docs = render(load_values(CHART / "ci" / "monitoring-values.yaml"))
    (np,) = of_kind(docs, "NetworkPolicy")
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {(p["port"], p["protocol"]) for rule in np["spec"]["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP"), (5432, "TCP"), (6379, "TCP")} <= egress_ports
    (ingress,) = np["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }


def test_pdb_and_service_select_the_operator_pods() -> None:
    docs = render(MINIMAL)
    (dep,) = of_kind(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (svc,) = of_kind(docs, "Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"] == pdb["spec"]["selector"]["matchLabels"]


def test_migration_hook_job() -> None:
    docs = render(MINIMAL)
    (job,) = of_kind(docs, "Job")
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/usr/local/bin/session-operator"]
    assert container["args"] == ["migrate"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "session-store", "key": "database-url"}
    assert "REDIS_URL" not in env
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    # opt-out
    assert not of_kind(render({**MINIMAL, "migrations": {"enabled": False}}), "Job")


def test_migration_hook_secret_precedes_the_job() -> None:
    """On install, pre-install hooks run before the release's Secret exists: the Job reads a
    hook Secret that is created first (lower weight) and deleted after the hook."""
    docs = render(load_values(CHART / "ci" / "url-values.yaml"))
    hooks = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    by_kind = {d["kind"]: d for d in hooks}
    assert set(by_kind) == {"Secret", "Job"}
    weight = lambda d: int(d["metadata"]["annotations"]["helm.sh/hook-weight"])  # noqa: E731
    assert weight(by_kind["Secret"]) < weight(by_kind["Job"])
    assert "hook-succeeded" in by_kind["Secret"]["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    (container,) = by_kind["Job"]["spec"]["template"]["spec"]["containers"]
    ref = container["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == by_kind["Secret"]["metadata"]["name"]


def test_tls_cas_are_mounted_and_passed() -> None:
    docs = render(load_values(CHART / "ci" / "existing-secret-values.yaml"))
    (dep,) = of_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PGSSLMODE"]["value"] == "verify-full"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert env["PGSSLROOTCERT"]["value"].startswith(mounts["postgres-ca"]["mountPath"] + "/")
    assert env["REDIS_CA_FILE"]["value"].startswith(mounts["redis-ca"]["mountPath"] + "/")
    assert volumes["postgres-ca"]["secret"] == {
        "secretName": "postgres-ca",
        "items": [{"key": "ca.pem", "path": "ca.crt"}],
    }
    assert volumes["redis-ca"]["secret"]["secretName"] == "redis-ca"
    assert all(m["readOnly"] for m in mounts.values() if m["name"].endswith("-ca"))
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "session-store", "key": "postgres-url"}
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "session-store", "key": "redis-url"}
    # The migration Job needs the Postgres CA, not Redis'.
    (job,) = of_kind(docs, "Job")
    job_volumes = {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]}
    assert job_volumes == {"postgres-ca"}


def test_values_for_scheduling_and_pod_metadata() -> None:
    values = {
        **MINIMAL,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"example.com/team": "platform"},
        "podLabels": {"team": "platform"},
        "extraEnv": [{"name": "HTTP_PROXY", "value": "http://proxy:3128"}],
        "image": {"repository": "registry.example.com/session-operator", "digest": "sha256:" + "a" * 64},
    }
    (dep,) = of_kind(render(values), "Deployment")
    tpl = dep["spec"]["template"]
    pod = tpl["spec"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert tpl["metadata"]["annotations"]["example.com/team"] == "platform"
    assert tpl["metadata"]["labels"]["team"] == "platform"
    (container,) = pod["containers"]
    assert {"name": "HTTP_PROXY", "value": "http://proxy:3128"} in container["env"]
    assert container["image"] == "registry.example.com/session-operator@sha256:" + "a" * 64
    kubernetes_validate.validate(strip_meta(dep), KUBE_VERSION, strict=True)


def test_topology_spread_across_nodes_by_default() -> None:
    (dep,) = of_kind(render(MINIMAL), "Deployment")
    (tsc,) = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert tsc["topologyKey"] == "kubernetes.io/hostname"
    assert tsc["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("min_available", [1, "50%"])
def test_pdb_min_available_replaces_max_unavailable(min_available) -> None:
    values = {**MINIMAL, "podDisruptionBudget": {"minAvailable": min_available}}
    (pdb,) = of_kind(render(values), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == min_available
    assert "maxUnavailable" not in pdb["spec"]
    kubernetes_validate.validate(strip_meta(pdb), KUBE_VERSION, strict=True)


def test_upgrade_renders_what_install_renders() -> None:
    assert render(MINIMAL, is_install=False, is_upgrade=True) == render(MINIMAL)
