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
    if RESULTS.rows:
        print("\n" + RESULTS.heading() + "\n\n" + RESULTS.markdown())
