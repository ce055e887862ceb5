"""Compile the copy kernel for sm_90 without a GPU and write each variant's PTX to a folder.

Run as ``python -m tests.ptx_compile OUT_DIR`` with TRITON_INTERPRET unset (the interpreter
replaces the kernel by a Python function that cannot be compiled). Used by test_kernel_codegen.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmc_transfer.kernels.copy_kernel import _kv_copy_kernel

#: (file stem, constexpr values): both directions, with and without layer signals, for the
#: widest tile columns (2 KiB rows) and the narrowest (one 16-byte vector per row).
VARIANTS = {
    f"{'gather' if gather else 'scatter'}_{'signal' if signal else 'plain'}_w{block_w}": {
        "NUM_PLANES": 2, "GATHER": gather, "SIGNAL_LAYERS": signal, "BLOCK_T": 8192 // block_w, "BLOCK_W": block_w,
    }
    for gather in (True, False)
    for signal in (True, False)
    for block_w in (512, 4)
}
_INT64_TABLES = ("plane_off_ptr", "plane_words_ptr", "slots_ptr", "slab_off_ptr")


def compile_ptx(constants: dict[str, object]) -> str:
    names = list(inspect.signature(_kv_copy_kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in _INT64_TABLES else "*i32"
        else:
            signature[name] = "i64"
    source = ASTSource(
        fn=_kv_copy_kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr")},
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]


def main(out_dir: str) -> None:
    out = Path(out_dir)
    for stem, constants in VARIANTS.items():
        (out / f"{stem}.ptx").write_text(compile_ptx(constants))


if __name__ == "__main__":
    main(sys.argv[1])
