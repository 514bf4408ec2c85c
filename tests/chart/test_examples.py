"""examples/: the SessionPolicies satisfy the CRD's schema (and the invalid one does not), the
production values file renders and validates."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, load_values, of_kind, render, strip_meta

EXAMPLES = ROOT / "examples"
VALID = sorted(EXAMPLES.glob("sessionpolicy-*.yaml"))
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))


def crd_schema() -> dict:
    (crd,) = of_kind(render(load_values(EXAMPLES / "values-production.yaml")), "CustomResourceDefinition")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


def policy_errors(doc: dict) -> list[str]:
    """Structural schema check (types, required, enums, patterns) as the API server does it.
    CEL rules (x-kubernetes-validations) are not evaluated here."""
    assert doc["apiVersion"] == "sessions.blockyard.io/v1alpha1" and doc["kind"] == "SessionPolicy"
    validator = jsonschema.Draft7Validator(crd_schema())
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_example_policies_are_valid(path) -> None:
    (doc,) = list(yaml.safe_load_all(path.read_text()))
    assert not policy_errors(doc)
    assert doc["spec"]["selector"]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_is_rejected_by_the_schema(path) -> None:
    (doc,) = list(yaml.safe_load_all(path.read_text()))
    errors = policy_errors(doc)
    text = "\n".join(errors)
    assert "'selector' is a required property" in text
    assert "PodIP" in text and "Move" in text and "half an hour" in text


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
