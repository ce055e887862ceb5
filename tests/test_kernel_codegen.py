"""What the compiled kernel does on Hopper, checked in its PTX (compiled for sm_90 without a GPU).

The interpreter runs the kernel's logic on CPU but says nothing about the machine code. These
tests pin the properties the GPU numbers depend on: every data access is a 16-byte vector (a
per-word mask once split them into 4-byte PCIe transactions, a quarter of the bandwidth), and a
layer signal is a release-ordered atomic after a barrier over the whole program's stores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .ptx_compile import VARIANTS

ROOT = Path(__file__).resolve().parent.parent
_ACCESS = re.compile(r"\b(ld|st)\.global\.([a-z0-9.]+)")
_ATOMIC = re.compile(r"\b(?:atom|red)\.global\.(gpu|sys)\.release\.add\.u32\b")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")
    proc = subprocess.run([sys.executable, "-m", "tests.ptx_compile", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"compiling for sm_90 failed:\n{proc.stderr[-4000:]}"
    return {stem: (out / f"{stem}.ptx").read_text() for stem in VARIANTS}


def _accesses(text: str) -> list[str]:
    return [f"{op}.{kind}" for op, kind in _ACCESS.findall(text)]


@pytest.mark.parametrize("stem", sorted(VARIANTS))
def test_data_moves_in_16_byte_vectors_only(ptx: dict[str, str], stem: str) -> None:
    accesses = _accesses(ptx[stem])
    assert "ld.v4.b32" in accesses and "st.v4.b32" in accesses
    # 8-byte loads read the slot and address tables; the one 4-byte store is the error flag.
    assert sorted(set(accesses)) == ["ld.b64", "ld.v4.b32", "st.b32", "st.v4.b32"], accesses
    assert accesses.count("st.b32") == 1


@pytest.mark.parametrize("stem", sorted(VARIANTS))
def test_layer_signal_is_a_release_after_a_barrier(ptx: dict[str, str], stem: str) -> None:
    lines = ptx[stem].splitlines()
    atomics = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _ATOMIC.search(line))]
    if not VARIANTS[stem]["SIGNAL_LAYERS"]:
        assert atomics == []
        return
    # Two sites: on moving to the next layer, and after the last tile.
    assert len(atomics) == 2
    # Host-bound rows (gather) need a system-wide release; rows in HBM (scatter) a device-wide one.
    assert {scope for _, scope in atomics} == ({"sys"} if VARIANTS[stem]["GATHER"] else {"gpu"})
    for i, _ in atomics:
        before = [line for line in lines[:i] if "bar.sync" in line or "st.global.v4" in line]
        assert before and "bar.sync" in before[-1], "a layer signal is not behind a barrier over the program's stores"
