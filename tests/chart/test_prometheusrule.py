"""The opt-in PrometheusRule and Grafana dashboard of the chart: off by default, rendered as
Prometheus Operator and Grafana's sidecar expect them, the rule checked and unit-tested with
Prometheus' own promtool (tests/chart/promtool/alerts-test.yaml), every dashboard query parsed by
promtool. That the metrics they query exist is test_monitoring_live.py's job (a live scrape)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import yaml

from conftest import MINIMAL, of_kind, render
from monitoring import dashboard, dashboard_queries, panels, prometheus_rule, promtool, rendered, rule_queries, uses

PROMTOOL_TESTS = pathlib.Path(__file__).parent / "promtool" / "alerts-test.yaml"

ALERTS = {
    "SessionOperatorNoLeader",
    "SessionOperatorMultipleLeaders",
    "SessionOperatorReconcileErrors",
    "SessionOperatorStoreErrors",
    "SessionOperatorMigrationLatencyHigh",
    "SessionOperatorSessionsStuck",
    "SessionOperatorNotReady",
    "SessionOperatorPolicyNotReady",
}


def run_promtool(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def write_rules(rule: dict, directory: pathlib.Path) -> pathlib.Path:
    """The PrometheusRule's spec is a Prometheus rule file."""
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def unit_test(rule: dict, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    write_rules(rule, tmp_path)
    shutil.copy(PROMTOOL_TESTS, tmp_path / PROMTOOL_TESTS.name)
    return run_promtool("test", "rules", PROMTOOL_TESTS.name, cwd=tmp_path)


def test_monitoring_is_off_by_default() -> None:
    docs = render(MINIMAL)
    assert not of_kind(docs, "PrometheusRule")
    assert not [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


def test_rule_has_every_alert_of_the_issue() -> None:
    rule = prometheus_rule()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "session-system"
    alerts = {r["alert"] for _, r in ((g, r) for g in rule["spec"]["groups"] for r in g["rules"])}
    assert alerts == ALERTS
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "metrics": {
                "prometheusRule": {
                    "selector": 'job="session-operator"',
                    "additionalLabels": {"team": "platform"},
                    "labels": {"release": "kube-prometheus-stack"},
                    "noLeaderFor": "2m",
                    "runbookBaseUrl": "",
                    "migrationLatencyP99Seconds": 30,
                }
            },
            "leaderElection": {"leaseDuration": "30s"},
        },
    ],
    ids=["defaults", "customised"],
)
def test_promtool_check_rules(values, tmp_path) -> None:
    rule = prometheus_rule(values)
    proc = run_promtool("check", "rules", str(write_rules(rule, tmp_path)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout, proc.stdout


def test_values_reach_the_rule() -> None:
    rule = prometheus_rule(
        {
            "metrics": {
                "prometheusRule": {
                    "selector": 'job="session-operator"',
                    "additionalLabels": {"team": "platform"},
                    "labels": {"release": "kube-prometheus-stack"},
                    "runbookBaseUrl": "",
                    "migrationLatencyP99Seconds": 30,
                }
            },
            "leaderElection": {"leaseDuration": "45s"},
        }
    )
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert rules["SessionOperatorNoLeader"]["for"] == "45s"  # the lease duration
    assert rules["SessionOperatorMigrationLatencyHigh"]["expr"].rstrip().endswith("> 30")
    for name, r in rules.items():
        assert r["labels"]["team"] == "platform", name
        assert "runbook_url" not in r["annotations"], name
        assert 'job="session-operator"' in r["expr"] and "so-session-operator-metrics" not in r["expr"], name


def test_promtool_unit_tests_pass(tmp_path) -> None:
    proc = unit_test(prometheus_rule(), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_unit_tests_cover_every_alert() -> None:
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    firing = {
        case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")
    }
    silent = {
        case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if not case.get("exp_alerts")
    }
    assert firing == ALERTS, f"alerts never seen firing: {ALERTS - firing}"
    assert silent == ALERTS, f"alerts never checked to stay silent: {ALERTS - silent}"


@pytest.mark.parametrize(
    "values, alert",
    [
        ({"metrics": {"prometheusRule": {"noLeaderFor": "5m"}}}, "SessionOperatorNoLeader"),
        ({"metrics": {"prometheusRule": {"storeErrorsPerSecond": 1}}}, "SessionOperatorStoreErrors"),
        ({"metrics": {"prometheusRule": {"migrationLatencyP99Seconds": 600}}}, "SessionOperatorMigrationLatencyHigh"),
        ({"metrics": {"prometheusRule": {"selector": 'job="elsewhere"'}}}, "SessionOperatorNotReady"),
    ],
    ids=["no-leader-for", "store-threshold", "latency-threshold", "selector"],
)
def test_unit_tests_catch_a_changed_rule(values, alert, tmp_path) -> None:
    """The promtool tests are not vacuous: a rule rendered with other thresholds fails them."""
    proc = unit_test(prometheus_rule(values), tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert f"alertname: {alert}" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_dashboard_configmap_is_found_by_the_grafana_sidecar() -> None:
    (cm,) = [d for d in of_kind(rendered(), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "session-system"
    assert list(cm["data"]) == ["session-operator.json"]
    moved = of_kind(rendered({"metrics": {"dashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "Operators"}}}}), "ConfigMap")
    (cm,) = [d for d in moved if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Operators"}


def test_dashboard_has_the_panels_of_the_issue() -> None:
    dash = dashboard()
    assert dash["uid"] == "session-operator"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    queried = {}
    for panel in panels(dash):
        for target in panel.get("targets", []):
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            queried.setdefault(panel["title"], set()).update(uses(target["expr"].replace("$__rate_interval", "1m")).selectors)
    wanted = {
        "migrations": "session_operator_migrations_total",
        "latency histogram": "session_operator_migration_latency_seconds_bucket",
        "sessions per policy": "session_operator_policy_sessions",
        "store latency": "session_operator_store_latency_seconds_bucket",
        "errors": "session_operator_errors_total",
        "leader": "session_operator_leader",
    }
    for what, metric in wanted.items():
        assert any(metric in names for names in queried.values()), f"no panel for {what} ({metric})"
    assert any(p["type"] == "heatmap" for p in panels(dash))


def test_promtool_parses_every_dashboard_query(tmp_path) -> None:
    """Each query as a recording rule: `promtool check rules` parses its PromQL."""
    queries = dashboard_queries(dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": q} for i, (_, q) in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_query_scanner() -> None:
    used = uses('sum by (le) (rate(a_bucket{job="x",kind=~"y|z"}[5m])) / on(pod) b_total or vector(0) > 1e3')
    assert used.selectors == {"a_bucket": {"job", "kind"}, "b_total": set()}
    assert used.grouping == {"le", "pod"}
    assert uses('histogram_quantile(0.99, x{a="{not a brace}"})').selectors == {"x": {"a"}}
    assert all(q for _, q in rule_queries(prometheus_rule()))
