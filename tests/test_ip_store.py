"""IPStore: byte-exact round trips, dedup, eviction and generation misses, leases, threads."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from lmc_transfer.config import GB, LMCTransferConfig
from lmc_transfer.store.ip import IPStore
from lmc_transfer.store.pool import QUARANTINE_S
from lmc_transfer.kernels import KVBuffers, LayoutKind, SlotRangeError
from lmc_transfer.keys import chunk_keys

from .kv_fixtures import DTYPES, LAYOUTS, buffer_bytes, make_buffers

CS = 4  # tokens per chunk
SALT = b"test-salt"


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def config_for(buffers: KVBuffers, num_slabs: int, **kw) -> LMCTransferConfig:
    slab = buffers.geometry.slab_bytes(CS)
    # Half a slab of slack so float rounding of the GB figure cannot lose a slab.
    return LMCTransferConfig.from_dict({"chunk_size": CS, "max_local_cpu_size": (num_slabs + 0.5) * slab / GB, **kw})


def make_store(
    kind: LayoutKind = LayoutKind.TOKEN_SLOT,
    dtype: torch.dtype = torch.bfloat16,
    *,
    num_slabs: int = 8,
    num_layers: int = 2,
    num_slots: int = 96,
    seed: int = 0,
    clock: FakeClock | None = None,
) -> IPStore:
    gen = torch.Generator().manual_seed(seed)
    buffers = make_buffers(kind, dtype, num_layers=num_layers, num_slots=num_slots, device="cpu", gen=gen)
    return IPStore(config_for(buffers, num_slabs), buffers, clock=clock or FakeClock())


def keys_for(doc: int, num_chunks: int) -> list[bytes]:
    return chunk_keys([doc * 1000 + i for i in range(num_chunks * CS)], CS, SALT)


def rows(buffers: KVBuffers, slots: torch.Tensor) -> list[torch.Tensor]:
    """Every layer and plane's bytes of ``slots``, in order."""
    return [
        buffers.plane_rows(layer, plane)[slots].clone()
        for layer in range(buffers.num_layers)
        for plane in range(len(buffers.planes[layer]))
    ]


def assert_rows_equal(buffers: KVBuffers, dst: torch.Tensor, src: torch.Tensor) -> None:
    for got, want in zip(rows(buffers, dst), rows(buffers, src), strict=True):
        assert torch.equal(got, want)


def unchanged_except(before: list[torch.Tensor], buffers: KVBuffers, written: torch.Tensor) -> None:
    """All bytes outside the ``written`` slots equal ``before``."""
    keep = torch.ones(buffers.num_slots, dtype=torch.bool)
    keep[written] = False
    after = buffer_bytes(buffers)
    for b, a in zip(before, after, strict=True):
        b_rows, a_rows = b.view(buffers.num_slots, -1), a.view(buffers.num_slots, -1)
        assert torch.equal(b_rows[keep], a_rows[keep])


def slot_range(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS, ids=lambda k: k.value)
def test_round_trip_is_byte_exact(kind: LayoutKind, dtype: torch.dtype) -> None:
    store = make_store(kind, dtype)
    buffers = store.buffers
    keys = keys_for(1, 3)
    src = torch.tensor([5, 40, 7, 3, 90, 91, 12, 13, 0, 95, 33, 60], dtype=torch.int64)
    res = store.reserve(keys)
    assert res.chunk_indices == (0, 1, 2)
    assert store.save(res, src) == 3
    # Slab layout: layer-major, plane 0's rows then plane 1's.
    geom = buffers.geometry
    slab = store.slab_views(res.slab_ids[1:2])[0]
    for layer in range(buffers.num_layers):
        for plane, row in enumerate(geom.plane_row_bytes):
            base = layer * geom.layer_bytes(CS) + geom.plane_offset(plane, CS)
            assert torch.equal(slab[base : base + CS * row].view(CS, row), buffers.plane_rows(layer, plane)[src[4:8]])
    expected = rows(buffers, src)
    before = buffer_bytes(buffers)
    dst = torch.tensor([80, 81, 82, 83, 20, 21, 22, 23, 50, 51, 52, 53], dtype=torch.int64)
    lease = store.lookup(keys)
    assert lease.num_chunks == 3
    result = store.load(lease, dst)
    assert (result.chunks_loaded, result.tokens_loaded) == (3, 12)
    store.release(lease)
    for got, want in zip(rows(buffers, dst), expected, strict=True):
        assert torch.equal(got, want)
    unchanged_except(before, buffers, dst)


def test_load_uses_the_first_slots_and_a_layer_range() -> None:
    store = make_store(num_layers=3)
    buffers = store.buffers
    keys = keys_for(2, 2)
    store.save(store.reserve(keys), slot_range(0, 8))
    before = buffer_bytes(buffers)
    lease = store.lookup(keys + keys_for(3, 1))
    assert lease.num_chunks == 2
    dst = torch.cat([slot_range(40, 8), slot_range(60, 4)])  # extra slots are ignored
    result = store.load(lease, dst, layers=range(1, 2))
    assert (result.chunks_loaded, result.tokens_loaded) == (2, 8)
    after = buffer_bytes(buffers)
    planes = len(buffers.planes[0])
    for layer in range(3):
        for plane in range(planes):
            got = after[layer * planes + plane].view(buffers.num_slots, -1)
            was = before[layer * planes + plane].view(buffers.num_slots, -1)
            want = was[slot_range(0, 8)] if layer == 1 else was[slot_range(40, 8)]
            assert torch.equal(got[slot_range(40, 8)], want)
            assert torch.equal(got[slot_range(60, 4)], was[slot_range(60, 4)])
    assert store.stats().loaded_bytes == 2 * buffers.geometry.layer_bytes(CS)


def test_second_store_is_deduplicated_and_gaps_are_filled_from_the_right_rows() -> None:
    store = make_store()
    buffers = store.buffers
    keys = keys_for(4, 4)
    src = slot_range(0, 16)
    assert store.save(store.reserve([keys[0]]), src[:4]) == 1
    assert store.save(store.reserve([keys[2]]), src[8:12]) == 1
    # Non-contiguous chunk indices (1 and 3): their rows must still land in the right slabs.
    gap = store.reserve(keys)
    assert gap.chunk_indices == (1, 3)
    assert store.save(gap, src) == 2
    again = store.reserve(keys)
    assert again.num_chunks == 0 and store.save(again, src) == 0
    stats = store.stats()
    assert stats.dedup_chunks == 2 + 4 and stats.dropped_chunks == 0
    assert stats.stored_chunks == 4 and stats.stored_bytes == 4 * buffers.geometry.slab_bytes(CS)
    assert store.pool.stats().used_slabs == 4
    before = buffer_bytes(buffers)
    dst = slot_range(40, 16)
    lease = store.lookup(keys)
    assert store.load(lease, dst).chunks_loaded == 4
    store.release(lease)
    assert_rows_equal(buffers, dst, src)
    unchanged_except(before, buffers, dst)


def test_full_pool_of_pinned_slabs_drops_the_rest() -> None:
    store = make_store(num_slabs=2)
    a = keys_for(12, 2)
    store.save(store.reserve(a), slot_range(0, 8))
    lease = store.lookup(a)
    res = store.reserve(keys_for(13, 2))
    assert res.num_chunks == 0 and store.save(res, slot_range(8, 8)) == 0
    assert store.stats().dropped_chunks == 2
    store.release(lease)


def test_evicted_chunk_is_a_miss_not_stale_bytes() -> None:
    store = make_store(num_slabs=2)
    buffers = store.buffers
    a, b = keys_for(5, 2), keys_for(6, 2)
    store.save(store.reserve(a), slot_range(0, 8))
    store.save(store.reserve(b), slot_range(8, 8))
    assert store.stats().evictions == 2
    lease = store.lookup(a)
    assert lease.num_chunks == 0
    before = buffer_bytes(buffers)
    assert store.load(lease, slot_range(40, 8)).chunks_loaded == 0
    unchanged_except(before, buffers, torch.empty(0, dtype=torch.int64))
    stats = store.stats()
    assert (stats.hit_chunks, stats.miss_chunks, stats.lookups) == (0, 2, 1)


def test_expired_lease_loads_nothing_even_after_its_slabs_were_reused() -> None:
    clock = FakeClock()
    store = make_store(num_slabs=2, clock=clock)
    buffers = store.buffers
    a = keys_for(7, 2)
    store.save(store.reserve(a), slot_range(0, 8))
    lease = store.lookup(a)
    assert store.reserve(keys_for(8, 1)).num_chunks == 0, "pinned slabs must not be reused"
    clock.now += 30.0  # the config's lease_ttl_s
    store.save(store.reserve(keys_for(8, 2)), slot_range(8, 8))
    before = buffer_bytes(buffers)
    result = store.load(lease, slot_range(40, 8))
    assert result.chunks_loaded == 0 and result.tokens_loaded == 0
    unchanged_except(before, buffers, torch.empty(0, dtype=torch.int64))
    store.release(lease)


def test_expired_reservation_is_not_written() -> None:
    clock = FakeClock()
    store = make_store(num_slabs=2, clock=clock)
    res = store.reserve(keys_for(14, 2))
    clock.now += 30.0
    assert store.reserve(keys_for(15, 2)).num_chunks == 0  # the expired slabs are quarantined
    clock.now += QUARANTINE_S
    other = store.reserve(keys_for(15, 2))
    assert sorted(other.slab_ids) == sorted(res.slab_ids)
    views = store.slab_views(other.slab_ids)
    for v in views:
        v.fill_(0x5A)
    assert store.save(res, slot_range(0, 8)) == 0
    assert all(v.eq(0x5A).all() for v in views)
    assert store.save(other, slot_range(8, 8)) == 2


def test_generation_changed_before_the_copy_stops_the_load_there() -> None:
    store = make_store()
    buffers = store.buffers
    keys = keys_for(9, 3)
    src = slot_range(0, 12)
    store.save(store.reserve(keys), src)
    lease = store.lookup(keys)
    store.pool._gens[lease.slab_ids[1]] += 1  # the slab was torn out from under the lease
    before = buffer_bytes(buffers)
    dst = slot_range(40, 12)
    result = store.load(lease, dst)
    assert (result.chunks_loaded, result.tokens_loaded) == (1, CS)
    assert_rows_equal(buffers, dst[:CS], src[:CS])
    unchanged_except(before, buffers, dst[:CS])
    assert store.stats().generation_misses == 2


def test_generation_changed_during_the_copy_is_reported_as_a_miss() -> None:
    store = make_store()
    keys = keys_for(10, 3)
    store.save(store.reserve(keys), slot_range(0, 12))
    lease = store.lookup(keys)
    real_run = store.transfer.run

    def run_and_tear(*args, **kwargs):
        out = real_run(*args, **kwargs)
        store.pool._gens[lease.slab_ids[2]] += 1
        return out

    store.transfer.run = run_and_tear  # type: ignore[method-assign]
    assert store.load(lease, slot_range(40, 12)).chunks_loaded == 2
    assert store.verify(lease) == 2


def test_bad_slots_abort_the_save_and_are_reported() -> None:
    store = make_store()
    keys = keys_for(11, 2)
    res = store.reserve(keys)
    bad = slot_range(0, 8)
    bad[5] = store.buffers.num_slots + 3
    with pytest.raises(SlotRangeError, match=rf"slots\[5\] = {store.buffers.num_slots + 3} is outside the KV buffers' \[0, {store.buffers.num_slots}\)"):
        store.save(res, bad)
    assert store.pool.stats().used_slabs == 0 and store.lookup(keys).num_chunks == 0
    res = store.reserve(keys)
    bad[5] = -1
    with pytest.raises(SlotRangeError, match=r"slots\[5\] = -1 is outside"):
        store.save(res, bad)
    assert store.pool.stats().used_slabs == 0
    with pytest.raises(ValueError, match=r"slots: expected a 1-D tensor of at least 8 slot indices \(2 keys of 4\), got shape \(7,\)"):
        store.save(store.reserve(keys), slot_range(0, 7))
    assert store.save(store.reserve(keys), slot_range(0, 8)) == 2
    with pytest.raises(ValueError, match=r"at least 8 slot indices \(2 chunks of 4\), got shape \(4,\)"):
        store.load(store.lookup(keys), slot_range(0, 4))


def test_pool_too_small_for_one_slab_is_rejected() -> None:
    gen = torch.Generator().manual_seed(0)
    buffers = make_buffers(LayoutKind.MLA, torch.float32, num_layers=2, num_slots=8, device="cpu", gen=gen)
    cfg = LMCTransferConfig.from_dict({"chunk_size": CS, "max_local_cpu_size": 1e-9})
    with pytest.raises(ValueError, match="max_local_cpu_size: 1e-09 GB does not hold one slab of 1152 bytes"):
        IPStore(cfg, buffers)


def test_close_makes_the_store_unusable() -> None:
    store = make_store()
    store.close()
    with pytest.raises(RuntimeError, match="IPStore is closed"):
        store.lookup(keys_for(1, 1))


def test_scheduler_and_loader_threads_see_exact_bytes() -> None:
    """A scheduler thread stores documents while a loader thread loads them back; every
    chunk a load reports as loaded must hold exactly that document's bytes."""
    docs, chunks = 6, 2
    tokens = chunks * CS
    src_slots = docs * tokens  # slots [0, 48) are sources, [48, 96) load targets
    store = make_store(num_slabs=5, num_slots=96, seed=3)
    buffers = store.buffers
    keys = [keys_for(100 + d, chunks) for d in range(docs)]
    expected = [rows(buffers, slot_range(d * tokens, tokens)) for d in range(docs)]
    errors: list[BaseException] = []
    loaded_chunks = [0]
    stop = threading.Event()

    def scheduler() -> None:
        rng = random.Random(1)
        try:
            for _ in range(25):
                d = rng.randrange(docs)
                store.save(store.reserve(keys[d]), slot_range(d * tokens, tokens))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
        finally:
            stop.set()

    def loader() -> None:
        rng = random.Random(2)
        dst = slot_range(src_slots, tokens)
        try:
            while not stop.is_set() or loaded_chunks[0] == 0:
                d = rng.randrange(docs)
                lease = store.lookup(keys[d])
                try:
                    result = store.load(lease, dst)
                finally:
                    store.release(lease)
                n = result.tokens_loaded
                for got, want in zip(rows(buffers, dst[:n]), expected[d], strict=True):
                    assert torch.equal(got, want[:n])
                loaded_chunks[0] += result.chunks_loaded
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=scheduler), threading.Thread(target=loader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    stop.set()
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert loaded_chunks[0] > 0
    st = store.pool.stats()
    assert st.leases == 0 and st.reservations == 0 and st.used_slabs == st.committed_chunks
