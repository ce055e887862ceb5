"""A non-editable install works outside the repository: the wheel holds every package under its
installed name (``kernels/`` as ``lmc_transfer.kernels``, ``radix/`` as ``lmc_transfer.radix``)
and the example configs, and ``lmc-transfer demo`` runs from it with the shipped MP config.

The wheel is installed with ``--target`` (its dependencies come from this environment): a
fresh venv with torch is the same check but takes minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest_mp import REPO

pytestmark = pytest.mark.timeout(240)

#: Repository folder -> the package it installs as.
PACKAGE_DIRS = {"lmc_transfer": "lmc_transfer", "kernels": "lmc_transfer/kernels", "radix": "lmc_transfer/radix",
                "configs": "lmc_transfer/configs"}


def _pip(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A copy of what the build reads, so the build's own files never land in the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    # No isolation and no index: the build backend of this environment, nothing downloaded.
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(source), cwd=out)
    (built,) = out.glob("lmc_transfer-*.whl")
    return built


def test_wheel_holds_every_module_and_the_example_configs(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, package in PACKAGE_DIRS.items():
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                expected.add(f"{package}/{path.relative_to(REPO / folder).as_posix()}")
    assert {"lmc_transfer/configs/example_config_mp.yaml", "lmc_transfer/configs/example_config_ip.yaml"} <= expected
    assert sorted(expected - names) == []


def test_demo_runs_from_the_installed_wheel_outside_the_repository(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    _pip("install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch reference copies on CPU
    env["PYTHONPATH"] = str(target)
    code = ("import sys, lmc_transfer, lmc_transfer.cli; print(lmc_transfer.__file__, flush=True); "
            "sys.exit(lmc_transfer.cli.main(['demo', '--turns', '1', '--conversations', '1', '--device', 'cpu']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[0].startswith(str(target))  # the wheel's copy, not the checkout
    assert "[daemon] ready" in out.stdout and "OK: every loaded byte matches" in out.stdout
