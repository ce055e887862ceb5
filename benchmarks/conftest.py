import datetime
import os
import subprocess

import pytest
import torch

from .gpu_timing import RESULTS


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS.rows:
        return
    commit = os.environ.get("LMC_BENCH_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    header = (f"### {card}, {datetime.date.today().isoformat()}, commit {commit}, "
              f"torch {torch.__version__}")
    RESULTS.write(header)
    print("\n" + header + "\n\n" + RESULTS.markdown())
