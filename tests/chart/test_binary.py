"""Chart and binary cannot drift: the real `session-operator` validates the rendered
Deployment's command, args and environment (`run --check-config` parses every flag and
variable and exits without connecting), and every variable the chart sets is one the binary
reads."""

from __future__ import annotations

import base64
import re
import subprocess

import pytest

from binaries import binary
from conftest import CHART, MINIMAL, ci_cases, deep_merge, load_values, of_kind, render

# Read by libraries or by the binary outside its flag parser, so absent from `run --help`:
NOT_FLAGS = {
    "RUST_LOG",  # tracing-subscriber's EnvFilter
    "POD_NAMESPACE",  # fallback of --lease-namespace
    "PGSSLMODE",  # sqlx's PgConnectOptions
    "PGSSLROOTCERT",  # sqlx's PgConnectOptions
    "REDIS_CA_FILE",  # the operator's Redis TLS setup (contract of issue 8/9)
}
PLACEHOLDER = {
    "DATABASE_URL": "postgres://operator:not-a-real-password@postgres.example:5432/sessions",
    "REDIS_URL": "redis://:not-a-real-password@redis.example:6379/0",
}


@pytest.fixture(scope="module")
def operator():
    return binary("SESSION_OPERATOR_BIN", "the session-operator binary")


def process_env(container: dict, docs: list[dict], pod_name: str, namespace: str) -> dict[str, str]:
    """The environment the kubelet would give the container."""
    secrets = {
        s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
        for s in of_kind(docs, "Secret")
    }
    env: dict[str, str] = {"PATH": "/usr/bin:/bin"}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = {"metadata.name": pod_name, "metadata.namespace": namespace}[
                source["fieldRef"]["fieldPath"]
            ]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            # A chart-managed Secret gives its value; a user's Secret a placeholder URL.
            env[var["name"]] = secrets.get(ref["name"], {}).get(ref["key"], PLACEHOLDER[var["name"]])
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


def deployment_container(docs):
    (dep,) = of_kind(docs, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, container


def check_config(operator, container, env) -> subprocess.CompletedProcess:
    assert container["command"] == ["/usr/local/bin/session-operator"]
    return subprocess.run(
        [str(operator), *container["args"], "--check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("values", ci_cases() + [pytest.param(load_values(CHART.parent.parent / "examples" / "values-production.yaml"), id="production")])
def test_binary_accepts_the_rendered_deployment(operator, values) -> None:
    docs = render(values)
    dep, container = deployment_container(docs)
    env = process_env(container, docs, "so-7d9f8-abcde", dep["metadata"]["namespace"])
    proc = check_config(operator, container, env)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    output = proc.stdout + proc.stderr
    for password in ("not-a-real-password", "s3cr3t-pg", "s3cr3t-redis"):
        assert password not in output, "check-config printed a password"
    # The summary reflects what the chart configured.
    assert env["LEASE_NAME"] in output
    for namespace in values.get("watchNamespaces", []):
        assert namespace in output


def test_binary_rejects_what_the_chart_must_never_render(operator) -> None:
    """check-config is a real check: a malformed variable fails it."""
    docs = render(MINIMAL)
    dep, container = deployment_container(docs)
    env = process_env(container, docs, "so-1", dep["metadata"]["namespace"])
    for name, bad in (("LEASE_DURATION", "15 parsecs"), ("LEADER_ELECT", "maybe"), ("LOG_FORMAT", "xml"), ("METRICS_ADDR", "eight-thousand")):
        proc = check_config(operator, container, {**env, name: bad})
        assert proc.returncode != 0, f"{name}={bad} was accepted:\n{proc.stdout}"


def test_every_variable_the_chart_sets_is_read_by_the_binary(operator) -> None:
    help_text = subprocess.run(
        [str(operator), "run", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    known = set(re.findall(r"\[env: ([A-Z0-9_]+)", help_text))
    assert {"DATABASE_URL", "LEADER_ELECT", "LEASE_NAME", "METRICS_ADDR"} <= known, help_text
    values = deep_merge(
        load_values(CHART / "ci" / "existing-secret-values.yaml"),
        {"watchNamespaces": ["apps"], "redis": {"indexOnly": True}},
    )
    _, container = deployment_container(render(values))
    chart_vars = {e["name"] for e in container["env"]}
    unknown = chart_vars - known - NOT_FLAGS
    assert not unknown, f"the chart sets variables `session-operator run` does not read: {sorted(unknown)}"


def test_migrate_job_runs_a_real_subcommand(operator) -> None:
    docs = render(MINIMAL)
    (job,) = of_kind(docs, "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    proc = subprocess.run([str(operator), *container["args"], "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    known = set(re.findall(r"\[env: ([A-Z0-9_]+)", proc.stdout))
    unknown = {e["name"] for e in container["env"]} - known - NOT_FLAGS
    assert not unknown, f"the migration Job sets variables `migrate` does not read: {sorted(unknown)}"
