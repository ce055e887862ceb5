"""Layerwise transfers that overlap the forward pass without blocking the CPU.

Two paths, chosen per transfer by ``Transfer.layerwise_path`` (lmc_transfer/transfer/paths.py):

The copy-engine path (``staged``, the default on CUDA): ``start_load`` queues the copy-engine
copies of the first units (a unit is one layer of the load's chunks, or a few layers of a small
load) host -> a bounded HBM staging buffer on a copy stream, as many as the buffer holds. Before
layer ``l`` reads its KV, ``wait_until(l)`` makes the compute stream wait for those copies (on the
GPU) and runs one full-width placement kernel (staging -> the engine's slots, every plane in one
launch, microseconds at HBM speed); each slot freed that way takes the copies of the next unit.
Stores mirror it: ``LayerwiseStore.after_layer(l)`` runs the gather (slots -> staging) on the
compute stream right after the layer wrote its KV, then the copy engine moves staging -> host;
the reservation commits once the last copy has completed. PCIe time uses no SMs.

The zero-copy path: ``start_load`` queues one scatter per layer on a load stream and records one
CUDA event after each; ``wait_until(l)`` makes the compute stream wait on event ``l``. With
``layer_signals=True`` it queues one launch for all layers instead, which counts every layer into a
device counter as it lands, and ``wait_until(l)`` waits on that counter (``cuStreamWaitValue32``:
no launch and no event per layer); it falls back to the per-layer launches where the driver
refuses such waits. Stores queue each layer's gather on a store stream behind an event.

``finish()`` waits for the last layer (that load's own event, never the whole device) and
re-checks the slab generations. Without CUDA both run synchronously with the same API, so
engines and tests behave the same. A ``Transfer`` is not thread-safe: give each scheduler its own.
"""

from __future__ import annotations

import logging

import torch

from lmc_transfer.kernels import Direction, SlotRangeError
from lmc_transfer.kernels.stream_wait import StreamWaitError, stream_wait_supported, wait_counter
from lmc_transfer.store.base import CacheStore, Lease, LoadResult, Reservation
from lmc_transfer.store.slots import chunk_slots, lease_slots
from lmc_transfer.transfer.completion import SlotCheck
from lmc_transfer.transfer.paths import PreparedTransfer, Transfer, TransferPath
from lmc_transfer.transfer.schedule import UnitOrder
from lmc_transfer.transfer.staging import StagedLoad

log = logging.getLogger(__name__)


def _check_layer(layer: int, num_layers: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer: expected an int in [0, {num_layers}), got {layer!r}")


class LayerTransferCounter:
    """Drives one layerwise load at a time (see module docstring)."""

    def __init__(self, transfer: Transfer, *, stream: torch.cuda.Stream | None = None,
                 layer_signals: bool = True) -> None:
        """``stream``: the zero-copy path's load stream (default: a new high-priority one).
        ``layer_signals``: on the zero-copy path, one launch with per-layer device counters
        instead of one launch and one event per layer (module docstring). On by default: on an
        H200 (benchmarks/RESULTS.md, commit d388bf5) 32 one-layer loads of 256 tokens reached 68%
        of memcpy with counters against 43% with events, and beside a Llama-3-8B forward pass
        counters hid more of the load in three cases of four."""
        if not isinstance(transfer, Transfer):
            raise TypeError(f"transfer: expected Transfer, got {type(transfer).__name__}")
        self.transfer = transfer
        self.num_layers = transfer.buffers.num_layers
        self._device = transfer.buffers.device
        self._on_cuda = self._device.type == "cuda"
        # High priority: the forward pass is about to wait on these copies.
        self._stream = stream if stream is not None or not self._on_cuda else torch.cuda.Stream(self._device, priority=-1)
        self._store: CacheStore | None = None
        self._lease: Lease | None = None
        self._prepared: PreparedTransfer | None = None
        self._events: list[torch.cuda.Event] = []
        self._staged: StagedLoad | None = None
        self._check: SlotCheck | None = None
        self._waited = -1
        self._signals = layer_signals and self._on_cuda and stream_wait_supported(self._device)
        self._layer_done: torch.Tensor | None = None  # per-layer counters of the signalled launch
        self._layer_target = 0
        self._waiting_streams: set[int] = set()

    @property
    def uses_layer_signals(self) -> bool:
        """Whether zero-copy loads go as one launch with per-layer counters (else one launch per layer)."""
        return self._signals

    @property
    def in_flight(self) -> bool:
        return self._lease is not None

    def start_load(self, store: CacheStore, lease: Lease, slots: torch.Tensor) -> None:
        """Queue the lease's chunks into ``slots`` layer by layer; returns at once on CUDA."""
        if self._lease is not None:
            raise RuntimeError("start_load: a load is already in flight; call finish() first")
        slots = lease_slots(lease, slots, store.chunk_size, self._device)
        if store.chunk_size != self.transfer.chunk_size:
            raise ValueError(f"store: expected chunk_size {self.transfer.chunk_size} like the transfer, got {store.chunk_size}")
        # Chunks whose slabs already changed are not worth copying.
        intact = store.verify(lease)
        prepared = None
        if intact:
            slabs = store.slab_views(lease.slab_ids[:intact])
            prepared = self.transfer.prepare(slots[: intact * store.chunk_size], slabs)
        self._store, self._lease, self._prepared, self._waited = store, lease, prepared, -1
        if prepared is None:
            return
        self._check = SlotCheck(prepared.plan.slots, self.transfer.buffers.num_slots, padding_ok=True)
        try:
            # A lease covers whole chunks, so the staged path carries all of it (no partial chunks).
            if self.transfer.layerwise_path(prepared) is TransferPath.STAGED:
                schedule = self.transfer.schedule(prepared, range(self.num_layers), UnitOrder.LAYER_MAJOR)
                self._staged = StagedLoad(self.transfer.staging, schedule, prepared.plan, prepared.full_slabs,
                                          prepared.first_full_token)
                self._staged.start()
                return
            if self._stream is None:
                self.transfer.run(prepared, Direction.SCATTER)
                return
            # After prepare, whose slot conversion (if any) is queued on the caller's stream.
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
            if self._signals:
                self._start_signalled(prepared)
                return
            for layer in range(self.num_layers):
                self.transfer.run(prepared, Direction.SCATTER, layers=range(layer, layer + 1), stream=self._stream)
                event = torch.cuda.Event()
                event.record(self._stream)
                self._events.append(event)
        except BaseException:
            # Nothing half-queued may outlive the failure: the caller frees the slots next.
            if self._staged is not None:
                self._staged.abandon()
            if self._stream is not None:
                self._stream.synchronize()
            if self._staged is not None and self._staged.area.copy_stream is not None:
                self._staged.area.copy_stream.synchronize()
            self._reset()
            raise

    def _start_signalled(self, prepared: PreparedTransfer) -> None:
        # Fresh counters per load: a wait still queued for an earlier load never sees these.
        with torch.cuda.stream(self._stream):
            done = torch.zeros(self.num_layers, dtype=torch.int32, device=self._device)
        self._layer_target = self.transfer.run_signalled(prepared, Direction.SCATTER, done, stream=self._stream)
        self._layer_done = done
        event = torch.cuda.Event()
        event.record(self._stream)
        self._events.append(event)

    def _reset(self) -> None:
        self._store, self._lease, self._prepared, self._events, self._waited = None, None, None, [], -1
        self._staged, self._check, self._layer_done, self._waiting_streams = None, None, None, set()

    def _current(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self._device) if self._on_cuda else None

    def wait_until(self, layer: int) -> None:
        """Make the current stream wait until layer ``layer`` has arrived; free when repeated,
        when an earlier call already covered it, or when nothing is being loaded."""
        _check_layer(layer, self.num_layers)
        if layer <= self._waited or (not self._events and self._staged is None):
            return
        current = self._current()
        if self._staged is not None:
            self._place_staged(layer, current)
        elif self._layer_done is not None:
            assert current is not None
            self._wait_signalled(current, layer)
        else:
            assert current is not None
            # Events are recorded in layer order on one stream, so one wait covers all earlier layers.
            current.wait_event(self._events[layer])
        self._waited = layer

    def _place_staged(self, layer: int, stream: torch.cuda.Stream | None) -> None:
        assert self._staged is not None
        self._staged.place_through(self._staged.schedule.last_unit_of_layer(layer), stream)

    def _wait_signalled(self, current: torch.cuda.Stream, layer: int) -> None:
        done = self._layer_done
        assert done is not None
        if current.stream_id not in self._waiting_streams:
            done.record_stream(current)  # queued waits read the counters after this object is gone
            self._waiting_streams.add(current.stream_id)
        try:
            # Different programs carry different layers: each layer up to `layer` needs its own wait.
            for i in range(self._waited + 1, layer + 1):
                wait_counter(current, done, i, self._layer_target)
        except StreamWaitError as exc:
            log.warning("layer waits fell back to waiting for the whole load: %s", exc)
            self._signals = False
            current.wait_event(self._events[-1])

    def finish(self) -> LoadResult:
        """Report the prefix of chunks whose slabs stayed intact, once this load has read them all
        (its own events: on the copy-engine path the last copy, not the forward pass queued since).
        The current stream is ordered after every layer."""
        if self._lease is None or self._store is None:
            raise RuntimeError("finish: no load in flight; call start_load() first")
        if self._staged is not None and self._waited < self.num_layers - 1:
            self._place_staged(self.num_layers - 1, self._current())
        store, lease, prepared, events = self._store, self._lease, self._prepared, self._events
        staged, check = self._staged, self._check
        self._reset()
        if staged is not None:
            if staged.last_fill is not None:
                staged.last_fill.synchronize()
        elif events:
            current = self._current()
            assert current is not None
            current.wait_event(events[-1])
            events[-1].synchronize()
        if check is not None:
            check.raise_if_bad()
        loaded = store.verify(lease) if prepared is not None else 0
        return LoadResult(chunks_loaded=loaded, tokens_loaded=loaded * store.chunk_size)


class LayerwiseStore:
    """Gathers one reservation layer by layer behind the forward pass, then commits it.

    The engine must not reuse ``slots`` before ``finish()`` (or ``abort()``) returned; ``done()``
    says, without blocking, when ``finish()`` would not wait.
    """

    def __init__(
        self,
        transfer: Transfer,
        store: CacheStore,
        reservation: Reservation,
        slots: torch.Tensor,
        *,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """``stream``: the zero-copy path's store stream (default: a new one)."""
        if not isinstance(transfer, Transfer):
            raise TypeError(f"transfer: expected Transfer, got {type(transfer).__name__}")
        if store.chunk_size != transfer.chunk_size:
            raise ValueError(f"store: expected chunk_size {transfer.chunk_size} like the transfer, got {store.chunk_size}")
        self.transfer = transfer
        self.store = store
        self.reservation = reservation
        self._expired = False
        self.num_layers = transfer.buffers.num_layers
        self._device = transfer.buffers.device
        on_cuda = self._device.type == "cuda"
        self._gathered: set[int] = set()
        self._last_event: torch.cuda.Event | None = None
        self._closed = False
        self._prepared: PreparedTransfer | None = None
        self._slot_check: SlotCheck | None = None
        self._units_left: dict[int, int] = {}  # staged: unit index -> its layers not reported yet
        self._staged = False
        if reservation.num_chunks:
            selected = chunk_slots(reservation, slots, store.chunk_size, self._device)
            self._prepared = transfer.prepare(selected, store.slab_views(reservation.slab_ids))
            self._slot_check = SlotCheck(self._prepared.plan.slots, transfer.buffers.num_slots, padding_ok=False)
            # Reserved chunks are whole, so the staged path carries all of them (no partial chunks).
            self._staged = transfer.layerwise_path(self._prepared) is TransferPath.STAGED
        if self._staged:
            assert self._prepared is not None
            schedule = transfer.schedule(self._prepared, range(self.num_layers), UnitOrder.LAYER_MAJOR)
            self._units_left = {unit.index: len(unit.layers) for unit in schedule.units}
        self._stream = stream if stream is not None or not on_cuda or self._staged else torch.cuda.Stream(self._device)

    def after_layer(self, layer: int) -> None:
        """Queue layer ``layer``'s copy behind the work queued so far on the current stream."""
        _check_layer(layer, self.num_layers)
        if self._closed:
            raise RuntimeError("after_layer: this store already finished or aborted")
        if layer in self._gathered:
            raise ValueError(f"layer: {layer} was already stored")
        if self._prepared is not None and not self.store.has_time_for_copy(self.reservation.deadline):
            # Past its deadline the reservation's slabs may go to another writer; a gather still
            # landing then would tear their bytes under a valid generation. Drop the store.
            self._expired = True
        if self._prepared is not None and not self._expired:
            if self._staged:
                self._drain_staged(layer)
            elif self._stream is None:
                self.transfer.run(self._prepared, Direction.GATHER, layers=range(layer, layer + 1))
            else:
                written = torch.cuda.Event()
                written.record(torch.cuda.current_stream(self._device))
                self._stream.wait_event(written)
                self.transfer.run(self._prepared, Direction.GATHER, layers=range(layer, layer + 1), stream=self._stream)
                self._last_event = torch.cuda.Event()
                self._last_event.record(self._stream)
        # Only a layer whose gather was queued counts: finish() must never commit a missing one.
        self._gathered.add(layer)

    def _drain_staged(self, layer: int) -> None:
        """Gather every unit whose last layer this is, on the current stream, then its copies."""
        prepared = self._prepared
        assert prepared is not None
        current = torch.cuda.current_stream(self._device) if self._device.type == "cuda" else None
        area = self.transfer.staging
        schedule = self.transfer.schedule(prepared, range(self.num_layers), UnitOrder.LAYER_MAJOR)
        for unit in schedule.units:
            if layer not in unit.layers:
                continue
            self._units_left[unit.index] -= 1
            if self._units_left[unit.index] == 0:
                unit_plan = area.unit_plan(prepared.plan, unit, prepared.first_full_token)
                # One copy stream: its last event covers every copy queued before.
                self._last_event = area.drain(unit, unit_plan, prepared.full_slabs, current)

    def done(self) -> bool:
        """Whether every layer has been queued and every queued copy has finished (no blocking)."""
        complete = len(self._gathered) == self.num_layers
        copied = self._last_event is None or self._last_event.query()
        return complete and copied and (self._slot_check is None or self._slot_check.ready())

    def finish(self) -> int:
        """Barrier: wait for the copies (this store's own events) and commit; returns the chunks
        committed. Does not wait when ``done()`` said True."""
        if self._closed:
            raise RuntimeError("finish: this store already finished or aborted")
        missing = sorted(set(range(self.num_layers)) - self._gathered)
        if missing:
            self.abort()
            raise ValueError(f"finish: every layer must be stored first, layers {missing} were not")
        self._wait()
        self._closed = True
        if self._prepared is None:
            return 0
        if self._expired:
            self.store.abort(self.reservation)
            return 0
        try:
            assert self._slot_check is not None
            self._slot_check.raise_if_bad()
        except SlotRangeError:
            self.store.abort(self.reservation)
            raise
        return self.store.commit(self.reservation)

    def abort(self) -> None:
        """Give the slabs back once no queued copy can still write into them; idempotent."""
        if self._closed:
            return
        self._wait()
        self._closed = True
        self.store.abort(self.reservation)

    def _wait(self) -> None:
        if self._last_event is not None:
            self._last_event.synchronize()
