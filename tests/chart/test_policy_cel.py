"""The CRD's CEL rules reject what Kubernetes rejects in a label selector, and durations below
their floors — evaluated with cel-python on the generated CRD (crds/), case by case. (An API
server's own evaluation is checked by the control-plane tests; the operator's fallback for
clusters without CEL is `InvalidSpec`, tested in tests/e2e/overlap.rs.)"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import pytest
import yaml

from conftest import ROOT

CRD = ROOT / "crds" / "sessionpolicies.sessions.blockyard.io.yaml"


def spec_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def with_defaults(value: Any, schema: dict) -> Any:
    if isinstance(value, dict):
        value = copy.deepcopy(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = with_defaults(value[key], sub)
    elif isinstance(value, list) and "items" in schema:
        value = [with_defaults(v, schema["items"]) for v in value]
    return value


def cel_errors(spec: dict) -> list[str]:
    env = celpy.Environment()
    errors: list[str] = []

    def walk(value: Any, schema: dict, path: str) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            program = env.program(env.compile(rule["rule"]))
            result = program.evaluate({"self": celpy.json_to_cel(value)})
            if isinstance(result, celpy.CELEvalError) or not result:
                errors.append(f"{path}: {rule['message']}")
        if isinstance(value, dict):
            for key, sub in schema.get("properties", {}).items():
                if key in value:
                    walk(value[key], sub, f"{path}.{key}")
        elif isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                walk(item, schema["items"], f"{path}[{i}]")

    schema = spec_schema()
    walk(with_defaults(spec, schema), schema, "spec")
    return errors


LONG_OK_KEY = "a" * 253 + "/" + "n" * 63

VALID = [
    {"matchLabels": {"app": "w"}},
    {"matchLabels": {"example.com/pool": "", "a.b-c_d": "x"}},
    {"matchLabels": {LONG_OK_KEY: "v"}},
    {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
    {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a"]},
                          {"key": "tier", "operator": "DoesNotExist"}]},
]

INVALID = [
    ({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
     "values may not be specified"),
    ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": ["x"]}]},
     "values may not be specified"),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": []}]},
     "values must be specified"),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn"}]}, "values must be specified"),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, "must name what it selects"),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]},
     "must name what it selects"),
    ({}, "must name what it selects"),
    ({"matchLabels": {}}, "must name what it selects"),
    ({"matchExpressions": [{"key": "-app", "operator": "Exists"}]}, "invalid label key"),
    ({"matchExpressions": [{"key": "Example.com/app", "operator": "Exists"}]}, "invalid label key"),
    ({"matchExpressions": [{"key": "n" * 64, "operator": "Exists"}]}, "invalid label key"),
    ({"matchLabels": {"a" * 254 + "/n": "v"}}, "invalid label key"),
    ({"matchLabels": {"a/b/c": "v"}}, "invalid label key"),
    ({"matchLabels": {"app name": "v"}}, "invalid label key"),
]


@pytest.mark.parametrize("selector", VALID, ids=range(len(VALID)))
def test_kubernetes_selectors_pass(selector) -> None:
    assert cel_errors({"selector": selector}) == []


@pytest.mark.parametrize("selector,message", INVALID, ids=range(len(INVALID)))
def test_selectors_kubernetes_rejects_are_rejected(selector, message) -> None:
    errors = cel_errors({"selector": selector})
    assert any(message in e for e in errors), errors


def test_the_operator_kinds_of_value_are_structural() -> None:
    """Operators are an enum and values a pattern: the structural schema rejects them even
    where CEL is not evaluated."""
    selector = spec_schema()["properties"]["selector"]
    expr = selector["properties"]["matchExpressions"]["items"]["properties"]
    assert expr["operator"]["enum"] == ["In", "NotIn", "Exists", "DoesNotExist"]
    assert expr["values"]["items"]["maxLength"] == 63 and "pattern" in expr["values"]["items"]
    assert selector["properties"]["matchLabels"]["additionalProperties"]["maxLength"] == 63


@pytest.mark.parametrize(
    "field,value,ok",
    [
        ("idleSweepInterval", "1ns", False),
        ("idleSweepInterval", "999ms", False),
        ("idleSweepInterval", "0s", False),
        ("idleSweepInterval", "1s", True),
        ("idleTTL", "0s", True),
        ("idleTTL", "0", True),
        ("idleTTL", "30s", False),
        ("idleTTL", "1m", True),
        ("idleTTL", "8h", True),
    ],
)
def test_duration_floors(field, value, ok) -> None:
    errors = cel_errors({"selector": {"matchLabels": {"a": "b"}}, field: value})
    assert (errors == []) == ok, errors


@pytest.mark.parametrize("value,ok", [("0s", True), ("500ms", False), ("1s", True), ("2m", True)])
def test_replacement_wait_floor(value, ok) -> None:
    errors = cel_errors({"selector": {"matchLabels": {"a": "b"}}, "migration": {"replacementWait": value}})
    assert (errors == []) == ok, errors
