"""The chart's monitoring objects (PrometheusRule, Grafana dashboard ConfigMap) and what their
PromQL queries: metric names and the labels they select or group by, so that the tests can
compare them with a live /metrics scrape of the operator instead of a list kept by hand."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import pytest

from binaries import required
from conftest import MINIMAL, deep_merge, of_kind, render

MONITORING = {"metrics": {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}}

# Grafana's variables, replaced by what Grafana would send so that promtool can parse the query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
    "$job": ".*",
    "$namespace": ".*",
}

# Labels every scraped series gets from Prometheus (target labels), not from the operator.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container"}

# PromQL words followed by "(" that are not functions (their parentheses hold label names).
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan"}


def promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if found:
        return found
    message = "promtool not found (Debian: apt-get install prometheus; scripts/chart-test.sh installs it)"
    if required():
        pytest.fail(message)
    pytest.skip(message)


def rendered(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return render(deep_merge(deep_merge(MINIMAL, MONITORING), values or {}))


def prometheus_rule(values: dict[str, Any] | None = None) -> dict[str, Any]:
    (rule,) = of_kind(rendered(values), "PrometheusRule")
    return rule


def dashboard(values: dict[str, Any] | None = None) -> dict[str, Any]:
    (cm,) = [d for d in of_kind(rendered(values), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    (text,) = cm["data"].values()
    return json.loads(text)


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable, variables substituted."""
    out = []
    for panel in panels(dash):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", grafana_to_promql(target["expr"])))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert match, f"variable {var['name']}: unexpected query {query}"
        out.append((f"variable {var['name']}", grafana_to_promql(match[1])))
    return out


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def rule_queries(rule: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]


@dataclass
class Uses:
    """What one PromQL expression reads: metric -> labels it matches on, and grouping labels."""

    selectors: dict[str, set[str]] = field(default_factory=dict)
    grouping: set[str] = field(default_factory=set)


def uses(expr: str) -> Uses:
    """Metric names and labels of a PromQL expression, by a small scanner: strings are blanked,
    `{…}` matchers read per metric, `by (…)`-like clauses collected, and every remaining
    identifier that is not a function call or keyword is a metric name."""
    out = Uses()
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    for match in re.finditer(_GROUPING, text):
        out.grouping |= {label.strip() for label in match[1].split(",") if label.strip()}
    text = re.sub(_GROUPING, " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations

    def selector(match: re.Match) -> str:
        name = match[1]
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", match[2]))
        out.selectors.setdefault(name, set()).update(labels)
        return " "

    text = re.sub(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", selector, text)
    assert "{" not in text, f"a selector without a metric name in {expr}"
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match[1], match[2]
        if call or name.lower() in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue
        out.selectors.setdefault(name, set())
    return out


@dataclass
class Scrape:
    """A /metrics scrape: sample name -> the label names its samples carry, and the sample names
    its `# TYPE` lines declare (a counter `x` declares `x_total`, a histogram `x_bucket`, …)."""

    samples: dict[str, set[str]]
    declared: set[str]

    @classmethod
    def parse(cls, text: str) -> "Scrape":
        declared: set[str] = set()
        for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
            if kind == "counter":
                # OpenMetrics names the family `x` (samples `x_total`), the text format `x_total`.
                declared.add(family if family.endswith("_total") else family + "_total")
            elif kind == "histogram":
                declared |= {family + suffix for suffix in ("_bucket", "_sum", "_count")}
            else:
                declared.add(family)
        samples: dict[str, set[str]] = {}
        for line in text.splitlines():
            match = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? ", line)
            if match:
                labels = set(re.findall(r'([A-Za-z_]\w*)="', match[2] or ""))
                samples.setdefault(match[1], set()).update(labels)
        return cls(samples, declared)

    def missing(self, where: str, expr: str) -> list[str]:
        """What `expr` reads that this scrape does not have: metrics it does not declare, metrics
        without samples (their labels cannot be checked: the scenario must produce them), labels
        the samples do not carry."""
        problems = []
        used = uses(expr)
        known_labels: set[str] = set()
        for name, labels in used.selectors.items():
            if name not in self.declared and name not in self.samples:
                problems.append(f"{where}: metric {name} is not in /metrics")
                continue
            if name not in self.samples:
                problems.append(f"{where}: metric {name} has no samples in this scrape")
                continue
            have = self.samples[name] | TARGET_LABELS
            known_labels |= have
            for label in sorted(labels - have):
                problems.append(f"{where}: {name} has no label {label}")
        for label in sorted(used.grouping - known_labels):
            if known_labels:
                problems.append(f"{where}: groups by {label}, which none of {sorted(used.selectors)} has")
        return problems
