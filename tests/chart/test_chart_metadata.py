"""Artifact Hub metadata in Chart.yaml tells the truth: the CRD it lists is the chart's CRD, the
CRD example is a real example policy the CRD accepts (tests/chart/test_emulator.py applies the
examples), the image is the one the release workflow publishes, for the platforms it builds."""

from __future__ import annotations

import yaml

from conftest import CHART, ROOT

CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())
ANNOTATIONS = CHART_YAML["annotations"]


def annotation(key: str):
    return yaml.safe_load(ANNOTATIONS[key])


def test_annotations_parse_and_name_the_operator() -> None:
    assert ANNOTATIONS["artifacthub.io/operator"] == "true"
    assert ANNOTATIONS["artifacthub.io/license"] == "Apache-2.0"
    assert ANNOTATIONS["artifacthub.io/operatorCapabilities"] in (
        "Basic Install", "Seamless Upgrades", "Full Lifecycle", "Deep Insights", "Auto Pilot"
    )
    for link in annotation("artifacthub.io/links"):
        assert link["url"].startswith("https://"), link
        docs = link["url"].split("/blob/main/", 1)
        if len(docs) == 2 and "session-operator" in docs[0]:
            assert (ROOT / docs[1]).exists(), f"{link['url']} names a file the repository lacks"


def test_crds_and_example_match_the_crd() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "sessionpolicies.sessions.blockyard.io.yaml").read_text())
    (listed,) = annotation("artifacthub.io/crds")
    assert listed["name"] == crd["metadata"]["name"]
    assert listed["kind"] == crd["spec"]["names"]["kind"]
    assert listed["version"] == crd["spec"]["versions"][0]["name"]
    (example,) = annotation("artifacthub.io/crdsExamples")
    shipped = yaml.safe_load((ROOT / "examples" / "sessionpolicy-deployment.yaml").read_text())
    assert example == shipped, "artifacthub.io/crdsExamples differs from examples/sessionpolicy-deployment.yaml"


def test_image_is_what_the_release_publishes() -> None:
    (image,) = annotation("artifacthub.io/images")
    assert image["image"].endswith(f"/session-operator:{CHART_YAML['appVersion']}")
    release = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    build = next(s for s in release["jobs"]["image"]["steps"] if s.get("id") == "build")
    assert sorted(image["platforms"]) == sorted(build["with"]["platforms"].split(","))
