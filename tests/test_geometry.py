"""KVGeometry needs no torch: its dtype table must agree with torch's element sizes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmc_transfer.kernels.geometry import DTYPE_BYTES, KVGeometry, LayoutKind


@pytest.mark.parametrize("name", sorted(DTYPE_BYTES))
def test_dtype_table_matches_torch(name):
    assert torch.empty((), dtype=getattr(torch, name)).element_size() == DTYPE_BYTES[name]


def test_unknown_dtype_is_refused_naming_it():
    with pytest.raises(ValueError, match="got 'float13'"):
        KVGeometry(kind=LayoutKind.MLA, num_layers=1, plane_shapes=((1, 64),), dtype="float13")


def test_geometry_imports_no_torch():
    code = "import sys, lmc_transfer.kernels.geometry; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
