"""The private fast-launch path: call a compiled copy kernel's own launcher directly.

Triton's ``kernel[grid](...)`` re-binds and re-specialises every argument in Python (30-90 us
measured on an H200 host); the layerwise path launches once per layer, where that costs more
than the copy itself (~20 us for 256 tokens of one Llama-8B layer). Once a variant has been
launched through Triton, later launches of the same variant call its compiled launcher with the
positional arguments. Triton's launch hooks (profilers) are bypassed on this path; set
LMC_TRANSFER_FAST_LAUNCH=0 to always go through ``kernel[grid](...)``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .copy_kernel import KernelArgs, KernelConstants, launch_kv_copy
from .plan import CopyPlan, anchor, plane_tables, tiling

FAST_LAUNCH = os.environ.get("LMC_TRANSFER_FAST_LAUNCH", "1") != "0"
#: Why the fast path was turned off (another Triton's launcher signature), or None.
fast_launch_broken: str | None = None
_compiled: dict[tuple, object] = {}


@dataclass(frozen=True)
class LaunchSpec:
    """Everything about a plan's launch that does not change from layer to layer."""

    args: KernelArgs
    constants: KernelConstants
    head: tuple  # args.positional(), built once: what every launch passes before its layer range
    tail: tuple  # constants.positional()
    tiles_per_layer: int
    num_warps: int
    key: tuple  # what Triton specialised the compiled variant on


def launch_spec(plan: CopyPlan, gather: bool, programs: int, signal: bool, stream: torch.cuda.Stream | None
                ) -> LaunchSpec:
    """The plan's launch state for one (direction, program cap, signalling), usable on ``stream``."""
    slab_table = plan.slab_table(stream)
    spec = plan.launch_specs.get((gather, programs, signal))
    if spec is not None and spec.args.slab_offsets is slab_table:
        return spec
    tiles = tiling(plan, programs)
    tables = plane_tables(plan.buffers)
    args = KernelArgs(
        anchor=anchor(plan.buffers.device),
        plane_offsets=tables.offsets,
        plane_words=tables.words,
        slots=plan.slots,
        slab_offsets=slab_table,
        error_flag=plan.error_flag.zeroed_on(stream),
        num_tokens=plan.num_tokens,
        token_offset=plan.token_offset,
        chunk_size=plan.chunk_size,
        slab_first_layer=plan.slab_first_layer,
        num_slots=plan.buffers.num_slots,
        token_words=tables.token_words,
    )
    constants = KernelConstants(NUM_PLANES=len(plan.buffers.geometry.plane_row_bytes), GATHER=gather,
                                SIGNAL_LAYERS=signal, BLOCK_T=tiles.block_t, BLOCK_W=tiles.block_w)
    pointers = [a for a in args.positional() if isinstance(a, torch.Tensor)]
    wide = max(plan.num_tokens, plan.buffers.num_slots, plan.slab_first_layer + plan.slab_layer_count) >= 2**31
    spec = plan.launch_specs[gather, programs, signal] = LaunchSpec(
        args=args,
        constants=constants,
        head=args.positional(),
        tail=constants.positional(),
        tiles_per_layer=tiles.tiles_per_layer,
        num_warps=tiles.num_warps,
        # Triton types an int argument i32 or i64 by its value: part of what was compiled. A
        # layer_done tensor is always 16-byte aligned (checked), like the error flag it replaces.
        key=(args.anchor.device, tuple(p.data_ptr() % 16 == 0 for p in pointers), constants, tiles.num_warps, wide),
    )
    return spec


def launch(grid: int, spec: LaunchSpec, layers: range, stream: torch.cuda.Stream | None,
           layer_done: torch.Tensor | None) -> None:
    """Launch ``grid`` programs over ``layers`` on ``stream`` (default: the current stream)."""
    global fast_launch_broken
    # Without signals the kernel never touches layer_done: pass the (aligned) error flag in its place.
    done = layer_done if layer_done is not None else spec.args.error_flag
    device = spec.args.anchor.device
    fast = FAST_LAUNCH and fast_launch_broken is None and device.type == "cuda"
    compiled = _compiled.get(spec.key) if fast else None
    if compiled is not None:
        handle = (stream if stream is not None else torch.cuda.current_stream(device)).cuda_stream
        try:
            compiled.run(grid, 1, 1, handle, compiled.function, compiled.packed_metadata, None, None, None,
                         *spec.head, done, layers.start, len(layers), *spec.tail)
            return
        except (TypeError, AttributeError, IndexError) as exc:  # another Triton's launcher signature
            fast_launch_broken = f"{type(exc).__name__}: {exc}"
            _compiled.clear()
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        compiled = launch_kv_copy(grid, spec.args, done, layers.start, len(layers), spec.constants,
                                  num_warps=spec.num_warps)
    if fast and compiled is not None:
        compiled._init_handles()
        _compiled[spec.key] = compiled
