"""Executes a staging schedule (lmc_transfer/transfer/schedule.py): the copy engines move slab
pieces host <-> a bounded staging buffer on a copy stream, and one full-width kernel launch per
unit places them into the engine's slots (or gathers them out) at HBM speed.

``StagingArea`` owns the buffer and the copy stream, and guards reuse with ``RegionEvents``:
every byte range of the buffer remembers the event after which its last reader is done, and a
writer waits on the GPU for the ranges it overwrites. A range claimed by a unit whose reader is
not queued yet (a layerwise load between ``start_load`` and ``wait_until``) is *held*; a second
claim on it is refused, never silently ordered wrong.

On CPU tensors the same code runs synchronously: the "copy engine" is ``ctypes.memmove`` and the
kernel runs in Triton's interpreter or as the torch reference, so CI runs this path byte for byte.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Sequence

import torch

from lmc_transfer.kernels import FULL_WIDTH, CopyPlan, Direction, KVBuffers, run_copy
from lmc_transfer.kernels.driver import copy_async
from lmc_transfer.transfer.schedule import StagingSchedule, Unit


class StagingBusy(RuntimeError):
    """A staging range is still held by a unit whose reader has not been queued."""


_HELD = object()  # a region's event while its reader is not queued yet


@dataclass
class _Region:
    start: int
    stop: int
    event: object  # _HELD, or what the next writer waits for (None: nothing)


class RegionEvents:
    """Which event guards each byte range of a buffer; plain bookkeeping, no CUDA calls.

    ``claim(start, stop)`` returns the events a writer of ``[start, stop)`` must wait for and
    holds the range; ``release(start, stop, event)`` records the event after which the range's
    reader is done. Events are opaque (CUDA events, or None on CPU).
    """

    def __init__(self) -> None:
        self._regions: list[_Region] = []

    def claim(self, start: int, stop: int) -> list[object]:
        waits = []
        for r in self._regions:
            if r.start < stop and start < r.stop:
                if r.event is _HELD:
                    raise StagingBusy(f"staging bytes [{start}, {stop}) overlap [{r.start}, {r.stop}), still held by a "
                                      "unit in flight; give each LayerTransferCounter its own Transfer")
                if r.event is not None:
                    waits.append(r.event)
        self._regions = [r for r in self._regions if not (start <= r.start and r.stop <= stop)]
        self._regions.append(_Region(start, stop, _HELD))
        return waits

    def release(self, start: int, stop: int, event: object) -> None:
        for r in self._regions:
            if r.start == start and r.stop == stop and r.event is _HELD:
                r.event = event
                return
        raise ValueError(f"release: no held staging range [{start}, {stop})")

    def held(self) -> list[tuple[int, int]]:
        return [(r.start, r.stop) for r in self._regions if r.event is _HELD]


class StagingArea:
    """The staging buffer of one ``Transfer``, its copy stream and its reuse guard."""

    def __init__(self, buffers: KVBuffers, nbytes: int) -> None:
        device = buffers.device
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        # High priority: a forward pass is about to wait on these copies.
        self.copy_stream = torch.cuda.Stream(device=device, priority=-1) if self.on_cuda else None
        self.regions = RegionEvents()
        self._buffers = buffers

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    # -- the thin device layer -------------------------------------------------

    def record(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _wait(self, stream: torch.cuda.Stream | None, events: Sequence[object]) -> None:
        if stream is not None:
            for event in events:
                if event is not None:
                    stream.wait_event(event)  # type: ignore[arg-type]

    def _copy(self, unit: Unit, slabs: Sequence[torch.Tensor], to_staging: bool) -> None:
        if self.copy_stream is not None and torch.cuda.current_device() != self.device.index:
            # Driver calls go to the current context: make it the buffers' device's.
            with torch.cuda.device(self.device):
                return self._copy(unit, slabs, to_staging)
        base = self.buffer.data_ptr()
        for piece in unit.pieces:
            host = slabs[piece.chunk].data_ptr() + piece.slab_offset
            staging = base + piece.staging_offset
            dst, src = (staging, host) if to_staging else (host, staging)
            if self.copy_stream is None:
                ctypes.memmove(dst, src, piece.nbytes)
            else:
                copy_async(dst, src, piece.nbytes, self.copy_stream)

    def unit_plan(self, plan: CopyPlan, unit: Unit, first_token: int) -> CopyPlan:
        """The kernel's plan for ``unit``: its chunks' slots, the staging slot as their slabs."""
        cs = plan.chunk_size
        run = len(unit.layers) * self._buffers.geometry.layer_bytes(cs)
        start = unit.staging_start
        views = tuple(self.buffer[start + i * run:start + (i + 1) * run] for i in range(len(unit.chunks)))
        t0 = first_token + unit.chunks.start * cs
        return CopyPlan(buffers=self._buffers, slots=plan.slots[t0:t0 + len(unit.chunks) * cs], slabs=views,
                        chunk_size=cs, token_offset=0, slab_first_layer=unit.layers.start,
                        slab_layer_count=len(unit.layers), error_flag=plan.error_flag)

    # -- loads: host -> staging -> slots ---------------------------------------

    def fill(self, unit: Unit, slabs: Sequence[torch.Tensor]) -> torch.cuda.Event | None:
        """Queue the copy-engine copies of ``unit`` into its slot (after the slot's last reader);
        returns the event after which the slot holds them."""
        start = unit.staging_start
        waits = self.regions.claim(start, start + unit.nbytes)
        self._wait(self.copy_stream, waits)
        self._copy(unit, slabs, to_staging=True)
        return self.record(self.copy_stream)

    def place(self, unit: Unit, unit_plan: CopyPlan, filled: torch.cuda.Event | None,
              stream: torch.cuda.Stream | None) -> None:
        """Queue the placement of a filled ``unit`` into the slots on ``stream`` (full width)."""
        self._wait(stream, [filled])
        run_copy(unit_plan, Direction.SCATTER, layers=unit.layers, max_programs=FULL_WIDTH, stream=stream)
        start = unit.staging_start
        self.regions.release(start, start + unit.nbytes, self.record(stream))

    # -- stores: slots -> staging -> host --------------------------------------

    def drain(self, unit: Unit, unit_plan: CopyPlan, slabs: Sequence[torch.Tensor],
              stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """Queue the gather of ``unit`` into its slot on ``stream`` (full width), then its copies to
        the host slabs on the copy stream; returns the event after which the slabs hold it."""
        start = unit.staging_start
        self._wait(stream, self.regions.claim(start, start + unit.nbytes))
        run_copy(unit_plan, Direction.GATHER, layers=unit.layers, max_programs=FULL_WIDTH, stream=stream)
        self._wait(self.copy_stream, [self.record(stream)])
        self._copy(unit, slabs, to_staging=False)
        done = self.record(self.copy_stream)
        self.regions.release(start, start + unit.nbytes, done)
        return done


def run_schedule(area: StagingArea, schedule: StagingSchedule, plan: CopyPlan, slabs: Sequence[torch.Tensor],
                 first_token: int, direction: Direction, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """Queue every unit of ``schedule`` at once (an all-layer staged transfer); returns the event
    after which the last unit landed (a gather's on the copy stream, a scatter's on ``stream``).

    ``slabs`` are the full chunks' slabs, ``first_token`` the position of the first of them in
    ``plan``'s tokens.
    """
    last = None
    for unit in schedule.units:
        unit_plan = area.unit_plan(plan, unit, first_token)
        if direction is Direction.GATHER:
            last = area.drain(unit, unit_plan, slabs, stream)
        else:
            area.place(unit, unit_plan, area.fill(unit, slabs), stream)
    if direction is Direction.SCATTER:
        last = area.record(stream)
    return last


class StagedLoad:
    """A staged load queued unit by unit for a layerwise scheduler.

    ``start`` queues the copies of every unit the buffer has room for; ``place_through(i, stream)``
    queues the placements of units up to ``i`` on ``stream`` (the compute stream, at the layer
    boundary), each behind its copies, and then the copies of the units that take over the slots
    just freed. The copies therefore run ahead of the forward pass by up to a buffer's worth.
    """

    def __init__(self, area: StagingArea, schedule: StagingSchedule, plan: CopyPlan, slabs: Sequence[torch.Tensor],
                 first_token: int) -> None:
        self.area, self.schedule, self.plan, self.slabs, self.first_token = area, schedule, plan, slabs, first_token
        self._filled: dict[int, torch.cuda.Event | None] = {}
        self.next_fill = 0
        self.next_place = 0
        #: After this event every copy queued so far has read its host slab (one copy stream).
        self.last_fill: torch.cuda.Event | None = None

    @property
    def done(self) -> bool:
        return self.next_place == len(self.schedule.units)

    def start(self) -> None:
        self._fill_up_to(min(self.schedule.num_slots, len(self.schedule.units)))

    def place_through(self, index: int, stream: torch.cuda.Stream | None) -> None:
        units = self.schedule.units
        while self.next_place <= index:
            unit = units[self.next_place]
            self.area.place(unit, self.area.unit_plan(self.plan, unit, self.first_token),
                            self._filled.pop(unit.index), stream)
            self.next_place += 1
            self._fill_up_to(min(self.next_place + self.schedule.num_slots, len(units)))

    def abandon(self) -> None:
        """Give back the slots of units filled but never placed (a failed or dropped load): their
        only pending user is their copy, so the copy's event guards them."""
        for index, filled in sorted(self._filled.items()):
            unit = self.schedule.units[index]
            self.area.regions.release(unit.staging_start, unit.staging_start + unit.nbytes, filled)
        self._filled.clear()
        self.next_place = len(self.schedule.units)

    def _fill_up_to(self, stop: int) -> None:
        while self.next_fill < stop:
            unit = self.schedule.units[self.next_fill]
            self._filled[unit.index] = self.last_fill = self.area.fill(unit, self.slabs)
            self.next_fill += 1
