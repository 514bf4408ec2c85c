"""Locating the project's binaries (built by scripts/chart-test.sh when cargo is available).

Without cargo (a machine with Python alone) the tests that need them are skipped with a loud
reason; CHART_TEST_REQUIRE_BINARIES=1 (set by scripts/test.sh) turns those skips into failures."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest


def required() -> bool:
    return os.environ.get("CHART_TEST_REQUIRE_BINARIES") == "1"


def binary(env: str, what: str) -> pathlib.Path:
    path = os.environ.get(env)
    if path and pathlib.Path(path).is_file():
        return pathlib.Path(path)
    message = f"{what} not available (set {env}; scripts/chart-test.sh builds it when cargo exists)"
    if required():
        pytest.fail(message)
    pytest.skip(message)


def kubectl() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if found:
        return found
    message = "kubectl not found (Debian: apt-get install kubernetes-client)"
    if required():
        pytest.fail(message)
    pytest.skip(message)
