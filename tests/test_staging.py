"""The copy-engine (staged) path's pieces on CPU: the schedule as plain data, the staging reuse
guard, and the executor (memmove for the copy engine, the kernel under the interpreter)."""

from __future__ import annotations

import pytest
import torch

from lmc_transfer.kernels import Direction, LayoutKind
from lmc_transfer.transfer.paths import Transfer, TransferPath
from lmc_transfer.transfer.schedule import UnitOrder, staging_schedule
from lmc_transfer.transfer.staging import RegionEvents, StagedLoad, StagingBusy

from .kv_fixtures import buffer_bytes, make_buffers, random_slabs
from .test_kernels import _oracle_gather

LAYER = 1000  # bytes of one layer of one chunk in the schedule tests


def _covered(schedule, num_chunks: int, layers: range) -> dict[tuple[int, int], int]:
    """(chunk, layer) -> times a piece carries it, from the pieces' byte ranges alone."""
    seen: dict[tuple[int, int], int] = {}
    for unit in schedule.units:
        for piece in unit.pieces:
            assert piece.slab_offset % LAYER == 0 and piece.nbytes % LAYER == 0
            for layer in range(piece.slab_offset // LAYER, (piece.slab_offset + piece.nbytes) // LAYER):
                seen[piece.chunk, layer] = seen.get((piece.chunk, layer), 0) + 1
    return seen


@pytest.mark.parametrize("order", list(UnitOrder))
@pytest.mark.parametrize("num_chunks, staging", [(1, 2 * LAYER), (3, 64 * LAYER), (7, 9 * LAYER), (40, 10 * LAYER)])
def test_schedule_moves_every_chunk_layer_once_inside_its_slot(order, num_chunks, staging):
    layers = range(2, 11)
    schedule = staging_schedule(num_chunks, layers, LAYER, staging, order, unit_bytes=4 * LAYER,
                                layerwise_min_bytes=3 * LAYER)
    assert _covered(schedule, num_chunks, layers) == {(c, l): 1 for c in range(num_chunks) for l in layers}
    assert schedule.num_slots >= 2 and schedule.num_slots * schedule.slot_bytes <= staging
    for unit in schedule.units:
        assert unit.slot == unit.index % schedule.num_slots
        assert unit.reuses == (unit.index - schedule.num_slots if unit.index >= schedule.num_slots else None)
        lo, hi = unit.slot * schedule.slot_bytes, (unit.slot + 1) * schedule.slot_bytes
        offsets = [p.staging_offset for p in unit.pieces]
        # Back to back from the slot's start, in chunk order: the slot reads as a list of slabs.
        assert offsets == [lo + i * len(unit.layers) * LAYER for i in range(len(unit.pieces))]
        assert unit.staging_start + unit.nbytes <= hi
        assert [p.chunk for p in unit.pieces] == list(unit.chunks)
        assert all(p.nbytes == len(unit.layers) * LAYER and p.slab_offset == unit.layers.start * LAYER
                   for p in unit.pieces)


def test_layer_major_units_finish_each_layer_before_the_next():
    schedule = staging_schedule(5, range(6), LAYER, 4 * LAYER, UnitOrder.LAYER_MAJOR)
    # Two chunks fit a slot (half the buffer): 3 groups per layer, one layer per unit.
    assert [(u.chunks, u.layers) for u in schedule.units[:4]] == [
        (range(0, 2), range(0, 1)), (range(2, 4), range(0, 1)), (range(4, 5), range(0, 1)), (range(0, 2), range(1, 2))]
    assert schedule.num_slots == 2
    assert [schedule.last_unit_of_layer(layer) for layer in range(6)] == [2, 5, 8, 11, 14, 17]
    with pytest.raises(ValueError, match="layer: 6 is not part of this schedule"):
        schedule.last_unit_of_layer(6)


def test_small_layerwise_transfers_take_several_layers_per_unit():
    schedule = staging_schedule(2, range(8), LAYER, 100 * LAYER, UnitOrder.LAYER_MAJOR, layerwise_min_bytes=5 * LAYER)
    # 2 chunks x 1 layer = 2000 bytes; 5000 wanted -> 3 layers per unit.
    assert [u.layers for u in schedule.units] == [range(0, 3), range(3, 6), range(6, 8)]
    assert [schedule.last_unit_of_layer(layer) for layer in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]


def test_chunk_major_units_take_whole_slabs_where_they_fit():
    whole = staging_schedule(6, range(4), LAYER, 64 * LAYER, UnitOrder.CHUNK_MAJOR, unit_bytes=8 * LAYER)
    assert [(u.chunks, u.layers) for u in whole.units] == [(range(0, 2), range(4)), (range(2, 4), range(4)),
                                                           (range(4, 6), range(4))]
    split = staging_schedule(2, range(4), LAYER, 64 * LAYER, UnitOrder.CHUNK_MAJOR, unit_bytes=3 * LAYER)
    assert [(u.chunks, u.layers) for u in split.units] == [(range(0, 1), range(0, 3)), (range(0, 1), range(3, 4)),
                                                           (range(1, 2), range(0, 3)), (range(1, 2), range(3, 4))]


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, range(2), LAYER, 4 * LAYER), "num_chunks: expected a positive int, got 0"),
        ((1, range(0), LAYER, 4 * LAYER), r"layers: expected a non-empty range of layers with step 1, got range\(0, 0\)"),
        ((1, range(2), 0, 4 * LAYER), "layer_bytes: expected a positive int, got 0"),
        ((1, range(2), LAYER, 2 * LAYER - 1),
         r"staging_bytes: the staged path needs room for 2 slots of at least one chunk layer \(1000 bytes each\), got 1999"),
    ],
    ids=["chunks", "layers", "layer_bytes", "staging"],
)
def test_schedule_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        staging_schedule(*args, UnitOrder.LAYER_MAJOR)


def test_region_events_order_writers_after_the_last_reader_and_refuse_held_ranges():
    regions = RegionEvents()
    assert regions.claim(0, 100) == []
    with pytest.raises(StagingBusy, match=r"staging bytes \[50, 150\) overlap \[0, 100\), still held"):
        regions.claim(50, 150)
    regions.release(0, 100, "read-a")
    assert regions.claim(100, 200) == []
    regions.release(100, 200, "read-b")
    # A writer over both ranges waits for both readers; afterwards only its own release counts.
    assert regions.claim(50, 150) == ["read-a", "read-b"]
    regions.release(50, 150, "read-c")
    assert sorted(regions.claim(0, 200)) == ["read-a", "read-b", "read-c"]
    regions.release(0, 200, None)  # CPU: nothing to wait for, but no longer held
    assert regions.claim(0, 200) == [] and regions.held() == [(0, 200)]
    with pytest.raises(ValueError, match=r"release: no held staging range \[0, 10\)"):
        regions.release(0, 10, "x")


CHUNK = 8
NUM_SLOTS = 64
LAYERS = 4


def _staged_case(seed: int, kind=LayoutKind.TOKEN_SLOT, num_chunks: int = 3):
    gen = torch.Generator().manual_seed(seed)
    buffers = make_buffers(kind, torch.bfloat16, num_layers=LAYERS, num_slots=NUM_SLOTS, device="cpu", gen=gen)
    slots = torch.randperm(NUM_SLOTS, generator=gen)[: num_chunks * CHUNK]
    slabs = random_slabs(num_chunks, buffers.geometry.slab_bytes(CHUNK), gen)
    return buffers, slots, slabs


@pytest.mark.parametrize("kind", [LayoutKind.TOKEN_SLOT, LayoutKind.MLA, LayoutKind.PAGED_BLOCKS], ids=lambda k: k.value)
def test_staged_load_places_each_layer_at_its_boundary_through_a_reused_ring(kind):
    buffers, slots, slabs = _staged_case(40, kind)
    layer_bytes = buffers.geometry.layer_bytes(CHUNK)
    # Room for 2 slots of 1 chunk layer: 12 units through 2 slots, every slot reused 5 times.
    transfer = Transfer(buffers, CHUNK, path=TransferPath.STAGED, staging_bytes=2 * layer_bytes)
    prepared = transfer.prepare(slots, slabs)
    schedule = transfer.schedule(prepared, range(LAYERS), UnitOrder.LAYER_MAJOR)
    assert len(schedule.units) == 12 and schedule.num_slots == 2
    before = buffer_bytes(buffers)
    load = StagedLoad(transfer.staging, schedule, prepared.plan, prepared.full_slabs, prepared.first_full_token)
    load.start()
    assert all(torch.equal(a, b) for a, b in zip(before, buffer_bytes(buffers), strict=True)), "copies alone touched the slots"
    for layer in range(LAYERS):
        load.place_through(schedule.last_unit_of_layer(layer), None)
        # Layers up to this one placed, later ones untouched.
        want = _oracle_scatter_from(before, buffers, slots, slabs, range(layer + 1))
        assert all(torch.equal(a, b) for a, b in zip(buffer_bytes(buffers), want, strict=True)), f"after layer {layer}"
    assert load.done and transfer.staging.regions.held() == []


def _oracle_scatter_from(before, buffers, slots, slabs, layers):
    """Expected plane bytes: ``before`` with ``layers`` of the slabs scattered into ``slots``."""
    g = buffers.geometry
    out = [b.clone() for b in before]
    num_planes = len(g.plane_row_bytes)
    for i, slot in enumerate(slots.tolist()):
        chunk, row = divmod(i, CHUNK)
        for layer in layers:
            for plane, rb in enumerate(g.plane_row_bytes):
                start = layer * g.layer_bytes(CHUNK) + g.plane_offset(plane, CHUNK) + row * rb
                out[layer * num_planes + plane].view(buffers.num_slots, rb)[slot] = slabs[chunk][start:start + rb]
    return out


def test_staged_round_trip_and_the_ring_refuses_a_second_load_in_flight():
    buffers, slots, slabs = _staged_case(41)
    layer_bytes = buffers.geometry.layer_bytes(CHUNK)
    transfer = Transfer(buffers, CHUNK, path=TransferPath.STAGED, staging_bytes=2 * layer_bytes)
    prepared = transfer.prepare(slots, slabs)
    schedule = transfer.schedule(prepared, range(LAYERS), UnitOrder.LAYER_MAJOR)
    first = StagedLoad(transfer.staging, schedule, prepared.plan, prepared.full_slabs, 0)
    first.start()
    second = StagedLoad(transfer.staging, schedule, prepared.plan, prepared.full_slabs, 0)
    with pytest.raises(StagingBusy, match="give each LayerTransferCounter its own Transfer"):
        second.start()
    first.abandon()  # a dropped load gives its slots back
    assert transfer.staging.regions.held() == []
    expected = _oracle_gather(buffers, slots, [s.clone() for s in slabs], 0, range(LAYERS))
    transfer.run(prepared, Direction.GATHER)
    assert all(torch.equal(a, b) for a, b in zip(slabs, expected, strict=True))


@pytest.mark.gpu
def test_copy_engine_copies_by_address_both_ways():
    from lmc_transfer.kernels.driver import copy_async

    gen = torch.Generator().manual_seed(42)
    host = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=gen).pin_memory()
    dev = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=gen).cuda()
    dev_before, host_before = dev.cpu(), host.clone()
    stream = torch.cuda.Stream()
    # 1 MiB + 16 bytes from host offset 48 to device offset 1 MiB, and 4 KiB back to host offset 2 MiB.
    copy_async(dev.data_ptr() + (1 << 20), host.data_ptr() + 48, (1 << 20) + 16, stream)
    copy_async(host.data_ptr() + (2 << 20), dev.data_ptr() + 16, 4096, stream)
    stream.synchronize()
    want_dev = dev_before.clone()
    want_dev[1 << 20:(2 << 20) + 16] = host_before[48:48 + (1 << 20) + 16]
    want_host = host_before.clone()
    want_host[2 << 20:(2 << 20) + 4096] = dev_before[16:16 + 4096]
    assert torch.equal(dev.cpu(), want_dev)
    assert torch.equal(host, want_host)
