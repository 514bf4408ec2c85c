"""The image recipe: hadolint-clean, multi-stage, non-root, distroless, and the entrypoint the
chart runs."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from conftest import ROOT, operator_container, render, MINIMAL

HADOLINT = pathlib.Path(sys.executable).with_name("hadolint")
DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_clean() -> None:
    proc = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_multi_stage_non_root_distroless() -> None:
    ins = instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 2 and " AS build" in froms[0]
    assert froms[1].startswith("gcr.io/distroless/") and ":nonroot" in froms[1]
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # The last stage's user is the chart's runAsUser.
    (dep_user,) = {operator_container(render(MINIMAL))["securityContext"]["runAsUser"]}
    assert users[-1] == f"{dep_user}:{dep_user}"


def test_entrypoint_is_what_the_chart_runs() -> None:
    ins = dict(instructions())
    container = operator_container(render(MINIMAL))
    assert ins["ENTRYPOINT"] == '["/usr/local/bin/session-operator"]'
    assert container["command"] == ["/usr/local/bin/session-operator"]
    assert "--locked" in ins["RUN"]


def test_image_builds_the_operator_without_the_lab() -> None:
    # The feature `lab` (default) adds `demo`, `bench` and the API server emulator they run:
    # never in the image.
    run = dict(instructions())["RUN"]
    assert "cargo build" in run and "--no-default-features" in run.split()
    assert "--features" not in run and "--all-features" not in run
    assert "--bin session-operator" in run


def test_dockerignore_keeps_build_outputs_and_secrets_out() -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    for pattern in ("target", ".git", ".venv*", "**/*.pem", "**/*.key"):
        assert pattern in ignore
    # The build needs the whole workspace: never ignore sources, migrations or manifests.
    for needed in ("src", "migrations", "crates", "Cargo.toml", "Cargo.lock", "tests"):
        assert needed not in ignore
