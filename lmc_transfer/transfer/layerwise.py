"""Layerwise transfers that overlap the forward pass without blocking the CPU.

Loads: ``LayerTransferCounter.start_load`` queues one scatter per layer on a load
stream and records one CUDA event after each; before layer ``l`` reads its KV,
``wait_until(l)`` makes the compute stream wait on event ``l`` (a GPU-side wait).
With ``layer_signals=True`` it queues one zero-copy launch for all layers instead,
which counts every layer into a device counter as it lands, and ``wait_until(l)``
waits on that counter (``cuStreamWaitValue32``: no launch and no event per layer,
so short layers are no longer bound by the CPU's launch cost); it falls back to the
per-layer launches where the driver refuses such waits or the staged path is taken.
``finish()`` waits for the last layer and re-checks the slab generations.

Stores: ``LayerwiseStore.after_layer(l)`` records an event on the compute stream
once layer ``l`` has written its KV and queues that layer's gather on a store
stream behind it; ``finish()`` is the barrier that commits the reservation.

Without CUDA both run synchronously with the same API, so engines and tests
behave the same. A ``Transfer`` is not thread-safe: give each scheduler its own.
"""

from __future__ import annotations

import logging

import torch

from lmc_transfer.kernels import Direction, SlotRangeError
from lmc_transfer.kernels.stream_wait import StreamWaitError, stream_wait_supported, wait_counter
from lmc_transfer.store.base import CacheStore, Lease, LoadResult, Reservation
from lmc_transfer.store.slots import check_loaded_slots, check_saved_slots, chunk_slots, lease_slots
from lmc_transfer.transfer.paths import PreparedTransfer, Transfer, TransferPath

log = logging.getLogger(__name__)


def _check_layer(layer: int, num_layers: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer: expected an int in [0, {num_layers}), got {layer!r}")


class LayerTransferCounter:
    """Drives one layerwise load at a time (see module docstring)."""

    def __init__(self, transfer: Transfer, *, stream: torch.cuda.Stream | None = None,
                 layer_signals: bool = False) -> None:
        """``layer_signals``: one launch with per-layer device counters instead of one launch and
        one event per layer (module docstring); off by default until measured on a GPU."""
        if not isinstance(transfer, Transfer):
            raise TypeError(f"transfer: expected Transfer, got {type(transfer).__name__}")
        self.transfer = transfer
        self.num_layers = transfer.buffers.num_layers
        self._device = transfer.buffers.device
        on_cuda = self._device.type == "cuda"
        # High priority: the forward pass is about to wait on these copies.
        self._stream = stream if stream is not None or not on_cuda else torch.cuda.Stream(self._device, priority=-1)
        self._store: CacheStore | None = None
        self._lease: Lease | None = None
        self._prepared: PreparedTransfer | None = None
        self._events: list[torch.cuda.Event] = []
        self._waited = -1
        self._signals = layer_signals and on_cuda and stream_wait_supported(self._device)
        self._layer_done: torch.Tensor | None = None  # per-layer counters of the signalled launch
        self._layer_target = 0
        self._waiting_streams: set[int] = set()

    @property
    def uses_layer_signals(self) -> bool:
        """Whether loads go as one launch with per-layer counters (else one launch per layer)."""
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
        try:
            if self._stream is None:
                self.transfer.run(prepared, Direction.SCATTER)
                return
            # After prepare, whose index tables are queued on the caller's stream.
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
            if self._signals and self.transfer.path_for(prepared, Direction.SCATTER, range(1)) is TransferPath.ZERO_COPY:
                self._start_signalled(prepared)
                return
            for layer in range(self.num_layers):
                self.transfer.run(prepared, Direction.SCATTER, layers=range(layer, layer + 1), stream=self._stream)
                event = torch.cuda.Event()
                event.record(self._stream)
                self._events.append(event)
        except BaseException:
            # Nothing half-queued may outlive the failure: the caller frees the slots next.
            if self._stream is not None:
                self._stream.synchronize()
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
        self._layer_done, self._waiting_streams = None, set()

    def wait_until(self, layer: int) -> None:
        """Make the current stream wait until layer ``layer`` has arrived; free when repeated,
        when an earlier call already covered it, or when nothing is being loaded."""
        _check_layer(layer, self.num_layers)
        if layer <= self._waited or not self._events:
            return
        current = torch.cuda.current_stream(self._device)
        if self._layer_done is not None:
            self._wait_signalled(current, layer)
        else:
            # Events are recorded in layer order on one stream, so one wait covers all earlier layers.
            current.wait_event(self._events[layer])
        self._waited = layer

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
        """Wait for the last layer, then report the prefix of chunks whose slabs stayed intact."""
        if self._lease is None or self._store is None:
            raise RuntimeError("finish: no load in flight; call start_load() first")
        store, lease, prepared, events = self._store, self._lease, self._prepared, self._events
        self._reset()
        if events:
            torch.cuda.current_stream(self._device).wait_event(events[-1])
            events[-1].synchronize()
        if prepared is not None and prepared.plan.error_flag.is_set():
            check_loaded_slots(prepared.plan.slots, self.transfer.buffers.num_slots)
        loaded = store.verify(lease) if prepared is not None else 0
        return LoadResult(chunks_loaded=loaded, tokens_loaded=loaded * store.chunk_size)


class LayerwiseStore:
    """Gathers one reservation layer by layer behind the forward pass, then commits it.

    The engine must not reuse ``slots`` before ``finish()`` (or ``abort()``) returned.
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
        self._stream = stream if stream is not None or not on_cuda else torch.cuda.Stream(self._device)
        self._gathered: set[int] = set()
        self._last_event: torch.cuda.Event | None = None
        self._closed = False
        self._prepared: PreparedTransfer | None = None
        if reservation.num_chunks:
            selected = chunk_slots(reservation, slots, store.chunk_size, self._device)
            self._prepared = transfer.prepare(selected, store.slab_views(reservation.slab_ids))

    def after_layer(self, layer: int) -> None:
        """Queue layer ``layer``'s gather once the work queued so far on the current stream is done."""
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
            layers = range(layer, layer + 1)
            if self._stream is None:
                self.transfer.run(self._prepared, Direction.GATHER, layers=layers)
            else:
                written = torch.cuda.Event()
                written.record(torch.cuda.current_stream(self._device))
                self._stream.wait_event(written)
                self.transfer.run(self._prepared, Direction.GATHER, layers=layers, stream=self._stream)
                self._last_event = torch.cuda.Event()
                self._last_event.record(self._stream)
        # Only a layer whose gather was queued counts: finish() must never commit a missing one.
        self._gathered.add(layer)

    def done(self) -> bool:
        """Whether every layer has been queued and every queued gather has finished (no blocking)."""
        complete = len(self._gathered) == self.num_layers
        return complete and (self._last_event is None or self._last_event.query())

    def finish(self) -> int:
        """Barrier: wait for the gathers and commit; returns the chunks committed."""
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
            check_saved_slots(self._prepared.plan.slots, self.transfer.buffers.num_slots)
        except SlotRangeError:
            self.store.abort(self.reservation)
            raise
        return self.store.commit(self.reservation)

    def abort(self) -> None:
        """Give the slabs back once no queued gather can still write into them; idempotent."""
        if self._closed:
            return
        self._wait()
        self._closed = True
        self.store.abort(self.reservation)

    def _wait(self) -> None:
        if self._last_event is not None:
            self._last_event.synchronize()
