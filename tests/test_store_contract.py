"""The CacheStore contract both stores share: torch-free types for the daemon."""

from __future__ import annotations

import subprocess
import sys


def test_store_base_imports_no_torch():
    code = "import sys, lmc_transfer.store.base; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
