"""Shared helpers of the chart tests: render the chart with Helm's own Go SDK
(helm-python-sdk, no helm binary) and parse the manifests."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "session-operator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "so"
NAMESPACE = "session-system"

_chart = helm.Chart.load(CHART)

# The one value the chart requires: where the Postgres URL lives.
MINIMAL: dict[str, Any] = {"database": {"existingSecret": "session-store"}}


def load_values(path: pathlib.Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render_files(values: dict[str, Any] | None = None, **opts: Any) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included)."""
    opts.setdefault("name", RELEASE)
    opts.setdefault("namespace", NAMESPACE)
    opts.setdefault("is_install", True)
    return _chart.render(values or {}, **opts)


def render(values: dict[str, Any] | None = None, **opts: Any) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object, hooks included, NOTES.txt excluded."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render_files(values, **opts).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__template__", path)
                docs.append(doc)
    return docs


def strip_meta(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__template__"}


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in of_kind(docs, kind)
        if component is None
        or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = one(docs, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="session")
def chart() -> helm.Chart:
    return _chart


def ci_cases() -> list[Any]:
    return [pytest.param(load_values(p), id=p.name.removesuffix("-values.yaml")) for p in CI_VALUES]
