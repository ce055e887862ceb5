"""The CUDA driver calls made through ctypes: counter waits (kernels/stream_wait.py) and
copy-engine copies by address (``copy_async``).

torch has loaded and initialised the driver already; these calls go to the context current on
the calling thread, so callers make the buffers' device current first (as ``run_copy`` does).
"""

from __future__ import annotations

import ctypes
import functools

import torch


class DriverError(RuntimeError):
    """The CUDA driver refused a call."""


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def function(names: tuple[str, ...], argtypes: tuple) -> ctypes._CFuncPtr:
    """The first of ``names`` the driver exports, typed (versioned entry points first)."""
    lib = _libcuda()
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes = list(argtypes)
            fn.restype = ctypes.c_int
            return fn
    raise DriverError(f"the CUDA driver exports none of {names}")


_MEMCPY_ARGS = (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)


def copy_async(dst: int, src: int, nbytes: int, stream: torch.cuda.Stream) -> None:
    """Queue a copy of ``nbytes`` from address ``src`` to ``dst`` on ``stream`` (``cuMemcpyAsync``:
    unified addresses, so host <-> device in either direction). Pinned or registered host memory
    makes it a copy-engine DMA that uses no SMs; both buffers must stay alive until it ran."""
    status = function(("cuMemcpyAsync",), _MEMCPY_ARGS)(dst, src, nbytes, stream.cuda_stream)
    if status != 0:
        raise DriverError(f"cuMemcpyAsync of {nbytes} bytes from {src:#x} to {dst:#x} returned CUresult {status}")
