"""Under CI (LMC_TRANSFER_REQUIRE_REDIS=1, set by .ci/run) a missing redis-server fails the
remote-tier tests; elsewhere they skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_remote_tier import REQUIRE_REDIS_ENV

REPO = Path(__file__).resolve().parents[1]
ONE_TEST = "tests/test_remote_tier.py::test_round_trip_byte_exact"


def _run_without_redis_server(tmp_path: Path, required: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_REDIS_ENV}
    env["PATH"] = str(tmp_path)  # an empty directory: no redis-server on PATH
    if required:
        env[REQUIRE_REDIS_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", ONE_TEST],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("required", [True, False], ids=["ci", "local"])
def test_missing_redis_server_fails_under_ci_and_skips_elsewhere(tmp_path: Path, required: bool):
    out = _run_without_redis_server(tmp_path, required)
    if required:
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"redis-server is not on PATH and {REQUIRE_REDIS_ENV}=1 requires" in out.stdout
        assert "1 error" in out.stdout  # the fixture that starts redis-server fails
    else:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "1 skipped" in out.stdout
