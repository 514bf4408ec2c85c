"""Credentials never leak into plain manifests; pods run locked down; leader election is on
whenever more than one replica runs."""

from __future__ import annotations

import base64
import json

import helm_python as helm
import pytest

from conftest import (
    deep_merge,
    CHART,
    MINIMAL,
    ci_cases,
    env_of,
    load_values,
    of_kind,
    one,
    operator_container,
    render,
    render_files,
)

URL_VALUES = load_values(CHART / "ci" / "url-values.yaml")
SECRETS = ["s3cr3t-pg", "s3cr3t-redis"]
URLS = [URL_VALUES["database"]["url"], URL_VALUES["redis"]["url"]]


def pod_specs(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def test_no_secret_in_args_env_literals_configmaps_or_annotations() -> None:
    docs = render(URL_VALUES)
    assert not of_kind(docs, "ConfigMap")
    for doc, pod in pod_specs(docs):
        text = json.dumps(doc)  # the whole workload: args, env, annotations, labels
        for secret in SECRETS:
            assert secret not in text, f"{doc['kind']} carries a password"
        for container in pod["containers"]:
            for env in container.get("env", []):
                if env["name"] in ("DATABASE_URL", "REDIS_URL"):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"]
    # NOTES.txt is printed to the terminal: it must not echo the URLs either.
    notes = next(v for k, v in render_files(URL_VALUES).items() if k.endswith("NOTES.txt"))
    for secret in SECRETS:
        assert secret not in notes
    # The passwords live in Secrets only.
    secrets = of_kind(docs, "Secret")
    assert secrets
    found = {
        base64.b64decode(v).decode()
        for s in secrets
        for v in s.get("data", {}).values()
    }
    assert set(URLS) <= found


@pytest.mark.parametrize("values", ci_cases())
def test_secret_values_never_appear_outside_secrets(values) -> None:
    for doc in render(values):
        if doc["kind"] == "Secret":
            continue
        text = json.dumps(doc)
        for secret in SECRETS:
            assert secret not in text


def test_extra_env_cannot_carry_a_literal_database_url() -> None:
    values = {**MINIMAL, "extraEnv": [{"name": "DATABASE_URL", "value": "postgres://u:pw@db/x"}]}
    with pytest.raises(helm.HelmValuesError, match="extraEnv"):
        render(values)


@pytest.mark.parametrize("values", ci_cases())
def test_pods_run_locked_down(values) -> None:
    for doc, pod in pod_specs(render(values)):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["privileged"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert sc["runAsUser"] >= 10000, where
            res = container["resources"]
            for key in ("cpu", "memory"):
                assert key in res["requests"] and key in res["limits"], where


def test_operator_probes_identity_and_metrics() -> None:
    docs = render(MINIMAL)
    container = operator_container(docs)
    assert container["command"] == ["/usr/local/bin/session-operator"]
    assert container["args"] == ["run"]
    (port,) = container["ports"]
    assert port["containerPort"] == 8080 and port["name"] == "http-metrics"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    env = env_of(container)
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["METRICS_ADDR"]["value"] == "0.0.0.0:8080"
    assert env["LOG_FORMAT"]["value"] == "json"
    assert env["SESSION_SCHEMA"]["value"] == "blockyard"
    assert env["REDIS_PREFIX"]["value"] == "blockyard:"
    svc = one(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http-metrics"
    # A changed metrics port moves the container port, the env and the Service together.
    docs = render({**MINIMAL, "metrics": {"port": 9090}})
    container = operator_container(docs)
    assert container["ports"][0]["containerPort"] == 9090
    assert env_of(container)["METRICS_ADDR"]["value"] == "0.0.0.0:9090"
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9090


@pytest.mark.parametrize("values", ci_cases())
def test_leader_election_on_whenever_replicas_exceed_one(values) -> None:
    docs = render(values)
    dep = one(docs, "Deployment")
    env = env_of(operator_container(docs))
    if dep["spec"]["replicas"] > 1:
        assert env["LEADER_ELECT"]["value"] == "true"
    assert env["LEADER_ELECT"]["value"] in ("true", "false")


def test_two_replicas_with_leader_election_by_default() -> None:
    docs = render(MINIMAL)
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    env = env_of(operator_container(docs))
    assert env["LEADER_ELECT"]["value"] == "true"
    assert env["LEASE_NAMESPACE"]["value"] == "session-system"
    assert env["LEASE_NAME"]["value"] == "so-session-operator"
    assert env["LEASE_DURATION"]["value"] == "15s"


@pytest.mark.parametrize("replicas", [2, 5])
def test_disabling_leader_election_with_replicas_is_rejected(replicas) -> None:
    values = {**MINIMAL, "replicaCount": replicas, "leaderElection": {"enabled": False}}
    with pytest.raises(helm.HelmValuesError, match="leaderElection/enabled"):
        render(values)


def test_single_replica_may_run_without_leader_election() -> None:
    docs = render({**MINIMAL, "replicaCount": 1, "leaderElection": {"enabled": False}})
    assert env_of(operator_container(docs))["LEADER_ELECT"]["value"] == "false"
    assert not [d for d in docs if d["kind"] == "Role" and "leader" in d["metadata"]["name"]]


def test_pods_restart_when_chart_managed_urls_change() -> None:
    def checksum(values):
        dep = one(render(values), "Deployment")
        return dep["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/store-secret")

    first = checksum(URL_VALUES)
    assert first and len(first) == 64
    changed = deep_merge(URL_VALUES, {"database": {"url": URL_VALUES["database"]["url"].replace("s3cr3t-pg", "rotated")}})
    assert checksum(changed) not in (None, first)
    assert checksum(MINIMAL) is None  # a user's Secret: nothing to hash


def test_notes_tell_how_to_check_the_install() -> None:
    notes = next(v for k, v in render_files(MINIMAL).items() if k.endswith("NOTES.txt"))
    assert "kubectl -n session-system get lease so-session-operator" in notes
    assert "helm.sh/resource-policy=keep" in notes
    notes = next(v for k, v in render_files(URL_VALUES).items() if k.endswith("NOTES.txt"))
    assert "WARNING" in notes and "database.existingSecret" in notes


def test_existing_secret_wins_over_url_values() -> None:
    values = deep_merge(URL_VALUES, {"database": {"existingSecret": "mine"}, "redis": {"existingSecret": "mine"}})
    docs = render(values)
    for doc in docs:
        text = json.dumps(doc)
        for secret in SECRETS:
            assert secret not in text, f"{doc['kind']}/{doc['metadata']['name']} carries an unused URL"
    env = env_of(operator_container(docs))
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "mine"


def test_redis_only_store_has_no_migration_job() -> None:
    docs = render({"redis": {"existingSecret": "session-store"}})
    env = env_of(operator_container(docs))
    assert "DATABASE_URL" not in env and "REDIS_URL" in env
    assert not of_kind(docs, "Job")
