"""Triton gather/scatter between engine KV slots and chunk slabs, and its launcher.

One kernel serves both directions (``GATHER`` constexpr) and every layout: the
engine side is a table of plane base addresses per layer, the slab side a table
of slab base addresses per chunk. All addresses are passed as int32-word offsets
from one anchor tensor, so the kernel does plain pointer arithmetic from an
argument whose 16-byte alignment Triton knows, and the 16-byte vector accesses
survive (host memory is reached through its unified virtual address).
"""

from __future__ import annotations

import contextlib
import enum
import os
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
import triton
import triton.language as tl

from .layout import ACCESS_BYTES, KVBuffers
from .reference import reference_copy

WORD_BYTES = 4
WORDS_PER_ACCESS = ACCESS_BYTES // WORD_BYTES
#: Default cap on persistent programs. With tiles sized by ``_tile_words`` 8 programs move as much
#: as 32 or 132 (92-94% of memcpy on an H200, benchmarks/RESULTS.md) and leave the other SMs to
#: the engine's compute.
DEFAULT_MAX_PROGRAMS = 8
_MAX_BLOCK_WORDS = 512
#: Bytes in flight across all programs: PCIe reads need ~bandwidth x latency (55 GB/s x ~1.5 us
#: ~ 80 KB) outstanding. Fewer programs (to leave SMs to the engine) get bigger tiles, so a
#: small program cap still keeps the link busy. Measured best at 32 programs: 2048-word tiles.
_WORDS_IN_FLIGHT = 32 * 2048
_MIN_TILE_WORDS, _MAX_TILE_WORDS = 2048, 8192


_INT_ARGS = ("num_tokens", "token_offset", "chunk_size", "layer_start", "num_layers", "slab_first_layer",
             "num_slots", "row_words_0", "row_words_1")


# Integer arguments are not specialised (divisibility hints are given in the kernel instead), so
# one compiled kernel serves every transfer size and the fast launch path below stays valid.
@triton.jit(do_not_specialize=_INT_ARGS)
def _kv_copy_kernel(
    anchor_ptr,  # *int32: every address below is a word offset from this pointer
    plane_off_ptr,  # *int64 [num_layers_total * NUM_PLANES]
    slots_ptr,  # *int64 [num_tokens]
    slab_off_ptr,  # *int64 [num_slabs]
    error_ptr,  # *int32 [1]: set to 1 when a slot is past the buffer
    layer_done_ptr,  # *int32 [num_layers]: with SIGNAL_LAYERS, +1 per program once its share of a layer landed
    num_tokens,
    token_offset,
    chunk_size,
    layer_start,
    num_layers,
    slab_first_layer,
    num_slots,
    row_words_0,
    row_words_1,
    NUM_PLANES: tl.constexpr,
    GATHER: tl.constexpr,
    SIGNAL_LAYERS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    i_prog = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)
    n_tblocks = tl.cdiv(num_tokens, BLOCK_T)
    n_tiles = num_layers * NUM_PLANES * n_tblocks
    layer_words = chunk_size * (row_words_0 + row_words_1)
    o_t = tl.arange(0, BLOCK_T).to(tl.int64)
    o_w = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_W), BLOCK_W), BLOCK_W).to(tl.int64)
    # Tiles run layer-major, so a program that reaches a new layer is done with the previous one.
    i_prev_layer = layer_start - 1 + i_prog * 0
    for i_tile in range(i_prog, n_tiles, n_prog):
        i_tblock = i_tile % n_tblocks
        i_lp = i_tile // n_tblocks
        i_plane = i_lp % NUM_PLANES
        i_layer = layer_start + i_lp // NUM_PLANES
        if SIGNAL_LAYERS:
            if (i_layer != i_prev_layer) & (i_prev_layer >= layer_start):
                _signal_layer(layer_done_ptr + (i_prev_layer - layer_start), GATHER)
            i_prev_layer = i_layer
        row_words = tl.where(i_plane == 0, row_words_0, row_words_1).to(tl.int64)
        plane_in_layer = tl.where(i_plane == 0, 0, chunk_size * row_words_0).to(tl.int64)

        i_tok = i_tblock * BLOCK_T + o_t
        m_tok = i_tok < num_tokens
        b_slot = tl.load(slots_ptr + i_tok, mask=m_tok, other=-1)
        m_bad = m_tok & (b_slot >= num_slots)
        if tl.max(m_bad.to(tl.int32), axis=0) > 0:
            tl.store(error_ptr, 1)
        m_row = m_tok & (b_slot >= 0) & (b_slot < num_slots)

        pos = token_offset + i_tok
        i_slab = pos // chunk_size
        b_slab = tl.load(slab_off_ptr + i_slab, mask=m_row, other=0)
        plane_base = tl.load(plane_off_ptr + i_layer * NUM_PLANES + i_plane)
        o_kv_row = tl.multiple_of(plane_base + b_slot * row_words, 4)
        o_slab_row = tl.multiple_of(
            b_slab + (i_layer - slab_first_layer) * layer_words + plane_in_layer + (pos % chunk_size) * row_words, 4
        )
        for w0 in range(0, row_words, BLOCK_W):
            # BLOCK_W divides every row, so the mask is constant along a row and the
            # accesses stay 16-byte vectors (a per-word mask would split them into 4-byte
            # PCIe transactions, a quarter of the bandwidth for writes to host memory).
            o_word = w0 + o_w
            m = m_row[:, None]
            p_kv = anchor_ptr + (o_kv_row[:, None] + o_word[None, :])
            p_slab = anchor_ptr + (o_slab_row[:, None] + o_word[None, :])
            if GATHER:
                tl.store(p_slab, tl.load(p_kv, mask=m), mask=m)
            else:
                tl.store(p_kv, tl.load(p_slab, mask=m), mask=m)
    if SIGNAL_LAYERS:
        if i_prev_layer >= layer_start:
            _signal_layer(layer_done_ptr + (i_prev_layer - layer_start), GATHER)


@triton.jit
def _signal_layer(p_done, GATHER: tl.constexpr):
    """Count this program's share of a layer as landed, after every thread's stores.

    The barrier orders the whole program's stores before the release; a gather's stores go
    to host memory, so its release is system-wide, a scatter's (into HBM) device-wide.
    """
    tl.debug_barrier()
    if GATHER:
        tl.atomic_add(p_done, 1, sem="release", scope="sys")
    else:
        tl.atomic_add(p_done, 1, sem="release", scope="gpu")


class Direction(str, enum.Enum):
    GATHER = "gather"  # engine slots -> slabs
    SCATTER = "scatter"  # slabs -> engine slots


class Backend(str, enum.Enum):
    AUTO = "auto"  # Triton on CUDA tensors or under TRITON_INTERPRET=1, else the torch reference
    TRITON = "triton"
    TORCH = "torch"


class SlotRangeError(IndexError):
    """A slot index points past the end of the engine's buffers."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_anchors: dict[torch.device, torch.Tensor] = {}


def _anchor(device: torch.device) -> torch.Tensor:
    anchor = _anchors.get(device)
    if anchor is None:
        anchor = torch.zeros(ACCESS_BYTES // WORD_BYTES, dtype=torch.int32, device=device)
        _anchors[device] = anchor
    return anchor


def word_offsets(addresses: Sequence[int], anchor: torch.Tensor, stream: torch.cuda.Stream | None = None
                  ) -> torch.Tensor:
    """An address table on the anchor's device; with ``stream``, copied asynchronously on it
    (the kernel that reads the table runs on that stream), else copied synchronously."""
    base = anchor.data_ptr()
    offsets = [(a - base) // WORD_BYTES for a in addresses]
    if stream is None or not anchor.is_cuda:
        return torch.tensor(offsets, dtype=torch.int64, device=anchor.device)
    host = torch.tensor(offsets, dtype=torch.int64, pin_memory=True)
    with torch.cuda.stream(stream):
        return host.to(anchor.device, non_blocking=True)


# Weak keys: a table must not keep an engine's (possibly rebuilt) KV buffers alive.
_plane_tables: "weakref.WeakKeyDictionary[KVBuffers, torch.Tensor]" = weakref.WeakKeyDictionary()


def _plane_table(buffers: KVBuffers) -> torch.Tensor:
    table = _plane_tables.get(buffers)
    if table is None:
        addresses = [t.data_ptr() for planes in buffers.planes for t in planes]
        table = _plane_tables[buffers] = word_offsets(addresses, _anchor(buffers.device))
    return table


class SlotErrorFlag:
    """A device-side flag the kernel sets when it skipped a slot past the buffer.

    Reading it syncs with the device, so callers check it off the hot path.
    """

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(1, dtype=torch.int32, device=device)

    def is_set(self) -> bool:
        return bool(self.tensor.item())

    def reset(self) -> None:
        self.tensor.zero_()


@dataclass(eq=False)
class CopyPlan:
    """A validated transfer: build it once, then run it for all layers or layer by layer."""

    buffers: KVBuffers
    slots: torch.Tensor
    slabs: tuple[torch.Tensor, ...]
    chunk_size: int
    token_offset: int
    slab_first_layer: int
    slab_layer_count: int
    error_flag: SlotErrorFlag
    slab_table: torch.Tensor | None = None
    slab_table_stream: torch.cuda.Stream | None = None
    slab_table_ready: torch.cuda.Event | None = None
    _specs: dict[tuple[bool, int, bool], "_LaunchSpec"] = field(default_factory=dict)

    @property
    def anchor(self) -> torch.Tensor:
        return _anchor(self.buffers.device)

    def launch_spec(self, gather: bool, programs: int, signal: bool) -> "_LaunchSpec":
        spec = self._specs.get((gather, programs, signal))
        if spec is None:
            spec = self._specs[gather, programs, signal] = _launch_spec(self, gather, programs, signal)
        return spec

    @property
    def num_tokens(self) -> int:
        return self.slots.numel()

    @property
    def nbytes_per_layer(self) -> int:
        return self.num_tokens * self.buffers.geometry.token_bytes_per_layer


def _check_slab(i: int, slab: torch.Tensor, needed: int, buffers: KVBuffers) -> None:
    if not isinstance(slab, torch.Tensor):
        raise TypeError(f"slabs[{i}]: expected a torch.Tensor, got {type(slab).__name__}")
    if not slab.is_contiguous():
        raise ValueError(f"slabs[{i}]: expected a contiguous tensor, got strides {slab.stride()}")
    nbytes = slab.numel() * slab.element_size()
    if nbytes < needed:
        raise ValueError(f"slabs[{i}]: expected at least {needed} bytes, got {nbytes}")
    if slab.data_ptr() % ACCESS_BYTES:
        raise ValueError(
            f"slabs[{i}]: base address must be {ACCESS_BYTES}-byte aligned, got address % {ACCESS_BYTES} = "
            f"{slab.data_ptr() % ACCESS_BYTES}"
        )
    device = buffers.device
    if device.type == "cuda":
        if slab.device.type == "cuda":
            if slab.device != device:
                raise ValueError(f"slabs[{i}]: expected device {device} or pinned host memory, got {slab.device}")
        elif not slab.is_pinned():
            raise ValueError(
                f"slabs[{i}]: host memory must be pinned or cudaHostRegister-ed so the GPU can address it; "
                "got pageable memory"
            )
    elif slab.device != device:
        raise ValueError(f"slabs[{i}]: expected device {device} like the KV buffers, got {slab.device}")


def _check_layers(layers: range, num_layers: int, what: str = "layers") -> None:
    if not isinstance(layers, range) or layers.step != 1:
        raise TypeError(f"{what}: expected a range with step 1, got {layers!r}")
    if len(layers) == 0 or layers.start < 0 or layers.stop > num_layers:
        raise ValueError(f"{what}: expected a non-empty range within [0, {num_layers}), got {layers!r}")


def plan_copy(
    buffers: KVBuffers,
    slots: torch.Tensor,
    slabs: Sequence[torch.Tensor],
    *,
    chunk_size: int,
    token_offset: int = 0,
    slab_layers: range | None = None,
    validate: bool = False,
    error_flag: SlotErrorFlag | None = None,
) -> CopyPlan:
    """Validate a transfer once.

    ``slab_layers`` is the range of layers each slab holds (default: all); a slab
    holding fewer layers (a staging piece) starts with layer ``slab_layers.start``.
    ``validate=True`` checks every slot against the buffer now (a device sync) and
    raises ``SlotRangeError`` naming the first bad position.
    """
    if not isinstance(buffers, KVBuffers):
        raise TypeError(f"buffers: expected KVBuffers, got {type(buffers).__name__}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if not isinstance(token_offset, int) or not 0 <= token_offset < chunk_size:
        raise ValueError(f"token_offset: expected an int in [0, {chunk_size}), got {token_offset!r}")
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots: expected a torch.Tensor, got {type(slots).__name__}")
    if slots.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"slots: expected dtype torch.int64 or torch.int32, got {slots.dtype}")
    if slots.dim() != 1:
        raise ValueError(f"slots: expected a 1-D tensor, got shape {tuple(slots.shape)}")
    if slots.device != buffers.device:
        raise ValueError(f"slots: expected device {buffers.device} like the KV buffers, got {slots.device}")
    slots = slots.to(torch.int64).contiguous()
    slab_layers = range(buffers.num_layers) if slab_layers is None else slab_layers
    _check_layers(slab_layers, buffers.num_layers, "slab_layers")
    geometry = buffers.geometry
    needed_slabs = (token_offset + slots.numel() + chunk_size - 1) // chunk_size if slots.numel() else 0
    slabs = tuple(slabs)
    if len(slabs) != needed_slabs:
        raise ValueError(
            f"slabs: {slots.numel()} tokens from row {token_offset} with chunk_size {chunk_size} touch "
            f"{needed_slabs} chunks, got {len(slabs)} slabs"
        )
    needed_bytes = len(slab_layers) * geometry.layer_bytes(chunk_size)
    for i, slab in enumerate(slabs):
        _check_slab(i, slab, needed_bytes, buffers)
    if validate and slots.numel():
        bad = torch.nonzero(slots >= buffers.num_slots)
        if bad.numel():
            pos = int(bad[0, 0])
            raise SlotRangeError(
                f"slots[{pos}] = {int(slots[pos])} is past the end of the KV buffers ({buffers.num_slots} slots)"
            )
    return CopyPlan(
        buffers=buffers,
        slots=slots,
        slabs=slabs,
        chunk_size=chunk_size,
        token_offset=token_offset,
        slab_first_layer=slab_layers.start,
        slab_layer_count=len(slab_layers),
        error_flag=error_flag or SlotErrorFlag(buffers.device),
    )


def _ensure_slab_table(plan: CopyPlan, anchor: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
    """Upload the slab table on the stream of the first launch; other streams wait for it."""
    if not anchor.is_cuda:
        if plan.slab_table is None:
            plan.slab_table = word_offsets([s.data_ptr() for s in plan.slabs], anchor)
        return
    stream = stream if stream is not None else torch.cuda.current_stream(anchor.device)
    if plan.slab_table is None:
        plan.slab_table = word_offsets([s.data_ptr() for s in plan.slabs], anchor, stream)
        plan.slab_table_stream = stream
        plan.slab_table_ready = torch.cuda.Event()
        plan.slab_table_ready.record(stream)
    elif plan.slab_table_ready is not None and stream != plan.slab_table_stream:
        stream.wait_event(plan.slab_table_ready)
        plan.slab_table.record_stream(stream)


def _use_triton(plan: CopyPlan, backend: Backend) -> bool:
    if backend is Backend.TORCH:
        return False
    on_cuda = plan.buffers.device.type == "cuda"
    if backend is Backend.TRITON:
        if not (on_cuda or _interpreting()):
            raise ValueError("backend=triton needs CUDA tensors or TRITON_INTERPRET=1, got CPU tensors")
        return True
    return on_cuda or _interpreting()


def _tile_words(programs: int) -> int:
    return min(_MAX_TILE_WORDS, max(_MIN_TILE_WORDS, triton.next_power_of_2(_WORDS_IN_FLIGHT // programs)))


def _tile_shape(row_words: Sequence[int], tile_words: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_W): BLOCK_W is the largest power of two dividing every row (rows are
    multiples of 4 words, so it is at least one 16-byte vector)."""
    block_w = _MAX_BLOCK_WORDS
    while any(r % block_w for r in row_words):
        block_w //= 2
    return max(1, tile_words // block_w), block_w


@dataclass(frozen=True)
class _Tiling:
    row_words: tuple[int, ...]
    block_t: int
    block_w: int
    tiles_per_layer: int
    num_warps: int


def _tiling(plan: CopyPlan, programs: int) -> _Tiling:
    row_words = tuple(b // WORD_BYTES for b in plan.buffers.geometry.plane_row_bytes)
    tile_words = _tile_words(programs)
    block_t, block_w = _tile_shape(row_words, tile_words)
    return _Tiling(
        row_words=row_words,
        block_t=block_t,
        block_w=block_w,
        tiles_per_layer=len(row_words) * triton.cdiv(plan.num_tokens, block_t),
        num_warps=4 if tile_words <= _MIN_TILE_WORDS else 8,
    )


def layer_signal_count(plan: CopyPlan, layers: range, max_programs: int | None = None) -> int:
    """What each layer's counter in ``run_copy(..., layer_done=...)`` grows by once the layer
    has landed: one per program that copied part of it (0 for a plan without tokens)."""
    if plan.num_tokens == 0:
        return 0
    tiles = _tiling(plan, max_programs or DEFAULT_MAX_PROGRAMS).tiles_per_layer
    # The grid is min(len(layers) * tiles, programs) and tiles go round-robin, so the programs
    # touching one layer's run of `tiles` consecutive tiles are min(tiles, grid) = min(tiles, programs).
    return min(tiles, max_programs or DEFAULT_MAX_PROGRAMS)


def _check_layer_done(layer_done: torch.Tensor, plan: CopyPlan, layers: range) -> None:
    if not isinstance(layer_done, torch.Tensor):
        raise TypeError(f"layer_done: expected a torch.Tensor, got {type(layer_done).__name__}")
    if layer_done.dtype != torch.int32 or layer_done.dim() != 1 or not layer_done.is_contiguous():
        raise ValueError(
            f"layer_done: expected a contiguous 1-D torch.int32 tensor, got dtype {layer_done.dtype}, "
            f"shape {tuple(layer_done.shape)}, strides {layer_done.stride()}"
        )
    if layer_done.numel() < len(layers):
        raise ValueError(f"layer_done: expected at least {len(layers)} counters (one per layer of {layers!r}), "
                         f"got {layer_done.numel()}")
    if layer_done.device != plan.buffers.device:
        raise ValueError(f"layer_done: expected device {plan.buffers.device} like the KV buffers, got {layer_done.device}")
    if layer_done.data_ptr() % ACCESS_BYTES:
        raise ValueError(f"layer_done: base address must be {ACCESS_BYTES}-byte aligned, got address % {ACCESS_BYTES} = "
                         f"{layer_done.data_ptr() % ACCESS_BYTES}")


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
    (default: the current stream). ``plan_copy`` queued the slots' conversion and the error
    flag's zeroing on the stream that was current then: order ``stream`` after it.

    ``layer_done`` (int32, one counter per layer of ``layers``): one launch copies every layer in
    order and counter ``i`` grows by ``layer_signal_count(plan, layers, max_programs)`` once layer
    ``layers[i]`` has landed, with release ordering (a scatter's rows are visible to any kernel
    ordered after the count, e.g. by ``cuStreamWaitValue32``; a gather's to the host). Counters
    only grow: give each launch zeroed ones, or wait for the running total."""
    first, count = plan.slab_first_layer, plan.slab_layer_count
    layers = range(first, first + count) if layers is None else layers
    _check_layers(layers, plan.buffers.num_layers)
    if layers.start < first or layers.stop > first + count:
        raise ValueError(f"layers: the slabs hold layers {range(first, first + count)!r}, got {layers!r}")
    if max_programs is not None and (not isinstance(max_programs, int) or max_programs <= 0):
        raise ValueError(f"max_programs: expected a positive int or None, got {max_programs!r}")
    if layer_done is not None:
        _check_layer_done(layer_done, plan, layers)
    if plan.num_tokens == 0:
        return
    gather = Direction(direction) is Direction.GATHER
    if not _use_triton(plan, Backend(backend)):
        if reference_copy(
            plan.buffers,
            plan.slots,
            plan.slabs,
            chunk_size=plan.chunk_size,
            token_offset=plan.token_offset,
            layers=layers,
            slab_first_layer=first,
            gather=gather,
        ):
            plan.error_flag.tensor.fill_(1)
        if layer_done is not None:
            layer_done[: len(layers)] += layer_signal_count(plan, layers, max_programs)
        return
    device = plan.anchor.device
    if device.type == "cuda" and torch.cuda.current_device() != device.index:
        # Launches go to the current device's context: make it the buffers' device.
        with torch.cuda.device(device):
            return run_copy(plan, direction, layers=layers, max_programs=max_programs, backend=backend, stream=stream,
                            layer_done=layer_done)
    _ensure_slab_table(plan, plan.anchor, stream)
    programs = max_programs or DEFAULT_MAX_PROGRAMS
    spec = plan.launch_spec(gather, programs, layer_done is not None)
    grid = min(len(layers) * spec.tiles_per_layer, programs)
    _launch(grid, spec, (layers.start, len(layers)), stream, layer_done)


@dataclass(frozen=True)
class _LaunchSpec:
    """Everything about a plan's launch that does not change from layer to layer."""

    pointers: tuple[torch.Tensor, ...]  # all but layer_done, which changes from launch to launch
    head_integers: tuple[int, ...]  # before (layer_start, num_layers)
    tail_integers: tuple[int, ...]  # after them
    constants: tuple[int | bool, ...]
    tiles_per_layer: int
    num_warps: int
    key: tuple


def _launch_spec(plan: CopyPlan, gather: bool, programs: int, signal: bool) -> _LaunchSpec:
    tiling = _tiling(plan, programs)
    row_words = tiling.row_words
    num_planes = len(row_words)
    pointers = (plan.anchor, _plane_table(plan.buffers), plan.slots, plan.slab_table, plan.error_flag.tensor)
    constants = (num_planes, gather, signal, tiling.block_t, tiling.block_w)
    num_warps = tiling.num_warps
    return _LaunchSpec(
        pointers=pointers,
        head_integers=(plan.num_tokens, plan.token_offset, plan.chunk_size),
        tail_integers=(plan.slab_first_layer, plan.buffers.num_slots, row_words[0],
                       row_words[1] if num_planes > 1 else 0),
        constants=constants,
        tiles_per_layer=tiling.tiles_per_layer,
        num_warps=num_warps,
        # Triton types an int argument i32 or i64 by its value: part of what was compiled. A
        # layer_done tensor is always 16-byte aligned (checked), like the error flag it replaces.
        key=(plan.anchor.device, tuple(p.data_ptr() % 16 == 0 for p in pointers), constants, num_warps,
             max(plan.num_tokens, plan.buffers.num_slots, plan.slab_first_layer + plan.slab_layer_count) >= 2**31),
    )


_CONSTEXPR_NAMES = ("NUM_PLANES", "GATHER", "SIGNAL_LAYERS", "BLOCK_T", "BLOCK_W")
_compiled: dict[tuple, object] = {}


#: Launch through the compiled kernel's own launcher once it exists (see ``_launch``);
#: set LMC_TRANSFER_FAST_LAUNCH=0 to always go through ``kernel[grid](...)``.
FAST_LAUNCH = os.environ.get("LMC_TRANSFER_FAST_LAUNCH", "1") != "0"
_fast_launch_broken: str | None = None


def _launch(grid: int, spec: _LaunchSpec, layer_args: tuple[int, int], stream: torch.cuda.Stream | None,
            layer_done: torch.Tensor | None) -> None:
    """Launch, calling the compiled kernel's launcher directly once it exists.

    Triton's ``kernel[grid](...)`` re-binds and re-specialises every argument in Python
    (30-90 us measured on an H200 host); the layerwise path launches once per layer, where
    that costs more than the copy itself (~20 us for 256 tokens of one Llama-8B layer). The
    cache key holds everything Triton specialises on here: the constexprs and each pointer's
    16-byte alignment (integers are not specialised, see ``do_not_specialize``). Triton's launch
    hooks (profilers) are bypassed on this path.
    """
    global _fast_launch_broken
    # Without signals the kernel never touches layer_done: pass the (aligned) error flag in its place.
    done = layer_done if layer_done is not None else spec.pointers[-1]
    args = (*spec.pointers, done, *spec.head_integers, *layer_args, *spec.tail_integers)
    fast = FAST_LAUNCH and _fast_launch_broken is None and spec.pointers[0].is_cuda
    compiled = _compiled.get(spec.key) if fast else None
    if compiled is not None:
        handle = (stream if stream is not None else torch.cuda.current_stream(spec.pointers[0].device)).cuda_stream
        try:
            compiled.run(grid, 1, 1, handle, compiled.function, compiled.packed_metadata, None, None, None,
                         *args, *spec.constants)
            return
        except (TypeError, AttributeError, IndexError) as exc:  # another Triton's launcher signature
            _fast_launch_broken = f"{type(exc).__name__}: {exc}"
            _compiled.clear()
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        compiled = _kv_copy_kernel[(grid,)](*args, **dict(zip(_CONSTEXPR_NAMES, spec.constants)),
                                            num_warps=spec.num_warps)
    if fast and compiled is not None:
        compiled._init_handles()
        _compiled[spec.key] = compiled


def _copy(
    direction: Direction,
    buffers: KVBuffers,
    slots: torch.Tensor,
    slabs: Sequence[torch.Tensor],
    *,
    chunk_size: int,
    token_offset: int,
    layers: range | None,
    validate: bool,
    max_programs: int | None,
    error_flag: SlotErrorFlag | None,
    backend: Backend,
) -> CopyPlan:
    plan = plan_copy(
        buffers, slots, slabs, chunk_size=chunk_size, token_offset=token_offset, validate=validate, error_flag=error_flag
    )
    run_copy(plan, direction, layers=layers, max_programs=max_programs, backend=backend)
    return plan


def gather(
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
    """Copy the rows of ``slots`` from the engine's KV buffers into chunk slabs."""
    return _copy(
        Direction.GATHER, buffers, slots, slabs, chunk_size=chunk_size, token_offset=token_offset, layers=layers,
        validate=validate, max_programs=max_programs, error_flag=error_flag, backend=backend,
    )


def scatter(
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
    """Copy chunk slab rows into the engine's KV buffers at ``slots``."""
    return _copy(
        Direction.SCATTER, buffers, slots, slabs, chunk_size=chunk_size, token_offset=token_offset, layers=layers,
        validate=validate, max_programs=max_programs, error_flag=error_flag, backend=backend,
    )
