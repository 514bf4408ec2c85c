"""examples/: the SessionPolicies satisfy the CRD's structural schema and its CEL rules (the
invalid ones do not), the production values file renders and validates."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, load_values, of_kind, render, strip_meta

EXAMPLES = ROOT / "examples"
VALID = sorted(EXAMPLES.glob("sessionpolicy-*.yaml"))
INVALID = EXAMPLES / "invalid"


def crd_schema() -> dict:
    (crd,) = of_kind(render(load_values(EXAMPLES / "values-production.yaml")), "CustomResourceDefinition")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


def load(path) -> dict:
    (doc,) = list(yaml.safe_load_all(path.read_text()))
    assert doc["apiVersion"] == "sessions.blockyard.io/v1alpha1" and doc["kind"] == "SessionPolicy"
    return doc


def structural_errors(doc: dict) -> list[str]:
    """Types, required fields, enums, patterns — what the API server's schema validation checks
    (`nullable` aside, which the examples do not use)."""
    validator = jsonschema.Draft7Validator(crd_schema())
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def with_defaults(value: Any, schema: dict) -> Any:
    """Structural defaulting, as the API server applies it before CEL validation."""
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


def cel_errors(doc: dict) -> list[str]:
    """Evaluate every x-kubernetes-validations rule of the CRD on the (defaulted) object."""
    env = celpy.Environment()
    errors: list[str] = []

    def walk(value: Any, schema: dict, path: str) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            program = env.program(env.compile(rule["rule"]))
            if not program.evaluate({"self": celpy.json_to_cel(value)}):
                errors.append(f"{path}: {rule.get('message', rule['rule'])}")
        if isinstance(value, dict):
            for key, sub in schema.get("properties", {}).items():
                if key in value:
                    walk(value[key], sub, f"{path}.{key}")
        elif isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                walk(item, schema["items"], f"{path}[{i}]")

    schema = crd_schema()
    walk(with_defaults(doc, schema), schema, "")
    return errors


def test_the_crd_has_cel_rules() -> None:
    text = yaml.safe_dump(crd_schema())
    assert text.count("x-kubernetes-validations") >= 2


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_example_policies_are_valid(path) -> None:
    doc = load(path)
    assert not structural_errors(doc)
    assert not cel_errors(doc)
    assert doc["spec"]["selector"]


def test_invalid_example_is_rejected_by_the_schema() -> None:
    text = "\n".join(structural_errors(load(INVALID / "sessionpolicy-invalid.yaml")))
    assert "'selector' is a required property" in text
    assert "PodIP" in text and "Move" in text and "half an hour" in text


def test_invalid_example_is_rejected_by_the_cel_rules() -> None:
    doc = load(INVALID / "sessionpolicy-invalid-cel.yaml")
    assert not structural_errors(doc), "this example must pass the structural schema"
    errors = "\n".join(cel_errors(doc))
    assert ".spec.selector: selector must name what it selects" in errors
    assert ".spec.workerId: workerId.key is required" in errors
    assert ".spec.idleSweepInterval: must be at least 1s" in errors


def test_every_invalid_example_is_rejected() -> None:
    for path in sorted(INVALID.glob("*.yaml")):
        doc = load(path)
        assert structural_errors(doc) or cel_errors(doc), path.name


def test_examples_cover_a_deployment_and_a_statefulset() -> None:
    names = {p.name for p in VALID}
    assert {"sessionpolicy-deployment.yaml", "sessionpolicy-statefulset.yaml"} <= names


def test_production_values_render_and_validate() -> None:
    values = load_values(EXAMPLES / "values-production.yaml")
    docs = render(values)
    for doc in docs:
        if doc["apiVersion"] != "monitoring.coreos.com/v1":
            kubernetes_validate.validate(strip_meta(doc), "1.34.0", strict=True)
    (dep,) = of_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert not of_kind(docs, "ClusterRole")
    assert of_kind(docs, "NetworkPolicy") and of_kind(docs, "ServiceMonitor")
