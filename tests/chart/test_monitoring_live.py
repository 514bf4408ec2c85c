"""The chart's alerts and dashboard query what the operator really exports: the real
`session-operator` runs against kube-emulator and a real Postgres, goes through a rolling
replacement, and its live /metrics scrape must (1) pass `promtool check metrics`, (2) contain every
metric the rendered PrometheusRule and dashboard query, with the labels they select and group
by, and (3) report each SessionPolicy's status as `kubectl get sp` shows it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request

import pytest
import yaml

from binaries import binary
from conftest import MINIMAL, deep_merge, of_kind, render, strip_meta
from monitoring import MONITORING, Scrape, dashboard_queries, promtool, rule_queries, uses
from test_binary import deployment_container, process_env
from test_emulator import Cluster
from test_rbac_e2e import database_url, free_port, make_ready, pod, wait_for  # noqa: F401 (fixture)

NAMESPACE = "session-system"

# Families the scenario below always produces samples for, so their labels are checked.
SAMPLED = {
    "session_operator_leader",
    "session_operator_ready",
    "session_operator_reconciles_total",
    "session_operator_migrations_total",
    "session_operator_sessions_rerouted_total",
    "session_operator_migration_latency_seconds_bucket",
    "session_operator_store_latency_seconds_bucket",
    "session_operator_store_latency_seconds_count",
    "session_operator_policy_condition",
    "session_operator_policy_sessions",
    "session_operator_policy_workers",
    "session_operator_errors_total",  # every kind exported at 0 from the start
}


OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


def scrape(address: str, accept: str = OPENMETRICS) -> str:
    """/metrics as Prometheus asks for it (OpenMetrics first) or, with accept="", as curl does."""
    request = urllib.request.Request(f"http://{address}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        content_type = response.headers["Content-Type"]
        assert content_type.startswith("application/openmetrics-text" if accept else "text/plain; version=0.0.4"), content_type
        return response.read().decode()


def samples(text: str, name: str) -> dict[frozenset, float]:
    """label set -> value of every sample of `name`."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            labels = frozenset(
                tuple(kv.split("=", 1)) for kv in head[len(name) + 1 : -1].replace('"', "").split(",") if kv
            ) if "{" in head else frozenset()
            out[labels] = float(value)
    return out


def status_as_series(policy: dict) -> dict[str, dict[frozenset, float]]:
    """The series the operator should export for one policy's status."""
    ns, name = policy["metadata"]["namespace"], policy["metadata"]["name"]
    status = policy.get("status", {})
    base = {("policy_namespace", ns), ("policy", name)}
    return {
        "session_operator_policy_condition": {
            frozenset(base | {("type", c["type"]), ("reason", c["reason"])}): float(c["status"] == "True")
            for c in status.get("conditions", [])
            if c["status"] in ("True", "False")
        },
        "session_operator_policy_sessions": {frozenset(base): float(status["sessions"])} if "sessions" in status else {},
        "session_operator_policy_workers": {
            frozenset(base | {("state", state)}): float(status["workers"][state]) for state in ("ready", "terminating")
        } if "workers" in status else {},
    }


def test_missing_reports_unknown_metrics_and_labels() -> None:
    """The comparison itself can fail: an unknown metric, a sampleless one, an unknown label."""
    scrape_text = (
        "# TYPE x counter\n# TYPE quiet counter\nx_total{kind=\"a\"} 1\n"
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 0\n# EOF\n"
    )
    s = Scrape.parse(scrape_text)
    assert s.missing("q", 'sum by (kind) (rate(x_total{job="j",kind="a"}[5m]))') == []
    assert s.missing("q", "rate(h_bucket[5m])") == []
    assert s.missing("q", "rate(y_total[5m])") == ["q: metric y_total is not in /metrics"]
    assert s.missing("q", "rate(quiet_total[5m])") == ["q: metric quiet_total has no samples in this scrape"]
    assert s.missing("q", 'x_total{result="ok"}') == ["q: x_total has no label result"]
    assert s.missing("q", "sum by (op) (x_total)") == ["q: groups by op, which none of ['x_total'] has"]


def test_alerts_and_dashboard_query_the_live_metrics(database_url, tmp_path) -> None:  # noqa: F811
    operator = binary("SESSION_OPERATOR_BIN", "the session-operator binary")
    emulator = binary("KUBE_EMULATOR_BIN", "kube-emulator")
    schema = f"chart_monitoring_{os.getpid()}"
    values = deep_merge(deep_merge(MINIMAL, MONITORING), {"database": {"schema": schema}, "logging": {"format": "text"}})
    docs = render(values, namespace=NAMESPACE)
    (rule,) = of_kind(docs, "PrometheusRule")
    (cm,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    (dashboard_json,) = cm["data"].values()
    queries = rule_queries(rule) + dashboard_queries(json.loads(dashboard_json))

    kubeconfig = tmp_path / "kubeconfig"
    emu = subprocess.Popen(
        [str(emulator), "--listen", "127.0.0.1:0", "--kubeconfig-out", str(kubeconfig)],
        stdout=(tmp_path / "emulator.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    op = None
    op_log = tmp_path / "operator.log"
    try:
        wait_for("kube-emulator", kubeconfig.exists, 30)
        cluster = Cluster(kubeconfig)
        cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in (NAMESPACE, "apps")])
        cluster.apply([strip_meta(d) for d in of_kind(docs, "CustomResourceDefinition")])
        policy = {
            "apiVersion": "sessions.blockyard.io/v1alpha1",
            "kind": "SessionPolicy",
            "metadata": {"name": "shiny-workers", "namespace": "apps"},
            "spec": {
                "selector": {"matchLabels": {"app": "shiny-worker"}},
                "idleTTL": "30m",
                "idleSweepInterval": "1s",
                "migration": {"onReplace": "Reroute", "onTerminate": "Delete", "replacementWait": "5s"},
            },
        }
        cluster.apply([policy, pod("w-a"), pod("w-b")])
        for name in ("w-a", "w-b"):
            make_ready(cluster, name)

        dep, container = deployment_container(docs)
        env = process_env(container, docs, "so-0", NAMESPACE)
        address = f"127.0.0.1:{free_port()}"
        env.update(DATABASE_URL=database_url, KUBECONFIG=str(kubeconfig), METRICS_ADDR=address, HOME=str(tmp_path))
        store_env = {k: env[k] for k in ("DATABASE_URL", "SESSION_SCHEMA", "PATH", "HOME")}
        subprocess.run([str(operator), "migrate"], env=store_env, check=True, capture_output=True, timeout=120)
        for session, worker in (("s1", "w-a"), ("s2", "w-a"), ("s3", "w-b")):
            subprocess.run(
                [str(operator), "sessions", "set", session, "--worker", worker],
                env=store_env, check=True, capture_output=True, timeout=60,
            )
        op = subprocess.Popen([str(operator), "run"], env=env, stdout=op_log.open("w"), stderr=subprocess.STDOUT)

        def get_policy() -> dict:
            return json.loads(cluster.run("-n", "apps", "get", "sp", "shiny-workers", "-o", "json").stdout)

        def reported(want_sessions: int) -> bool:
            status = get_policy().get("status", {})
            ready = {c["type"]: c["status"] for c in status.get("conditions", [])}.get("Ready")
            return status.get("sessions") == want_sessions and ready == "True"

        wait_for("the policy's first status", lambda: reported(3))
        # A rolling replacement: w-c becomes Ready, then w-a departs and its sessions follow.
        cluster.apply([pod("w-c")])
        make_ready(cluster, "w-c")
        cluster.run("-n", "apps", "delete", "pod", "w-a", "--wait=false")
        wait_for("a migration", lambda: "session_operator_migrations_total{" in scrape(address))

        # The policy gauges are the status as the API server holds it (status is written at most
        # every 2 s, so both are read until they agree, then compared as a whole).
        def agree() -> bool:
            text = scrape(address)
            want = status_as_series(get_policy())
            return all(samples(text, name) == series for name, series in want.items()) and bool(
                want["session_operator_policy_sessions"]
            )

        wait_for("policy gauges equal to the status", agree)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://{address}/readyz", timeout=10) as response:
                    return response.status == 200
            except urllib.error.HTTPError:
                return False

        wait_for("/readyz", ready)
        text = scrape(address)
        plain = scrape(address, accept="")
    finally:
        if op is not None:
            op.send_signal(signal.SIGTERM)
            try:
                op.wait(timeout=30)
            except subprocess.TimeoutExpired:
                op.kill()
                op.wait()
        emu.terminate()
        emu.wait(timeout=10)
        subprocess.run(["psql", database_url, "-qc", f"DROP SCHEMA IF EXISTS {schema} CASCADE"], capture_output=True, timeout=60)
    (tmp_path / "metrics.txt").write_text(text)
    (tmp_path / "metrics-plain.txt").write_text(plain)
    print(f"operator log: {op_log}; scrapes: {tmp_path}/metrics.txt, metrics-plain.txt")

    # 1. Prometheus' own linter accepts the exposition, as `curl -s …/metrics | promtool check
    #    metrics` feeds it (the text format: promtool's parser does not read OpenMetrics), and
    #    both formats carry the same samples.
    proc = subprocess.run([promtool(), "check", "metrics"], input=plain, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool check metrics:\n{proc.stdout}{proc.stderr}"
    assert set(Scrape.parse(plain).samples) == set(Scrape.parse(text).samples)
    assert Scrape.parse(plain).declared == Scrape.parse(text).declared

    # 2. Every metric and label the alerts and panels query is in the scrape.
    live = Scrape.parse(text)
    assert SAMPLED <= set(live.samples), f"the scenario produced no samples of {sorted(SAMPLED - set(live.samples))}"
    problems = [p for where, expr in queries for p in live.missing(where, expr)]
    assert not problems, "queries that do not match the live /metrics:\n" + "\n".join(problems)
    queried = {name for _, expr in queries for name in uses(expr).selectors}
    print(f"{len(queries)} queries read {len(queried)} metrics, all in the live scrape:", sorted(queried))

    # 3. The readiness gauge is what /readyz answered just before.
    assert samples(text, "session_operator_ready") == {frozenset(): 1.0}
    assert samples(text, "session_operator_leader") == {frozenset(): 1.0}
