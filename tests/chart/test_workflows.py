"""The GitHub Actions workflows (.github/workflows/) lint clean with actionlint and zizmor
(pedantic persona, .github/zizmor.yml), pin every action by commit SHA, and do what the README
says: CI runs the test command, the release builds both architectures, signs, and attaches SBOM
and provenance. They run only in the public CI; here they are linted, not run."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from binaries import required
from conftest import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
ZIZMOR_CONFIG = ROOT / ".github" / "zizmor.yml"


def tool(name: str) -> str:
    """A linter from the chart-test venv (scripts/chart-test.sh installs both)."""
    found = shutil.which(name, path=str(pathlib.Path(sys.executable).parent)) or shutil.which(name)
    if found:
        return found
    message = f"{name} not found (scripts/chart-test.sh installs it into .venv-chart/bin)"
    if required():
        pytest.fail(message)
    pytest.skip(message)


def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps(doc: dict) -> list[dict]:
    return [step for job in doc["jobs"].values() for step in job.get("steps", [])]


def test_actionlint() -> None:
    proc = subprocess.run(
        [tool("actionlint"), "-no-color", *sorted(str(p) for p in WORKFLOWS.glob("*.yml"))],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zizmor() -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run(
        [tool("zizmor"), "--offline", "--persona", "pedantic", "--config", str(ZIZMOR_CONFIG), str(WORKFLOWS)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No findings to report" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_every_action_is_pinned_by_commit_sha() -> None:
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for line in path.read_text().splitlines():
            match = re.search(r"uses:\s*(\S+)(.*)", line)
            if not match:
                continue
            ref, comment = match[1], match[2]
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{path.name}: {ref} is not pinned by SHA"
            assert re.search(r"#\s*v\d+\.\d+\.\d+", comment), f"{path.name}: {ref} lacks its version comment"


def test_ci_runs_the_test_command() -> None:
    doc = workflow("ci.yml")
    assert "./scripts/test.sh" in [s.get("run") for s in steps(doc)]
    assert doc["permissions"] == {}
    assert "pull_request" in doc[True]  # YAML 1.1 reads the key `on` as True


def test_ci_has_go_before_the_test_command() -> None:
    # scripts/test.sh builds kubectl and the control plane from Go modules; the Rust image has no Go.
    names = [s.get("uses", "").split("@")[0] or s.get("run") for s in steps(workflow("ci.yml"))]
    assert "actions/setup-go" in names, names
    assert names.index("actions/setup-go") < names.index("./scripts/test.sh"), names
    setup = next(s for s in steps(workflow("ci.yml")) if s.get("uses", "").startswith("actions/setup-go@"))
    assert setup["with"]["go-version-file"] == "tools/control-plane/go.mod"


def test_release_builds_signs_and_attests() -> None:
    doc = workflow("release.yml")
    assert list(doc[True]["push"]) == ["tags"]
    build = next(s for s in steps(doc) if s.get("id") == "build")
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
    assert build["with"]["push"] is True
    assert build["with"]["sbom"] is True and build["with"]["provenance"] == "mode=max"
    runs = "\n".join(s.get("run", "") for s in steps(doc))
    assert runs.count("cosign sign --yes") == 2, "image and chart are both signed"
    assert "helm push" in runs and "oci://" in runs
    assert "cosign attest" in runs
    for job in doc["jobs"].values():
        assert job["permissions"]["id-token"] == "write"  # keyless signing needs the OIDC token
