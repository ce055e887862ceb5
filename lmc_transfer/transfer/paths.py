"""The two transfer paths above the kernels, and the rule that picks one.

``zero_copy``: the kernel reads/writes host slabs through their device address; one launch, no
staging memory, a few SMs (``max_programs``) busy for the whole PCIe time.

``staged`` (the copy-engine path): the copy engines move contiguous slab pieces host <-> a bounded
HBM staging buffer (``cuMemcpyAsync`` on a copy stream: no SMs), and one full-width kernel launch
per unit places them into the engine's slots (or gathers them out) at HBM speed, microseconds per
unit. The pieces, their staging offsets and the reuse order are plain data
(lmc_transfer/transfer/schedule.py); lmc_transfer/transfer/staging.py runs them. Whole chunks
only: the partial first/last chunk of a transfer goes zero-copy. A staged gather copies whole slab
layers, so slab rows of skipped (negative) slots get the staging buffer's contents instead of
staying unchanged.

``auto`` (``AutoRule``): per call, by the bytes the call moves through whole chunks; the
layerwise scheduler asks ``layerwise_path`` instead (see ``AutoRule``).

On CPU tensors every path runs synchronously (the torch reference, or the Triton kernel in the
interpreter under TRITON_INTERPRET=1; the staged path's "copy engine" is memmove), so ``auto``
picks zero-copy there and ``staged`` is for tests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from lmc_transfer.kernels import CopyPlan, Direction, KVBuffers, layer_signal_count, plan_copy, run_copy
from lmc_transfer.transfer.schedule import StagingSchedule, UnitOrder, staging_schedule
from lmc_transfer.transfer.staging import StagingArea, run_schedule

if TYPE_CHECKING:
    from lmc_transfer.config import LMCTransferConfig

DEFAULT_STAGING_BYTES = 64 << 20


@dataclass(frozen=True)
class AutoRule:
    """Where ``auto`` sends a call: staged from these many bytes through whole chunks, else zero-copy.

    ``gather_min_bytes``/``scatter_min_bytes``: one all-layer call (``Transfer.run``).
    ``layerwise_min_bytes``: one layer of a layerwise load or store (``Transfer.layerwise_path``).

    Measured on an H200 (benchmarks/RESULTS.md, commit d388bf5), Llama-3-8B and a 61-layer MLA
    model: all-layer scatters are faster staged at every size (88-93% of memcpy at 256 tokens
    against 85-90% zero-copy, 94-98% against 91-93% from 2048); gathers from 2048 tokens (95-98%
    against 94-95%) but not at 256 (79-87% against 86-92%): 128 MiB lies between the two. Layerwise
    stores behind a Llama-3-8B forward pass slowed it by -4..0% staged against 2-4% zero-copy, so
    layerwise transfers take the copy engines whatever their size.
    """

    gather_min_bytes: int = 128 << 20
    scatter_min_bytes: int = 0
    layerwise_min_bytes: int = 0

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
    schedules: dict[tuple[UnitOrder, range], StagingSchedule] = field(default_factory=dict)

    @property
    def first_full_token(self) -> int:
        """Position, in the plan's tokens, of the first token of the first whole chunk."""
        return 0 if self.head is None else self.head.num_tokens

    @property
    def full_slabs(self) -> tuple[torch.Tensor, ...]:
        return self.plan.slabs[self.full_chunks.start:self.full_chunks.stop]


class Transfer:
    """Moves one engine's KV between its GPU slots and host chunk slabs.

    Owns the staging buffer of its staged transfers (allocated on first use, ``staging_bytes``):
    not thread-safe, and a layerwise load holds part of it until its last ``wait_until``, so give
    each ``LayerTransferCounter`` its own ``Transfer``.
    """

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
        self.staging_bytes = staging_bytes
        self._staging: StagingArea | None = None
        if self.path is not TransferPath.ZERO_COPY:
            # The smallest schedule the buffer must hold; raises the error that names the need.
            staging_schedule(1, range(1), self.layer_bytes, staging_bytes, UnitOrder.LAYER_MAJOR)

    # -- public API -------------------------------------------------------

    @classmethod
    def for_config(cls, buffers: KVBuffers, config: "LMCTransferConfig") -> "Transfer":
        """A transfer with the config's path, staging size and program cap."""
        return cls(buffers, config.chunk_size, path=TransferPath(config.transfer_path),
                   staging_bytes=config.staging_bytes, max_programs=config.max_programs)

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
               layers: range | None = None) -> PreparedTransfer:
        """GPU slots -> host slabs, queued on the current stream (at once on CPU)."""
        prepared = self.prepare(slots, slabs, token_offset=token_offset)
        self.run(prepared, Direction.GATHER, layers=layers)
        return prepared

    def scatter(self, slots: torch.Tensor, slabs: Sequence[torch.Tensor], *, token_offset: int = 0,
                layers: range | None = None) -> PreparedTransfer:
        """Host slabs -> GPU slots, queued on the current stream (at once on CPU)."""
        prepared = self.prepare(slots, slabs, token_offset=token_offset)
        self.run(prepared, Direction.SCATTER, layers=layers)
        return prepared

    def run(self, prepared: PreparedTransfer, direction: Direction, *, layers: range | None = None,
            stream: torch.cuda.Stream | None = None) -> TransferPath:
        """Enqueue a prepared transfer on ``stream`` (default: the current stream): once ``stream``
        has passed it, every byte has landed. Returns the path it took."""
        layers = range(self.buffers.num_layers) if layers is None else layers
        path = self.path_for(prepared, direction, layers)
        if path is TransferPath.ZERO_COPY:
            # no stream context here: entering one costs more than this launch on the layerwise path
            run_copy(prepared.plan, direction, layers=layers, max_programs=self.max_programs, stream=stream)
            return path
        if self.buffers.device.type == "cuda" and stream is None:
            stream = torch.cuda.current_stream(self.buffers.device)
        self.run_partial_chunks(prepared, direction, layers, stream)
        schedule = self.schedule(prepared, layers, UnitOrder.CHUNK_MAJOR)
        last = run_schedule(self.staging, schedule, prepared.plan, prepared.full_slabs, prepared.first_full_token,
                            direction, stream)
        if stream is not None and direction is Direction.GATHER:
            stream.wait_event(last)
        return path

    def run_partial_chunks(self, prepared: PreparedTransfer, direction: Direction, layers: range,
                           stream: torch.cuda.Stream | None) -> None:
        """The zero-copy share of a staged transfer: its partial first and last chunks."""
        for part in (prepared.head, prepared.tail):
            if part is not None:
                run_copy(part, direction, layers=layers, max_programs=self.max_programs, stream=stream)

    def run_signalled(self, prepared: PreparedTransfer, direction: Direction, layer_done: torch.Tensor, *,
                      stream: torch.cuda.Stream | None = None) -> int:
        """Enqueue every layer in one zero-copy launch that counts each layer into ``layer_done``
        as it lands (see ``run_copy``); returns the count that means "layer landed"."""
        layers = range(self.buffers.num_layers)
        run_copy(prepared.plan, direction, max_programs=self.max_programs, stream=stream, layer_done=layer_done)
        return layer_signal_count(prepared.plan, layers, self.max_programs)

    def path_for(self, prepared: PreparedTransfer, direction: Direction, layers: range) -> TransferPath:
        """The path ``run`` takes for ``prepared`` over ``layers``: zero-copy or staged, never auto."""
        if len(prepared.full_chunks) == 0:
            return TransferPath.ZERO_COPY
        if self.path is TransferPath.AUTO:
            if self.buffers.device.type != "cuda":
                return TransferPath.ZERO_COPY
            staged_bytes = len(prepared.full_chunks) * len(layers) * self.layer_bytes
            return TransferPath.STAGED if self.auto_rule.staged(direction, staged_bytes) else TransferPath.ZERO_COPY
        return self.path

    def layerwise_path(self, prepared: PreparedTransfer) -> TransferPath:
        """The path of a layerwise load or store of ``prepared``: zero-copy or staged, never auto."""
        if len(prepared.full_chunks) == 0:
            return TransferPath.ZERO_COPY
        if self.path is TransferPath.AUTO:
            if self.buffers.device.type != "cuda":
                return TransferPath.ZERO_COPY
            staged = len(prepared.full_chunks) * self.layer_bytes >= self.auto_rule.layerwise_min_bytes
            return TransferPath.STAGED if staged else TransferPath.ZERO_COPY
        return self.path

    # -- staged path ------------------------------------------------------

    @property
    def staging(self) -> StagingArea:
        if self._staging is None:
            self._staging = StagingArea(self.buffers, self.staging_bytes)
        return self._staging

    def schedule(self, prepared: PreparedTransfer, layers: range, order: UnitOrder) -> StagingSchedule:
        """The staged schedule of ``prepared``'s whole chunks over ``layers`` (built once)."""
        key = (order, layers)
        schedule = prepared.schedules.get(key)
        if schedule is None:
            schedule = prepared.schedules[key] = staging_schedule(len(prepared.full_chunks), layers, self.layer_bytes,
                                                                  self.staging_bytes, order)
        return schedule
