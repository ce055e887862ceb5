"""GPU-side waits on a counter in device memory (``cuStreamWaitValue32``), for consumers of
``run_copy(..., layer_done=...)``: the waiting stream stalls on the GPU, the CPU never blocks,
and one launch can feed many waits (no event, and no kernel launch, per layer).

The driver is reached through ctypes (kernels/driver.py). Every CUDA 12+ driver supports 32-bit stream waits; ``stream_wait_supported`` still probes once per device and
says False where the call fails, and LMC_TRANSFER_STREAM_WAIT=0 turns the waits off.

The producer must be enqueued before the wait: CUDA does not see this dependency, and a wait
queued ahead of its producer on a shared hardware queue would never be satisfied.
"""

from __future__ import annotations

import ctypes
import os

import torch

from .driver import DriverError, function

_WAIT_VALUE_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32_t)(*addr - value) >= 0
_COUNTER_BYTES = 4

_WAIT_ARGS = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)
_supported: dict[int, bool] = {}


class StreamWaitError(DriverError):
    """The driver refused a stream wait."""


def wait_counter(stream: torch.cuda.Stream, counters: torch.Tensor, index: int, value: int) -> None:
    """Make ``stream`` wait (on the GPU) until ``counters[index] >= value`` (int32, cyclic compare).

    ``counters`` must stay allocated until the wait has passed: call ``counters.record_stream(stream)``
    if the caller may drop it earlier.
    """
    if counters.dtype != torch.int32 or not counters.is_cuda or not counters.is_contiguous():
        raise ValueError(f"counters: expected a contiguous torch.int32 CUDA tensor, got {counters.dtype} on "
                         f"{counters.device}")
    if not 0 <= index < counters.numel():
        raise IndexError(f"index: expected an int in [0, {counters.numel()}), got {index!r}")
    if not 0 <= value < 2**31:
        raise ValueError(f"value: expected an int in [0, 2**31), got {value!r}")
    address = counters.data_ptr() + index * _COUNTER_BYTES
    wait = function(("cuStreamWaitValue32_v2", "cuStreamWaitValue32"), _WAIT_ARGS)
    status = wait(ctypes.c_void_p(stream.cuda_stream), address, value, _WAIT_VALUE_GEQ)
    if status != 0:
        raise StreamWaitError(f"cuStreamWaitValue32 on {counters.device} returned CUresult {status}")


def stream_wait_supported(device: torch.device) -> bool:
    """Whether ``wait_counter`` works on ``device`` (probed once: an already satisfied wait)."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("LMC_TRANSFER_STREAM_WAIT", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _supported:
        try:
            with torch.cuda.device(index):
                probe = torch.zeros(1, dtype=torch.int32, device=f"cuda:{index}")
                wait_counter(torch.cuda.current_stream(index), probe, 0, 0)
            _supported[index] = True
        except (OSError, DriverError):
            _supported[index] = False
    return _supported[index]
