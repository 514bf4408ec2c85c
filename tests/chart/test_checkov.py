"""checkov's Kubernetes checks on every rendering of the matrix, and its Dockerfile checks.

Every skipped check is listed here with the reason it does not apply."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import CHART, MINIMAL, ROOT, ci_cases, deep_merge, load_values, render_files

CHECKOV = pathlib.Path(sys.executable).with_name("checkov")

SKIPS = {
    # Image Pull Policy should be Always: the image is pinned (tag = appVersion, or
    # image.digest); IfNotPresent is the convention of cert-manager's and CloudNativePG's
    # charts and lets images loaded into kind/minikube run. image.pullPolicy=Always is one
    # value away, and test_hardened_values_need_fewer_skips shows the check then passes.
    "CKV_K8S_15": "pinned image, IfNotPresent by convention",
    # Image should use digest: supported through image.digest (see the hardened test below);
    # a chart cannot know the digest of an image the user builds.
    "CKV_K8S_43": "digest is a value (image.digest)",
    # Prefer secrets as files over env vars: `session-operator run` and `migrate` read the
    # store URLs from DATABASE_URL/REDIS_URL (the operator's flag contract). They come from
    # Secrets via secretKeyRef only, never as literals (test_security.py).
    "CKV_K8S_35": "store URLs via secretKeyRef env, the binary's interface",
    # Service account tokens only where necessary: the operator is a Kubernetes controller and
    # needs its token; the migration Job, which does not, has automountServiceAccountToken:
    # false (asserted in test_render.py).
    "CKV_K8S_38": "the operator calls the Kubernetes API",
    # Pods without a NetworkPolicy: networkPolicy.enabled is off by default because the API
    # server's, Postgres' and Redis' addresses differ per cluster (ingress-nginx and
    # cert-manager ship it off too). With it on (ci/monitoring-values.yaml) this check is
    # not skipped and passes for the operator and the migration pods.
    "CKV2_K8S_6": "NetworkPolicy is opt-in",
}


def checkov(path: pathlib.Path, framework: str, skips: set[str]) -> dict:
    cmd = [
        str(CHECKOV),
        "--quiet",
        "--compact",
        "--skip-download",  # offline: no guideline/policy downloads
        "--framework",
        framework,
        "--output",
        "json",
        "-d" if path.is_dir() else "-f",
        str(path),
    ]
    if skips:
        cmd += ["--skip-check", ",".join(sorted(skips))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"BC_SKIP_MAPPING": "TRUE", "PATH": "/usr/bin:/bin", "HOME": str(path.parent)})
    assert proc.stdout.strip(), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    if isinstance(report, list):
        (report,) = [r for r in report if r.get("check_type") == framework]
    return report


def write_render(values: dict, directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir(parents=True)
    for path, text in render_files(values).items():
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        (directory / pathlib.Path(path).name).write_text(text)
    return directory


def failures(report: dict) -> list[str]:
    return [
        f"{f['check_id']} {f['check_name']}: {f['resource']}"
        for f in report["results"]["failed_checks"]
    ]


def skips_for(values: dict, also_enforce: set[str] = frozenset()) -> set[str]:
    skips = set(SKIPS) - set(also_enforce)
    if values.get("networkPolicy", {}).get("enabled"):
        skips.discard("CKV2_K8S_6")
    return skips


HARDENED = deep_merge(
    MINIMAL,
    {
        "image": {"digest": "sha256:" + "0" * 64, "pullPolicy": "Always"},
        "networkPolicy": {"enabled": True},
    },
)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """All checkov runs of this module, started together (checkov is slow to start)."""
    jobs = {p.id: (p.values[0], set()) for p in ci_cases()}
    jobs["hardened"] = (HARDENED, {"CKV_K8S_15", "CKV_K8S_43", "CKV2_K8S_6"})
    jobs["production"] = (load_values(ROOT / "examples" / "values-production.yaml"), set())
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {
            name: pool.submit(
                checkov,
                write_render(values, tmp_path_factory.mktemp(name) / "render"),
                "kubernetes",
                skips_for(values, enforce),
            )
            for name, (values, enforce) in jobs.items()
        }
        futures["dockerfile"] = pool.submit(checkov, ROOT / "Dockerfile", "dockerfile", set())
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", [p.id for p in ci_cases()])
def test_checkov_kubernetes(reports, case) -> None:
    report = reports[case]
    assert report["summary"]["passed"] > 50
    assert report["summary"]["parsing_errors"] == 0
    assert not failures(report), "\n".join(failures(report))


def test_hardened_values_need_fewer_skips(reports) -> None:
    """With a digest, pullPolicy Always and the NetworkPolicy, those three checks pass."""
    report = reports["hardened"]
    assert not failures(report), "\n".join(failures(report))


def test_checkov_dockerfile(reports) -> None:
    report = reports["dockerfile"]
    assert report["summary"]["passed"] > 10
    assert not failures(report), "\n".join(failures(report))


def test_example_production_values_pass_checkov(reports) -> None:
    report = reports["production"]
    assert not failures(report), "\n".join(failures(report))
