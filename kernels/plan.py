"""Copy plans: a transfer validated once, its device-side address tables, and its tiling.

A plan binds the engine's ``KVBuffers``, the slot of every token and one contiguous slab per
chunk touched (host slabs, or staging pieces in HBM). ``run_copy`` (kernels/ops.py) launches
it for all layers or a layer range, as often as wanted.
"""

from __future__ import annotations

import collections
import enum
import threading
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
import triton

from .copy_kernel import pack_plane_words
from .layout import ACCESS_BYTES, KVBuffers

WORD_BYTES = 4
#: Default cap on persistent programs. With tiles sized by ``_tile_words`` 8 programs move as much
#: as 32 or 132 over PCIe (92-94% of memcpy on an H200, benchmarks/RESULTS.md) and leave the other
#: SMs to the engine's compute.
DEFAULT_MAX_PROGRAMS = 8
#: A program cap no transfer reaches: one program per tile, the whole GPU for microseconds. For
#: copies between HBM buffers (staging <-> slots at a layer boundary), which should end quickly
#: rather than leave SMs free.
FULL_WIDTH = 2**31 - 1
_MAX_BLOCK_WORDS = 512
#: Bytes in flight across all programs: PCIe reads need ~bandwidth x latency (55 GB/s x ~1.5 us
#: ~ 80 KB) outstanding. Fewer programs (to leave SMs to the engine) get bigger tiles, so a
#: small program cap still keeps the link busy. Measured best at 32 programs: 2048-word tiles.
_WORDS_IN_FLIGHT = 32 * 2048
_MIN_TILE_WORDS, _MAX_TILE_WORDS = 2048, 8192


class Direction(str, enum.Enum):
    GATHER = "gather"  # engine slots -> slabs
    SCATTER = "scatter"  # slabs -> engine slots


class Backend(str, enum.Enum):
    AUTO = "auto"  # Triton on CUDA tensors or under TRITON_INTERPRET=1, else the torch reference
    TRITON = "triton"
    TORCH = "torch"


class SlotRangeError(IndexError):
    """A slot index points past the end of the engine's buffers."""


class SlotErrorFlag:
    """A device-side flag the kernel sets when it skipped a slot past the buffer.

    Zeroed on the stream current at its first use (the first launch of a plan that carries it),
    so building a plan queues no GPU work. Reading it syncs with the device: check it off the
    hot path.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._tensor: torch.Tensor | None = None

    @property
    def tensor(self) -> torch.Tensor:
        return self.zeroed_on(None)

    def zeroed_on(self, stream: torch.cuda.Stream | None) -> torch.Tensor:
        """The flag's tensor; created (zeroed) on ``stream`` (default: the current one) if new."""
        if self._tensor is None:
            if stream is None or self.device.type != "cuda":
                self._tensor = torch.zeros(1, dtype=torch.int32, device=self.device)
            else:
                with torch.cuda.stream(stream):
                    self._tensor = torch.zeros(1, dtype=torch.int32, device=self.device)
        return self._tensor

    def is_set(self) -> bool:
        return self._tensor is not None and bool(self._tensor.item())

    def reset(self) -> None:
        if self._tensor is not None:
            self._tensor.zero_()


_anchors: dict[torch.device, torch.Tensor] = {}


def anchor(device: torch.device) -> torch.Tensor:
    """The tensor every kernel address is a word offset from (one per device)."""
    found = _anchors.get(device)
    if found is None:
        found = _anchors[device] = torch.zeros(ACCESS_BYTES // WORD_BYTES, dtype=torch.int32, device=device)
    return found


@dataclass(eq=False)
class _Table:
    tensor: torch.Tensor
    stream: torch.cuda.Stream | None  # the stream its upload was queued on
    ready: torch.cuda.Event | None


#: Address tables by (device, addresses): staging slots and pool slabs sit at fixed addresses, so
#: most plans find their table uploaded already. Entries are only addresses (a table stays right
#: for whatever tensor later lives there); a plan checks its tensors itself.
_TABLES_KEPT = 512
_tables: "collections.OrderedDict[tuple, _Table]" = collections.OrderedDict()
_tables_lock = threading.Lock()


def address_table(addresses: Sequence[int], device: torch.device, stream: torch.cuda.Stream | None = None
                  ) -> torch.Tensor:
    """Word offsets of ``addresses`` from the device's anchor, as an int64 tensor on ``device``,
    usable by work queued on ``stream`` (default: the current stream) from now on.

    A new table is uploaded asynchronously on that stream; a cached one uploaded on another
    stream makes this stream wait for its upload (on the GPU) and stays allocated for it.
    """
    device = torch.device(device)
    key = (device, tuple(addresses))
    with _tables_lock:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
    on_cuda = device.type == "cuda"
    if on_cuda:
        stream = stream if stream is not None else torch.cuda.current_stream(device)
    if table is None:
        base = anchor(device).data_ptr()
        offsets = [(a - base) // WORD_BYTES for a in addresses]
        if not on_cuda:
            table = _Table(torch.tensor(offsets, dtype=torch.int64, device=device), None, None)
        else:
            host = torch.tensor(offsets, dtype=torch.int64).pin_memory()
            with torch.cuda.stream(stream):
                tensor = host.to(device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
            table = _Table(tensor, stream, ready)
        with _tables_lock:
            _tables[key] = table
            while len(_tables) > _TABLES_KEPT:
                _tables.popitem(last=False)
    elif on_cuda and table.stream != stream:
        assert table.ready is not None
        stream.wait_event(table.ready)
        table.tensor.record_stream(stream)
    return table.tensor


@dataclass(frozen=True)
class PlaneTables:
    """The device tables describing a ``KVBuffers`` to the kernel."""

    offsets: torch.Tensor  # int64 [num_layers * num_planes]: plane base word offsets
    words: torch.Tensor  # int64 [num_planes]: pack_plane_words(row words, words before)
    token_words: int  # words of one token in one layer, all planes


# Weak keys: tables must not keep an engine's (possibly rebuilt) KV buffers alive.
_plane_tables: "weakref.WeakKeyDictionary[KVBuffers, PlaneTables]" = weakref.WeakKeyDictionary()


def plane_tables(buffers: KVBuffers) -> PlaneTables:
    tables = _plane_tables.get(buffers)
    if tables is None:
        device = buffers.device
        row_words = [b // WORD_BYTES for b in buffers.geometry.plane_row_bytes]
        packed = [pack_plane_words(r, sum(row_words[:i])) for i, r in enumerate(row_words)]
        base = anchor(device).data_ptr()
        offsets = [(t.data_ptr() - base) // WORD_BYTES for planes in buffers.planes for t in planes]
        tables = _plane_tables[buffers] = PlaneTables(
            offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
            words=torch.tensor(packed, dtype=torch.int64, device=device),
            token_words=sum(row_words),
        )
    return tables


@dataclass(frozen=True)
class Tiling:
    """How one launch cuts a plan's layers into tiles of ``block_t`` rows x ``block_w`` words."""

    block_t: int
    block_w: int
    tiles_per_layer: int
    num_warps: int


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
    #: Launch state kept by kernels/launch.py, by (gather, programs, signal).
    launch_specs: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.slots.numel()

    @property
    def slab_layers(self) -> range:
        return range(self.slab_first_layer, self.slab_first_layer + self.slab_layer_count)

    def slab_table(self, stream: torch.cuda.Stream | None) -> torch.Tensor:
        """The slabs' address table, usable on ``stream`` (see ``address_table``)."""
        return address_table([s.data_ptr() for s in self.slabs], self.buffers.device, stream)


def _tile_words(programs: int) -> int:
    return min(_MAX_TILE_WORDS, max(_MIN_TILE_WORDS, triton.next_power_of_2(_WORDS_IN_FLIGHT // programs)))


def _tile_shape(row_words: Sequence[int], tile_words: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_W): BLOCK_W is the largest power of two dividing every row (rows are
    multiples of 4 words, so it is at least one 16-byte vector)."""
    block_w = _MAX_BLOCK_WORDS
    while any(r % block_w for r in row_words):
        block_w //= 2
    return max(1, tile_words // block_w), block_w


def tiling(plan: CopyPlan, programs: int) -> Tiling:
    row_words = [b // WORD_BYTES for b in plan.buffers.geometry.plane_row_bytes]
    tile_words = _tile_words(programs)
    block_t, block_w = _tile_shape(row_words, tile_words)
    return Tiling(
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
    programs = max_programs or DEFAULT_MAX_PROGRAMS
    # The grid is min(len(layers) * tiles, programs) and tiles go round-robin, so the programs
    # touching one layer's run of `tiles` consecutive tiles are min(tiles, grid) = min(tiles, programs).
    return min(tiling(plan, programs).tiles_per_layer, programs)


def _check_slab(i: int, slab: torch.Tensor, needed: int, device: torch.device) -> None:
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
    if slab.device == device:
        return
    if device.type == "cuda" and slab.device.type == "cpu":
        if not slab.is_pinned():
            raise ValueError(
                f"slabs[{i}]: host memory must be pinned or cudaHostRegister-ed so the GPU can address it; "
                "got pageable memory"
            )
        return
    expected = f"device {device} or pinned host memory" if device.type == "cuda" else f"device {device} like the KV buffers"
    raise ValueError(f"slabs[{i}]: expected {expected}, got {slab.device}")


def check_layers(layers: range, num_layers: int, what: str = "layers") -> None:
    if not isinstance(layers, range) or layers.step != 1:
        raise TypeError(f"{what}: expected a range with step 1, got {layers!r}")
    if len(layers) == 0 or layers.start < 0 or layers.stop > num_layers:
        raise ValueError(f"{what}: expected a non-empty range within [0, {num_layers}), got {layers!r}")


def check_layer_done(layer_done: torch.Tensor, plan: CopyPlan, layers: range) -> None:
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

    Parameters
    ----------
    buffers : KVBuffers
        The engine's KV buffers (``num_layers`` layers of ``num_planes`` planes).
    slots : torch.Tensor
        int64 or int32 ``[num_tokens]`` on the buffers' device; token ``i`` lives in slab
        ``(token_offset + i) // chunk_size`` at row ``(token_offset + i) % chunk_size``. Negative
        slots are skipped (padding); slots past the buffer are skipped and flagged.
    slabs : sequence of torch.Tensor
        One contiguous, 16-byte aligned tensor per chunk touched, each of at least
        ``len(slab_layers) * geometry.layer_bytes(chunk_size)`` bytes: pinned or registered host
        memory, or memory on the buffers' device.
    slab_layers : range, optional
        The layers each slab holds (default: all); a slab holding fewer (a staging piece) starts
        with layer ``slab_layers.start``.
    validate : bool
        Check every slot against the buffer now (a device sync) and raise ``SlotRangeError``
        naming the first bad position.

    Building a plan queues no GPU work when ``slots`` is already contiguous int64.
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
    device = buffers.device
    if slots.device != device:
        raise ValueError(f"slots: expected device {device} like the KV buffers, got {slots.device}")
    slots = slots.to(torch.int64).contiguous()
    slab_layers = range(buffers.num_layers) if slab_layers is None else slab_layers
    check_layers(slab_layers, buffers.num_layers, "slab_layers")
    n = slots.numel()
    needed_slabs = (token_offset + n + chunk_size - 1) // chunk_size if n else 0
    slabs = tuple(slabs)
    if len(slabs) != needed_slabs:
        raise ValueError(
            f"slabs: {n} tokens from row {token_offset} with chunk_size {chunk_size} touch "
            f"{needed_slabs} chunks, got {len(slabs)} slabs"
        )
    needed_bytes = len(slab_layers) * buffers.geometry.layer_bytes(chunk_size)
    for i, slab in enumerate(slabs):
        _check_slab(i, slab, needed_bytes, device)
    if validate and n:
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
        error_flag=error_flag or SlotErrorFlag(device),
    )
