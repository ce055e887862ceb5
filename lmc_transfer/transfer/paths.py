"""The two transfer paths above the kernels, and the rule that picks one.

``zero_copy``: the kernel reads/writes host slabs through their device address;
one step, no staging memory; best for small, latency-bound transfers and an idle GPU.

``staged``: the kernel gathers into (scatters from) a ring of GPU staging buffers
at HBM speed, and the copy engines move staging <-> host with cudaMemcpyAsync on a
separate stream, piece by piece, with events guarding buffer reuse. PCIe time then
uses no SMs, so it hides behind a running forward pass. Whole chunks only: the
partial first/last chunk of a transfer goes zero-copy. A staged gather copies whole
slab layers, so slab rows of skipped (negative) slots get the staging buffer's
contents instead of staying unchanged.

``auto`` (``AutoRule``): staged for a gather (store) moving at least 128 MiB through whole
chunks, and for a scatter (load) of at least 512 MiB; zero-copy otherwise. Measured on an H200
(benchmarks/RESULTS.md, commit b82885f): zero-copy is ahead for small transfers (88-90% vs 69-76%
of memcpy at 256 tokens), staged mostly ahead on an idle GPU from 2048 tokens (91-95% vs 88-94%;
96-98% vs 91-95% at 8192); beside a compute
stream staged stores hid better than zero-copy ones, while zero-copy loads with a small program
cap hid completely, so loads switch to staged only where the idle-GPU gain is largest.

On CPU tensors every path is synchronous: the torch reference, or the Triton kernel in the
interpreter under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import torch

from lmc_transfer.kernels import (
    CopyPlan,
    Direction,
    KVBuffers,
    layer_signal_count,
    plan_copy,
    run_copy,
    word_offsets,
)

DEFAULT_STAGING_BYTES = 64 << 20
_STAGING_BUFFERS = 4


@dataclass(frozen=True)
class AutoRule:
    """Smallest whole-chunk byte count of one call that ``auto`` sends down the staged path."""

    gather_min_bytes: int = 128 << 20
    scatter_min_bytes: int = 512 << 20

    def staged(self, direction: Direction, nbytes: int) -> bool:
        limit = self.gather_min_bytes if direction is Direction.GATHER else self.scatter_min_bytes
        return nbytes >= limit


class TransferPath(str, enum.Enum):
    ZERO_COPY = "zero_copy"
    STAGED = "staged"
    AUTO = "auto"


@dataclass(eq=False)
class PreparedTransfer:
    """A validated transfer, reusable layer by layer."""

    plan: CopyPlan
    full_chunks: range  # slab indices holding complete chunks (the staged path's share)
    head: CopyPlan | None  # partial first chunk
    tail: CopyPlan | None  # partial last chunk


class _StagingRing:
    """Fixed GPU staging buffers; each is reused only after its last copy finished."""

    def __init__(self, device: torch.device, total_bytes: int) -> None:
        self.buffer_bytes = total_bytes // _STAGING_BUFFERS
        self.buffers = [torch.empty(self.buffer_bytes, dtype=torch.uint8, device=device) for _ in range(_STAGING_BUFFERS)]
        self.free_events: list[torch.cuda.Event | None] = [None] * _STAGING_BUFFERS
        self.copy_stream = torch.cuda.Stream(device=device, priority=-1)
        self.next = 0
        self.pieces: dict[tuple[int, int, int, int], tuple[list[torch.Tensor], torch.Tensor]] = {}

    def piece(self, index: int, num_chunks: int, layers: range, layer_bytes: int, anchor: torch.Tensor
              ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Staging views for one piece and their address table, built once per piece shape."""
        key = (index, num_chunks, layers.start, len(layers))
        cached = self.pieces.get(key)
        if cached is None:
            piece_bytes = len(layers) * layer_bytes
            staging = self.buffers[index]
            views = [staging[i * piece_bytes:(i + 1) * piece_bytes] for i in range(num_chunks)]
            cached = self.pieces[key] = (views, word_offsets([v.data_ptr() for v in views], anchor))
        return cached

    def acquire(self, writer: torch.cuda.Stream) -> int:
        """Next buffer; ``writer`` (the stream that fills it) waits until its last reader is done."""
        index = self.next
        self.next = (self.next + 1) % _STAGING_BUFFERS
        event = self.free_events[index]
        if event is not None:
            writer.wait_event(event)
        return index


class Transfer:
    """Moves one engine's KV between its GPU slots and host chunk slabs."""

    def __init__(
        self,
        buffers: KVBuffers,
        chunk_size: int,
        *,
        path: TransferPath = TransferPath.AUTO,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        max_programs: int | None = None,
        auto_rule: AutoRule = AutoRule(),
    ) -> None:
        self.buffers = buffers
        self.chunk_size = chunk_size
        self.path = TransferPath(path)
        self.max_programs = max_programs
        self.auto_rule = auto_rule
        self.layer_bytes = buffers.geometry.layer_bytes(chunk_size)
        self._ring: _StagingRing | None = None
        self._staging_bytes = staging_bytes
        if buffers.device.type == "cuda" and self.path is not TransferPath.ZERO_COPY:
            if staging_bytes < _STAGING_BUFFERS * self.layer_bytes:
                raise ValueError(
                    f"staging_bytes: the staged path needs room for {_STAGING_BUFFERS} buffers of at least one "
                    f"chunk layer ({self.layer_bytes} bytes each), got {staging_bytes}"
                )

    # -- public API -------------------------------------------------------

    def prepare(self, slots: torch.Tensor, slabs: Sequence[torch.Tensor], *, token_offset: int = 0,
                validate: bool = False) -> PreparedTransfer:
        plan = plan_copy(self.buffers, slots, slabs, chunk_size=self.chunk_size, token_offset=token_offset,
                         validate=validate)
        n = plan.num_tokens
        cs = self.chunk_size
        head_tokens = 0 if token_offset == 0 else min(n, cs - token_offset)
        full = (n - head_tokens) // cs
        tail_tokens = n - head_tokens - full * cs
        first_full = 1 if head_tokens else 0
        slabs = plan.slabs
        head = tail = None
        if head_tokens:
            head = plan_copy(self.buffers, plan.slots[:head_tokens], slabs[:1], chunk_size=cs,
                             token_offset=token_offset, error_flag=plan.error_flag)
        if tail_tokens:
            tail = plan_copy(self.buffers, plan.slots[n - tail_tokens:], slabs[-1:], chunk_size=cs,
                             error_flag=plan.error_flag)
        return PreparedTransfer(plan=plan, full_chunks=range(first_full, first_full + full), head=head, tail=tail)

    def gather(self, slots: torch.Tensor, slabs: Sequence[torch.Tensor], *, token_offset: int = 0,
               layers: range | None = None, stream: torch.cuda.Stream | None = None) -> PreparedTransfer:
        """GPU slots -> host slabs (asynchronous on ``stream`` on CUDA)."""
        prepared = self.prepare(slots, slabs, token_offset=token_offset)
        self._order_after_prepare(stream)
        self.run(prepared, Direction.GATHER, layers=layers, stream=stream)
        return prepared

    def scatter(self, slots: torch.Tensor, slabs: Sequence[torch.Tensor], *, token_offset: int = 0,
                layers: range | None = None, stream: torch.cuda.Stream | None = None) -> PreparedTransfer:
        """Host slabs -> GPU slots (asynchronous on ``stream`` on CUDA)."""
        prepared = self.prepare(slots, slabs, token_offset=token_offset)
        self._order_after_prepare(stream)
        self.run(prepared, Direction.SCATTER, layers=layers, stream=stream)
        return prepared

    def run(self, prepared: PreparedTransfer, direction: Direction, *, layers: range | None = None,
            stream: torch.cuda.Stream | None = None) -> TransferPath:
        """Enqueue a prepared transfer; returns the path it took."""
        layers = range(self.buffers.num_layers) if layers is None else layers
        path = self.path_for(prepared, direction, layers)
        if path is TransferPath.ZERO_COPY:
            # no stream context here: entering one costs more than this launch on the layerwise path
            run_copy(prepared.plan, direction, layers=layers, max_programs=self.max_programs, stream=stream)
            return path
        stream = stream if stream is not None else torch.cuda.current_stream(self.buffers.device)
        with torch.cuda.stream(stream):
            for part in (prepared.head, prepared.tail):
                if part is not None:
                    run_copy(part, direction, layers=layers, max_programs=self.max_programs)
            self._run_staged(prepared, direction, layers, stream)
        return path

    def run_signalled(self, prepared: PreparedTransfer, direction: Direction, layer_done: torch.Tensor, *,
                      stream: torch.cuda.Stream | None = None) -> int:
        """Enqueue every layer in one zero-copy launch that counts each layer into ``layer_done``
        as it lands (see ``run_copy``); returns the count that means "layer landed"."""
        layers = range(self.buffers.num_layers)
        run_copy(prepared.plan, direction, max_programs=self.max_programs, stream=stream, layer_done=layer_done)
        return layer_signal_count(prepared.plan, layers, self.max_programs)

    def _order_after_prepare(self, stream: torch.cuda.Stream | None) -> None:
        """``prepare`` converts slots and zeroes the error flag on the current stream; a launch
        on another stream must come after that."""
        if stream is not None and self.buffers.device.type == "cuda":
            stream.wait_stream(torch.cuda.current_stream(self.buffers.device))

    def synchronize(self) -> None:
        if self.buffers.device.type == "cuda":
            torch.cuda.synchronize(self.buffers.device)

    # -- internals --------------------------------------------------------

    def path_for(self, prepared: PreparedTransfer, direction: Direction, layers: range) -> TransferPath:
        """The path ``run`` takes for ``prepared`` over ``layers``: zero-copy or staged, never auto."""
        if self.buffers.device.type != "cuda" or len(prepared.full_chunks) == 0:
            return TransferPath.ZERO_COPY
        if self.path is TransferPath.AUTO:
            staged_bytes = len(prepared.full_chunks) * len(layers) * self.layer_bytes
            return TransferPath.STAGED if self.auto_rule.staged(direction, staged_bytes) else TransferPath.ZERO_COPY
        return self.path

    def _ring_for(self) -> _StagingRing:
        if self._ring is None:
            self._ring = _StagingRing(self.buffers.device, self._staging_bytes)
        return self._ring

    def _pieces(self, prepared: PreparedTransfer, layers: range, buffer_bytes: int) -> list[tuple[range, range]]:
        """(slab indices, layers) of each staging piece: whole chunks x a run of layers."""
        layers_per_piece = min(len(layers), buffer_bytes // self.layer_bytes)
        piece_layer_bytes = layers_per_piece * self.layer_bytes
        chunks_per_piece = max(1, buffer_bytes // piece_layer_bytes) if layers_per_piece == len(layers) else 1
        pieces = []
        chunks = prepared.full_chunks
        for c0 in range(chunks.start, chunks.stop, chunks_per_piece):
            chunk_range = range(c0, min(c0 + chunks_per_piece, chunks.stop))
            for l0 in range(layers.start, layers.stop, layers_per_piece):
                pieces.append((chunk_range, range(l0, min(l0 + layers_per_piece, layers.stop))))
        return pieces

    def _run_staged(self, prepared: PreparedTransfer, direction: Direction, layers: range,
                    stream: torch.cuda.Stream) -> None:
        ring = self._ring_for()
        copy_stream = ring.copy_stream
        plan = prepared.plan
        cs = self.chunk_size
        head_tokens = 0 if plan.token_offset == 0 else min(plan.num_tokens, cs - plan.token_offset)
        gather = direction is Direction.GATHER
        # No wait on `stream` before the first host->staging copy of a scatter: it reads only host
        # slabs and a free staging buffer, so it may run ahead of whatever `stream` is doing.
        for chunk_range, piece_layers in self._pieces(prepared, layers, ring.buffer_bytes):
            index = ring.acquire(stream if gather else copy_stream)
            staging_slabs, slab_table = ring.piece(index, len(chunk_range), piece_layers, self.layer_bytes,
                                                   plan.anchor)
            host_pieces = [
                plan.slabs[c][piece_layers.start * self.layer_bytes:piece_layers.stop * self.layer_bytes]
                for c in chunk_range
            ]
            t0 = head_tokens + (chunk_range.start - prepared.full_chunks.start) * cs
            piece_plan = CopyPlan(buffers=self.buffers, slots=plan.slots[t0:t0 + len(chunk_range) * cs],
                                  slabs=tuple(staging_slabs), chunk_size=cs, token_offset=0,
                                  slab_first_layer=piece_layers.start, slab_layer_count=len(piece_layers),
                                  error_flag=plan.error_flag, slab_table=slab_table)
            if gather:
                run_copy(piece_plan, Direction.GATHER, layers=piece_layers, max_programs=self.max_programs)
                copy_stream.wait_stream(stream)
                with torch.cuda.stream(copy_stream):
                    for host, stage in zip(host_pieces, staging_slabs):
                        host.copy_(stage, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(copy_stream)
            else:
                with torch.cuda.stream(copy_stream):
                    for host, stage in zip(host_pieces, staging_slabs):
                        stage.copy_(host, non_blocking=True)
                stream.wait_stream(copy_stream)
                run_copy(piece_plan, Direction.SCATTER, layers=piece_layers, max_programs=self.max_programs)
                done = torch.cuda.Event()
                done.record(stream)
            ring.free_events[index] = done
        stream.wait_stream(copy_stream)
