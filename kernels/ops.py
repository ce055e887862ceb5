"""The public copy calls: ``run_copy`` (a prepared plan) and the one-shot ``gather``/``scatter``.

On CUDA tensors (or under TRITON_INTERPRET=1) they launch the Triton kernel of
kernels/copy_kernel.py, otherwise they run the torch reference (kernels/reference.py).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from .launch import launch, launch_spec
from .layout import KVBuffers
from .plan import (
    DEFAULT_MAX_PROGRAMS,
    Backend,
    CopyPlan,
    Direction,
    SlotErrorFlag,
    check_layer_done,
    check_layers,
    layer_signal_count,
    plan_copy,
)
from .reference import reference_copy


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_triton(plan: CopyPlan, backend: Backend) -> bool:
    if backend is Backend.TORCH:
        return False
    on_cuda = plan.buffers.device.type == "cuda"
    if backend is Backend.TRITON:
        if not (on_cuda or _interpreting()):
            raise ValueError("backend=triton needs CUDA tensors or TRITON_INTERPRET=1, got CPU tensors")
        return True
    return on_cuda or _interpreting()


def run_copy(
    plan: CopyPlan,
    direction: Direction,
    *,
    layers: range | None = None,
    max_programs: int | None = None,
    backend: Backend = Backend.AUTO,
    stream: torch.cuda.Stream | None = None,
    layer_done: torch.Tensor | None = None,
) -> None:
    """Enqueue the copy for ``layers`` (default: every layer the slabs hold) on ``stream``
    (default: the current stream).

    ``max_programs`` caps the persistent grid (default ``DEFAULT_MAX_PROGRAMS``; ``FULL_WIDTH``:
    one program per tile, for copies between HBM buffers). ``layer_done`` (int32, one counter per
    layer of ``layers``): one launch copies every layer in order and counter ``i`` grows by
    ``layer_signal_count(plan, layers, max_programs)`` once layer ``layers[i]`` has landed, with
    release ordering (a scatter's rows are visible to any kernel ordered after the count, e.g. by
    ``cuStreamWaitValue32``; a gather's to the host). Counters only grow: give each launch zeroed
    ones, or wait for the running total. If ``plan_copy`` converted the slots (int32 or strided
    input), that conversion was queued on the stream current then: order ``stream`` after it.
    """
    slab_layers = plan.slab_layers
    layers = slab_layers if layers is None else layers
    check_layers(layers, plan.buffers.num_layers)
    if layers.start < slab_layers.start or layers.stop > slab_layers.stop:
        raise ValueError(f"layers: the slabs hold layers {slab_layers!r}, got {layers!r}")
    if max_programs is not None and (not isinstance(max_programs, int) or max_programs <= 0):
        raise ValueError(f"max_programs: expected a positive int or None, got {max_programs!r}")
    if layer_done is not None:
        check_layer_done(layer_done, plan, layers)
    if plan.num_tokens == 0:
        return
    gather = Direction(direction) is Direction.GATHER
    if not _use_triton(plan, Backend(backend)):
        skipped = reference_copy(plan.buffers, plan.slots, plan.slabs, chunk_size=plan.chunk_size,
                                 token_offset=plan.token_offset, layers=layers,
                                 slab_first_layer=plan.slab_first_layer, gather=gather)
        if skipped:
            plan.error_flag.tensor.fill_(1)
        if layer_done is not None:
            layer_done[: len(layers)] += layer_signal_count(plan, layers, max_programs)
        return
    device = plan.buffers.device
    if device.type == "cuda" and torch.cuda.current_device() != device.index:
        # Launches go to the current device's context: make it the buffers' device.
        with torch.cuda.device(device):
            return run_copy(plan, direction, layers=layers, max_programs=max_programs, backend=backend, stream=stream,
                            layer_done=layer_done)
    programs = max_programs or DEFAULT_MAX_PROGRAMS
    spec = launch_spec(plan, gather, programs, layer_done is not None, stream)
    launch(min(len(layers) * spec.tiles_per_layer, programs), spec, layers, stream, layer_done)


def _one_shot(direction: Direction, doc: str) -> Callable[..., CopyPlan]:
    def copy(
        buffers: KVBuffers,
        slots: torch.Tensor,
        slabs: Sequence[torch.Tensor],
        *,
        chunk_size: int,
        token_offset: int = 0,
        layers: range | None = None,
        validate: bool = False,
        max_programs: int | None = None,
        error_flag: SlotErrorFlag | None = None,
        backend: Backend = Backend.AUTO,
    ) -> CopyPlan:
        plan = plan_copy(buffers, slots, slabs, chunk_size=chunk_size, token_offset=token_offset, validate=validate,
                         error_flag=error_flag)
        run_copy(plan, direction, layers=layers, max_programs=max_programs, backend=backend)
        return plan

    copy.__name__ = copy.__qualname__ = direction.value
    copy.__doc__ = doc + """ on the current stream (see ``plan_copy`` for the arguments); returns the
    plan, reusable with ``run_copy``. Builds no GPU state but the error flag: the slab address
    table is looked up by address (kernels/plan.py, ``address_table``)."""
    return copy


gather = _one_shot(Direction.GATHER, "Copy the rows of ``slots`` from the engine's KV buffers into chunk slabs")
scatter = _one_shot(Direction.SCATTER, "Copy chunk slab rows into the engine's KV buffers at ``slots``")
