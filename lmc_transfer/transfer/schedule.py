"""The copy-engine schedule of a staged transfer, as plain data (no tensors, no CUDA).

A staged transfer moves whole chunks through a bounded staging buffer in *units*. A unit is a
group of chunks x a run of layers; the staging buffer is cut into ``num_slots`` slots of
``slot_bytes`` and unit ``i`` uses slot ``i % num_slots``, so unit ``i`` may only be written once
unit ``i - num_slots`` is done with the slot (``Unit.reuses``).

Because a slab is layer-major, a unit's share of one chunk (its layers) is one contiguous run of
the slab: one copy-engine copy (a ``Piece``). Inside the slot, the chunks' runs lie back to back,
so the slot looks like a list of slabs holding only the unit's layers, which is exactly what the
copy kernel's plan describes (``slab_layers``): the placement (staging -> slots) and the gather
(slots -> staging) are the ordinary kernel with staging addresses instead of host ones.

Loads: copy engine host -> slot, then placement on the compute stream. Stores: gather on the
compute stream, then copy engine slot -> host. ``lmc_transfer.transfer.staging`` executes this.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

#: All-layer transfers cut units to at most this many bytes (and at least ``_MIN_SLOTS`` slots):
#: small units keep the part that does not overlap (the first unit's gather, the last unit's
#: placement) to a few microseconds of HBM time, large ones keep copies long (few launches).
ALL_LAYER_UNIT_BYTES = 8 << 20
#: Layer-major units of small transfers take several layers, so that one unit (one placement
#: launch, one event pair, its copies) carries at least this much: the CPU cost per unit (~30 us
#: of Python) then stays below the copy time per unit, and only the first wait is longer.
LAYERWISE_UNIT_MIN_BYTES = 4 << 20
_MIN_SLOTS = 2


class UnitOrder(str, enum.Enum):
    """How units follow each other."""

    LAYER_MAJOR = "layer_major"  # layer by layer: a unit's layers are all done before the next unit's start
    CHUNK_MAJOR = "chunk_major"  # as many layers per unit as fit, whole slabs where they fit


@dataclass(frozen=True)
class Piece:
    """One copy-engine copy: ``nbytes`` at ``slab_offset`` of chunk ``chunk``'s slab <-> staging
    ``staging_offset``."""

    chunk: int  # index into the transfer's full chunks
    slab_offset: int
    staging_offset: int
    nbytes: int


@dataclass(frozen=True)
class Unit:
    """One placement (or gather) launch and the copies that feed (or drain) it."""

    index: int
    slot: int
    chunks: range  # indices into the transfer's full chunks (0 = its first whole chunk)
    layers: range
    pieces: tuple[Piece, ...]
    reuses: int | None  # the unit that used this slot before (it must be done with it), or None

    @property
    def staging_start(self) -> int:
        return self.pieces[0].staging_offset

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclass(frozen=True)
class StagingSchedule:
    slot_bytes: int
    num_slots: int
    units: tuple[Unit, ...]

    @functools.cached_property
    def _last_units(self) -> dict[int, int]:
        return {layer: unit.index for unit in self.units for layer in unit.layers}

    def last_unit_of_layer(self, layer: int) -> int:
        """Index of the last unit holding ``layer`` (with ``LAYER_MAJOR`` order every unit up to
        it holds only earlier layers or this one)."""
        last = self._last_units.get(layer)
        if last is None:
            raise ValueError(f"layer: {layer} is not part of this schedule")
        return last


def staging_schedule(num_chunks: int, layers: range, layer_bytes: int, staging_bytes: int, order: UnitOrder,
                     *, unit_bytes: int = ALL_LAYER_UNIT_BYTES,
                     layerwise_min_bytes: int = LAYERWISE_UNIT_MIN_BYTES) -> StagingSchedule:
    """Cut ``num_chunks`` whole chunks x ``layers`` into units for a staging buffer of ``staging_bytes``.

    ``layer_bytes`` is one layer of one chunk (a slab's layer). Slabs hold every layer from 0, so
    layer ``l`` of a chunk starts ``l * layer_bytes`` into its slab. Every slot is at most half
    the buffer. ``CHUNK_MAJOR``: units of at most ``unit_bytes``, whole slabs where they fit.
    ``LAYER_MAJOR``: one layer of as many chunks as fit in a slot; when all chunks fit, as many
    layers as make ``layerwise_min_bytes`` (within the slot).
    """
    if num_chunks <= 0:
        raise ValueError(f"num_chunks: expected a positive int, got {num_chunks!r}")
    if not isinstance(layers, range) or layers.step != 1 or len(layers) == 0 or layers.start < 0:
        raise ValueError(f"layers: expected a non-empty range of layers with step 1, got {layers!r}")
    if layer_bytes <= 0:
        raise ValueError(f"layer_bytes: expected a positive int, got {layer_bytes!r}")
    if staging_bytes < _MIN_SLOTS * layer_bytes:
        raise ValueError(f"staging_bytes: the staged path needs room for {_MIN_SLOTS} slots of at least one chunk "
                         f"layer ({layer_bytes} bytes each), got {staging_bytes}")
    order = UnitOrder(order)
    cap = staging_bytes // _MIN_SLOTS
    if order is UnitOrder.LAYER_MAJOR:
        chunks_per_unit = min(num_chunks, cap // layer_bytes)
        layers_per_unit = 1
        if chunks_per_unit == num_chunks:
            layer_all = num_chunks * layer_bytes
            wanted = -(-layerwise_min_bytes // layer_all)
            layers_per_unit = max(1, min(wanted, len(layers), cap // layer_all))
    else:
        cap = min(cap, max(unit_bytes, layer_bytes))
        layers_per_unit = min(len(layers), cap // layer_bytes)
        whole = layers_per_unit == len(layers)
        chunks_per_unit = min(num_chunks, cap // (layers_per_unit * layer_bytes)) if whole else 1
    run_bytes = layers_per_unit * layer_bytes
    slot_bytes = chunks_per_unit * run_bytes
    num_slots = staging_bytes // slot_bytes
    groups = [range(c, min(c + chunks_per_unit, num_chunks)) for c in range(0, num_chunks, chunks_per_unit)]
    runs = [range(l, min(l + layers_per_unit, layers.stop)) for l in range(layers.start, layers.stop, layers_per_unit)]
    if order is UnitOrder.LAYER_MAJOR:
        shapes = [(group, run) for run in runs for group in groups]
    else:
        shapes = [(group, run) for group in groups for run in runs]
    units = []
    for index, (group, run) in enumerate(shapes):
        slot = index % num_slots
        base = slot * slot_bytes
        nbytes = len(run) * layer_bytes
        pieces = tuple(Piece(chunk=c, slab_offset=run.start * layer_bytes, staging_offset=base + i * nbytes, nbytes=nbytes)
                       for i, c in enumerate(group))
        units.append(Unit(index=index, slot=slot, chunks=group, layers=run, pieces=pieces,
                          reuses=index - num_slots if index >= num_slots else None))
    return StagingSchedule(slot_bytes=slot_bytes, num_slots=num_slots, units=tuple(units))
