"""Layerwise load (LayerTransferCounter) and store (LayerwiseStore), CPU path byte for byte.

On CUDA the same code runs asynchronously on streams; those runs are GPU-marked tests.
"""

from __future__ import annotations

import pytest
import torch

from lmc_transfer.config import GB, LMCTransferConfig
from lmc_transfer.store.ip import IPStore
from lmc_transfer.kernels import LayoutKind, SlotRangeError
from lmc_transfer.keys import chunk_keys
from lmc_transfer.transfer.layerwise import LayerTransferCounter, LayerwiseStore
from lmc_transfer.store.slots import chunk_slots
from lmc_transfer.store.base import Reservation
from lmc_transfer.transfer.paths import DEFAULT_STAGING_BYTES, Transfer, TransferPath

from .kv_fixtures import DTYPES, LAYOUTS, buffer_bytes, make_buffers
from .test_ip_store import CS, SALT, FakeClock, assert_rows_equal, keys_for, make_store, rows, slot_range, unchanged_except

LAYERS = 3


def new_transfer(store, path: TransferPath = TransferPath.AUTO, staging_bytes: int | None = None) -> Transfer:
    return Transfer(store.buffers, CS, path=path, staging_bytes=staging_bytes or DEFAULT_STAGING_BYTES)


def store_layerwise(store, keys, src, path: TransferPath = TransferPath.AUTO) -> int:
    saver = LayerwiseStore(new_transfer(store, path), store, store.reserve(keys), src)
    for layer in range(LAYERS):
        saver.after_layer(layer)
    assert saver.done()
    return saver.finish()


@pytest.mark.parametrize("path", [TransferPath.ZERO_COPY, TransferPath.STAGED], ids=lambda p: p.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS, ids=lambda k: k.value)
def test_layerwise_round_trip_is_byte_exact(kind: LayoutKind, dtype: torch.dtype, path: TransferPath) -> None:
    store = make_store(kind, dtype, num_layers=LAYERS)
    buffers = store.buffers
    keys = keys_for(1, 3)
    src = torch.tensor([5, 40, 7, 3, 90, 91, 12, 13, 0, 95, 33, 60], dtype=torch.int64)
    expected = rows(buffers, src)
    assert store_layerwise(store, keys, src, path) == 3
    before = buffer_bytes(buffers)
    counter = LayerTransferCounter(new_transfer(store, path))
    lease = store.lookup(keys)
    dst = torch.tensor([80, 81, 82, 83, 20, 21, 22, 23, 50, 51, 52, 53, 70], dtype=torch.int64)
    counter.start_load(store, lease, dst)
    assert counter.in_flight
    for layer in range(LAYERS):
        counter.wait_until(layer)
        counter.wait_until(layer)  # the engine asks again for V; free
    result = counter.finish()
    store.release(lease)
    assert (result.chunks_loaded, result.tokens_loaded) == (3, 12)
    assert not counter.in_flight
    for got, want in zip(rows(buffers, dst[:12]), expected, strict=True):
        assert torch.equal(got, want)
    unchanged_except(before, buffers, dst[:12])


def test_store_gathers_only_the_layers_it_was_told_about() -> None:
    store = make_store(num_layers=LAYERS)
    geom = store.buffers.geometry
    keys = keys_for(2, 2)
    src = slot_range(0, 8)
    res = store.reserve(keys)
    slabs = store.slab_views(res.slab_ids)
    for s in slabs:
        s.fill_(0xA5)
    saver = LayerwiseStore(new_transfer(store), store, res, src)
    saver.after_layer(1)
    assert not saver.done()
    layer = geom.layer_bytes(CS)
    for c, s in enumerate(slabs):
        assert s[:layer].eq(0xA5).all() and s[2 * layer :].eq(0xA5).all()
        for plane, row in enumerate(geom.plane_row_bytes):
            base = layer + geom.plane_offset(plane, CS)
            got = s[base : base + CS * row].view(CS, row)
            assert torch.equal(got, store.buffers.plane_rows(1, plane)[src[c * CS : (c + 1) * CS]])
    assert store.lookup(keys).num_chunks == 0, "nothing is visible before the barrier"
    with pytest.raises(ValueError, match="layer: 1 was already stored"):
        saver.after_layer(1)
    saver.after_layer(2)
    saver.after_layer(0)
    assert saver.finish() == 2
    assert store.lookup(keys).num_chunks == 2


def test_staged_layerwise_paths_move_each_layer_at_its_boundary() -> None:
    """The copy-engine path on CPU, one layer per unit through a ring of two slots: a store's
    layer lands in its slabs when after_layer reports it (in any order), a load's layer in the
    slots at its wait_until, and later layers stay untouched until theirs."""
    store = make_store(num_layers=LAYERS)
    geom = store.buffers.geometry
    keys = keys_for(12, 3)
    src = slot_range(0, 12)
    # 2 x (3 chunks x one layer): one layer per unit, 2 slots for 3 layers (a slot is reused).
    staging = 2 * 3 * geom.layer_bytes(CS)
    res = store.reserve(keys)
    slabs = store.slab_views(res.slab_ids)
    for s in slabs:
        s.fill_(0x5A)
    saver = LayerwiseStore(new_transfer(store, TransferPath.STAGED, staging), store, res, src)
    layer = geom.layer_bytes(CS)
    order = (1, 2, 0)
    for step, stored in enumerate(order):
        saver.after_layer(stored)
        done_layers = set(order[: step + 1])
        for c, s in enumerate(slabs):
            for l in range(LAYERS):
                piece = s[l * layer:(l + 1) * layer]
                if l in done_layers:
                    for plane, row in enumerate(geom.plane_row_bytes):
                        base = geom.plane_offset(plane, CS)
                        got = piece[base:base + CS * row].view(CS, row)
                        assert torch.equal(got, store.buffers.plane_rows(l, plane)[src[c * CS:(c + 1) * CS]])
                else:
                    assert piece.eq(0x5A).all(), f"layer {l} written before its after_layer (step {step})"
    assert saver.done() and saver.finish() == 3
    expected = rows(store.buffers, src)
    dst = slot_range(40, 12)
    before = buffer_bytes(store.buffers)
    counter = LayerTransferCounter(new_transfer(store, TransferPath.STAGED, staging))
    lease = store.lookup(keys)
    counter.start_load(store, lease, dst)
    assert all(torch.equal(a, b) for a, b in zip(before, buffer_bytes(store.buffers), strict=True)), "placed before any wait"
    for l in range(LAYERS):
        counter.wait_until(l)
        got = rows(store.buffers, dst)
        for ll in range(LAYERS):
            for plane in range(2):
                want = expected[ll * 2 + plane] if ll <= l else before[ll * 2 + plane].view(store.buffers.num_slots, -1)[dst]
                assert torch.equal(got[ll * 2 + plane], want), f"layer {ll} plane {plane} after wait_until({l})"
    assert counter.finish().chunks_loaded == 3
    store.release(lease)


def test_store_of_non_contiguous_chunks_uses_their_rows() -> None:
    store = make_store(num_layers=LAYERS)
    keys = keys_for(3, 3)
    src = slot_range(10, 12)
    assert store.save(store.reserve([keys[1]]), src[4:8]) == 1
    assert store_layerwise(store, keys, src) == 2
    dst = slot_range(60, 12)
    lease = store.lookup(keys)
    assert store.load(lease, dst).chunks_loaded == 3
    assert_rows_equal(store.buffers, dst, src)


def test_finish_with_missing_layers_aborts() -> None:
    store = make_store(num_layers=LAYERS)
    keys = keys_for(4, 2)
    saver = LayerwiseStore(new_transfer(store), store, store.reserve(keys), slot_range(0, 8))
    saver.after_layer(0)
    with pytest.raises(ValueError, match=r"finish: every layer must be stored first, layers \[1, 2\] were not"):
        saver.finish()
    assert store.pool.stats().used_slabs == 0 and store.lookup(keys).num_chunks == 0
    with pytest.raises(RuntimeError, match="already finished or aborted"):
        saver.after_layer(1)
    saver.abort()  # idempotent


def test_store_with_bad_slots_is_aborted_at_the_barrier() -> None:
    store = make_store(num_layers=LAYERS)
    keys = keys_for(5, 1)
    src = slot_range(0, 4)
    src[2] = -1
    saver = LayerwiseStore(new_transfer(store), store, store.reserve(keys), src)
    for layer in range(LAYERS):
        saver.after_layer(layer)
    with pytest.raises(SlotRangeError, match=r"slots\[2\] = -1 is outside the KV buffers"):
        saver.finish()
    assert store.pool.stats().used_slabs == 0


def test_empty_reservation_commits_nothing() -> None:
    store = make_store(num_layers=LAYERS)
    keys = keys_for(6, 1)
    store.save(store.reserve(keys), slot_range(0, 4))
    assert store_layerwise(store, keys, slot_range(0, 4)) == 0


def test_load_stops_at_a_changed_generation() -> None:
    store = make_store(num_layers=LAYERS)
    buffers = store.buffers
    keys = keys_for(7, 3)
    src = slot_range(0, 12)
    store.save(store.reserve(keys), src)
    lease = store.lookup(keys)
    store.pool._gens[lease.slab_ids[1]] += 1
    before = buffer_bytes(buffers)
    counter = LayerTransferCounter(new_transfer(store))
    dst = slot_range(40, 12)
    counter.start_load(store, lease, dst)
    result = counter.finish()
    assert (result.chunks_loaded, result.tokens_loaded) == (1, CS)
    assert_rows_equal(buffers, dst[:CS], src[:CS])
    unchanged_except(before, buffers, dst[:CS])


def test_generation_changed_during_a_layerwise_load_is_a_miss() -> None:
    store = make_store(num_layers=LAYERS)
    keys = keys_for(8, 2)
    store.save(store.reserve(keys), slot_range(0, 8))
    lease = store.lookup(keys)
    counter = LayerTransferCounter(new_transfer(store))
    counter.start_load(store, lease, slot_range(40, 8))
    store.pool._gens[lease.slab_ids[0]] += 1  # torn after the copy was queued
    assert counter.finish().chunks_loaded == 0


def test_counter_state_errors_and_empty_lease() -> None:
    store = make_store(num_layers=LAYERS)
    counter = LayerTransferCounter(new_transfer(store))
    with pytest.raises(RuntimeError, match="finish: no load in flight"):
        counter.finish()
    counter.wait_until(2)  # nothing in flight: free
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 3\), got 3"):
        counter.wait_until(3)
    empty = store.lookup(keys_for(9, 2))
    counter.start_load(store, empty, slot_range(0, 0))
    with pytest.raises(RuntimeError, match="start_load: a load is already in flight"):
        counter.start_load(store, empty, slot_range(0, 0))
    assert counter.finish().chunks_loaded == 0
    keys = keys_for(9, 1)
    store.save(store.reserve(keys), slot_range(0, 4))
    with pytest.raises(ValueError, match=r"slots: expected a 1-D tensor of at least 4 slot indices"):
        counter.start_load(store, store.lookup(keys), slot_range(0, 3))
    assert not counter.in_flight
    with pytest.raises(TypeError, match="transfer: expected Transfer, got IPStore"):
        LayerTransferCounter(store)  # type: ignore[arg-type]


def test_chunk_slots_selects_reserved_rows_in_order() -> None:
    slots = torch.arange(100, 116)
    res = Reservation(1, tuple(keys_for(1, 4)), (0, 2, 3), (5, 6, 7), (1, 1, 1), 0.0)
    assert chunk_slots(res, slots, CS, slots.device).tolist() == [100, 101, 102, 103, 108, 109, 110, 111, 112, 113, 114, 115]
    contiguous = Reservation(1, tuple(keys_for(1, 4)), (1, 2), (5, 6), (1, 1), 0.0)
    view = chunk_slots(contiguous, slots, CS, slots.device)
    assert view.tolist() == list(range(104, 112)) and view.data_ptr() == slots[4:].data_ptr()
    with pytest.raises(ValueError, match=r"at least 16 slot indices \(4 keys of 4\), got shape \(15,\)"):
        chunk_slots(res, slots[:15], CS, slots.device)


@pytest.mark.gpu
@pytest.mark.parametrize("path", [TransferPath.ZERO_COPY, TransferPath.STAGED], ids=lambda p: p.value)
def test_cuda_layerwise_round_trip_with_streams(path: TransferPath) -> None:
    """On a GPU: stores behind a fake forward pass, loads ahead of it, no CPU blocking per layer."""
    gen = torch.Generator().manual_seed(0)
    buffers = make_buffers(
        LayoutKind.TOKEN_SLOT, torch.bfloat16, num_layers=LAYERS, num_slots=4096, device="cuda", gen=gen
    )
    slab = buffers.geometry.slab_bytes(CS)
    cfg = LMCTransferConfig.from_dict({"chunk_size": CS, "max_local_cpu_size": 300.5 * slab / GB})
    store = IPStore(cfg, buffers)
    keys = keys_for(11, 256)
    src = torch.randperm(2048, device="cuda")[:1024] + 2048
    expected = rows(buffers, src)
    saver = LayerwiseStore(new_transfer(store, path), store, store.reserve(keys), src)
    for layer in range(LAYERS):
        torch.cuda._sleep(100_000)  # the layer's forward
        saver.after_layer(layer)
    assert saver.finish() == 256
    dst = torch.arange(0, 1024, device="cuda")
    counter = LayerTransferCounter(new_transfer(store, path))
    lease = store.lookup(keys)
    counter.start_load(store, lease, dst)
    for layer in range(LAYERS):
        counter.wait_until(layer)
        torch.cuda._sleep(100_000)
    result = counter.finish()
    store.release(lease)
    assert result.chunks_loaded == 256
    torch.cuda.synchronize()
    for got, want in zip(rows(buffers, dst), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("path, layer_signals", [(TransferPath.STAGED, False), (TransferPath.ZERO_COPY, True),
                                                 (TransferPath.ZERO_COPY, False)],
                         ids=["copy_engine", "one_launch_counters", "launch_per_layer_events"])
def test_cuda_each_layer_is_complete_when_its_wait_passes(path: TransferPath, layer_signals: bool) -> None:
    """A kernel queued after wait_until(l) sees all of layer l although later layers are still
    loading: each layer is snapshotted on the compute stream right after its wait. The staging
    buffer holds 3 layers, so the copy-engine path reuses every slot."""
    num_layers, chunk = 8, 256
    gen = torch.Generator().manual_seed(5)
    # 8 heads x 128 bf16 per plane (Llama-8B rows): ~1 ms of PCIe per layer for 8192 tokens.
    buffers = make_buffers(LayoutKind.TOKEN_SLOT, torch.bfloat16, num_layers=num_layers, num_slots=16384,
                           device="cuda", gen=gen, heads=8, head_dim_k=128, head_dim_v=128)
    slab = buffers.geometry.slab_bytes(chunk)
    cfg = LMCTransferConfig.from_dict({"chunk_size": chunk, "max_local_cpu_size": 33.5 * slab / GB})
    store = IPStore(cfg, buffers)
    keys = chunk_keys(list(range(32 * chunk)), chunk, SALT)
    src, dst = torch.randperm(16384, device="cuda", generator=None).split(8192)
    expected = rows(buffers, src)
    transfer = Transfer(buffers, chunk, path=path, staging_bytes=3 * 32 * buffers.geometry.layer_bytes(chunk))
    saver = LayerwiseStore(transfer, store, store.reserve(keys), src)
    for layer in range(num_layers):
        saver.after_layer(layer)
    assert saver.finish() == 32
    counter = LayerTransferCounter(transfer, layer_signals=layer_signals)
    assert counter.uses_layer_signals is layer_signals
    lease = store.lookup(keys)
    torch.cuda.synchronize()
    snapshots = []
    counter.start_load(store, lease, dst)
    for layer in range(num_layers):
        counter.wait_until(layer)
        snapshots.append([buffers.plane_rows(layer, plane)[dst].clone() for plane in range(2)])
    result = counter.finish()
    store.release(lease)
    assert result.chunks_loaded == 32
    torch.cuda.synchronize()
    per_layer_expected = [expected[layer * 2:(layer + 1) * 2] for layer in range(num_layers)]
    for layer, (got, want) in enumerate(zip(snapshots, per_layer_expected, strict=True)):
        for plane in range(2):
            assert torch.equal(got[plane], want[plane]), f"layer {layer} plane {plane} read before it landed"


@pytest.mark.gpu
def test_cuda_copy_engine_finish_does_not_wait_for_the_forward_pass() -> None:
    """finish() needs only the load's copies out of the host slabs: with ~0.5 s of "forward" queued
    on the compute stream after the last wait, it returns while that still runs, and the data
    is there once the stream has passed it."""
    gen = torch.Generator().manual_seed(6)
    buffers = make_buffers(LayoutKind.TOKEN_SLOT, torch.bfloat16, num_layers=LAYERS, num_slots=4096, device="cuda",
                           gen=gen)
    slab = buffers.geometry.slab_bytes(CS)
    store = IPStore(LMCTransferConfig.from_dict({"chunk_size": CS, "max_local_cpu_size": 64.5 * slab / GB}), buffers)
    keys = keys_for(13, 64)
    src = torch.arange(256, device="cuda")
    expected = rows(buffers, src)
    assert store.save(store.reserve(keys), src) == 64 and store.flush_stores(10)
    counter = LayerTransferCounter(new_transfer(store, TransferPath.STAGED))
    lease = store.lookup(keys)
    dst = torch.arange(1024, 1280, device="cuda")
    counter.start_load(store, lease, dst)
    forward_done = torch.cuda.Event()
    for layer in range(LAYERS):
        counter.wait_until(layer)
    torch.cuda._sleep(1_000_000_000)
    forward_done.record()
    assert counter.finish().chunks_loaded == 64
    assert not forward_done.query(), "finish() waited for work queued after the load"
    store.release(lease)
    torch.cuda.synchronize()
    for got, want in zip(rows(buffers, dst), expected):
        assert torch.equal(got, want)


class _FailingTransfer(Transfer):
    """A Transfer whose run() raises for the chosen layers (a launch or allocation failure)."""

    def __init__(self, buffers, fail_layers: set[int]) -> None:
        super().__init__(buffers, CS)
        self.fail_layers = fail_layers

    def run(self, prepared, direction, *, layers=None, stream=None):
        if set(layers if layers is not None else range(LAYERS)) & self.fail_layers:
            raise RuntimeError("injected launch failure")
        return super().run(prepared, direction, layers=layers, stream=stream)


def test_failed_start_load_leaves_the_counter_reusable() -> None:
    store = make_store(num_layers=LAYERS)
    keys = keys_for(7, 2)
    src = slot_range(0, 8)
    expected = rows(store.buffers, src)
    assert store_layerwise(store, keys, src) == 2
    lease = store.lookup(keys)
    counter = LayerTransferCounter(_FailingTransfer(store.buffers, fail_layers={0, 1, 2}))
    with pytest.raises(RuntimeError, match="injected launch failure"):
        counter.start_load(store, lease, slot_range(40, 8))
    assert not counter.in_flight
    with pytest.raises(RuntimeError, match="no load in flight"):
        counter.finish()  # nothing may be reported as loaded after a failed start
    counter.transfer.fail_layers = set()
    dst = slot_range(40, 8)
    counter.start_load(store, lease, dst)
    assert counter.finish().chunks_loaded == 2
    store.release(lease)
    for got, want in zip(rows(store.buffers, dst), expected, strict=True):
        assert torch.equal(got, want)


def test_a_layer_whose_gather_failed_is_never_committed() -> None:
    store = make_store(num_layers=LAYERS)
    keys = keys_for(8, 2)
    saver = LayerwiseStore(_FailingTransfer(store.buffers, fail_layers={1}), store, store.reserve(keys),
                           slot_range(0, 8))
    saver.after_layer(0)
    with pytest.raises(RuntimeError, match="injected launch failure"):
        saver.after_layer(1)
    saver.after_layer(2)
    with pytest.raises(ValueError, match=r"layers \[1\] were not"):
        saver.finish()
    assert store.lookup(keys).num_chunks == 0
    assert store.pool.stats().reservations == 0


def test_a_store_that_outlives_its_reservation_is_dropped_not_committed() -> None:
    clock = FakeClock()
    store = make_store(num_layers=LAYERS, clock=clock)
    keys = keys_for(9, 2)
    res = store.reserve(keys)
    saver = LayerwiseStore(new_transfer(store), store, res, slot_range(0, 8))
    saver.after_layer(0)
    clock.now = res.deadline - 0.5  # less than COPY_MARGIN_S left: no more gathers into these slabs
    saver.after_layer(1)
    saver.after_layer(2)
    assert saver.done()
    assert saver.finish() == 0
    assert store.lookup(keys).num_chunks == 0
    assert store.pool.stats().reservations == 0
