"""SlabPool: index, LRU eviction, pins, leases, reservations, generations."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from lmc_transfer.store.pool import PoolStats, SlabPool

SLAB = 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(num_slabs: int = 4, clock: FakeClock | None = None, **kw) -> SlabPool:
    data = np.zeros(num_slabs * SLAB, dtype=np.uint8)
    gens = np.zeros(num_slabs, dtype=np.uint64)
    return SlabPool(data, gens, SLAB, clock=clock or FakeClock(), **kw)


def k(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def store(pool: SlabPool, keys: list[bytes], ttl: float = 10.0) -> int:
    res = pool.reserve(keys, ttl)
    return pool.commit(res.reservation_id)


def test_constructor_validates_arguments() -> None:
    gens = np.zeros(2, dtype=np.uint64)
    with pytest.raises(TypeError, match="data must be a 1-D uint8"):
        SlabPool(np.zeros(64, dtype=np.float32), gens, SLAB)
    with pytest.raises(TypeError, match="generations must be a 1-D uint64"):
        SlabPool(np.zeros(64, dtype=np.uint8), np.zeros(2, dtype=np.int64), SLAB)
    with pytest.raises(ValueError, match="slab_bytes must be a positive int, got 0"):
        SlabPool(np.zeros(64, dtype=np.uint8), gens, 0)
    with pytest.raises(ValueError, match="= 64 bytes, got 63"):
        SlabPool(np.zeros(63, dtype=np.uint8), gens, SLAB)
    with pytest.raises(ValueError, match="at least one slab"):
        SlabPool(np.zeros(64, dtype=np.uint8), np.zeros(0, dtype=np.uint64), SLAB)


def test_slab_views_alias_the_buffer() -> None:
    data = np.zeros(3 * SLAB, dtype=np.uint8)
    pool = SlabPool(data, np.zeros(3, dtype=np.uint64), SLAB)
    pool.slab(1).fill(7)
    assert (data[:SLAB] == 0).all() and (data[SLAB : 2 * SLAB] == 7).all() and (data[2 * SLAB :] == 0).all()
    assert pool.num_slabs == 3 and pool.slab_bytes == SLAB
    with pytest.raises(ValueError, match=r"slab_id must be an int in \[0, 3\), got 3"):
        pool.slab(3)


def test_reserve_commit_lookup_prefix() -> None:
    pool = make_pool(4)
    res = pool.reserve([k(0), k(1), k(2)], 10.0)
    assert res.chunk_indices == (0, 1, 2) and res.slab_ids == (0, 1, 2)
    assert res.generations == (1, 1, 1)
    assert pool.lookup([k(0)], 5.0).num_chunks == 0, "uncommitted keys must not hit"
    assert pool.commit(res.reservation_id) == 3
    assert pool.commit(res.reservation_id) == 0
    lease = pool.lookup([k(0), k(1), k(5), k(2)], 5.0)
    assert lease.slab_ids == (0, 1) and lease.generations == (1, 1)
    assert lease.keys == (k(0), k(1), k(5), k(2))
    assert lease.deadline == 1005.0
    assert pool.committed_keys() == [k(0), k(1), k(2)]
    assert pool.contains(k(2)) and not pool.contains(k(5))


def test_reserve_skips_committed_writing_and_duplicate_keys() -> None:
    pool = make_pool(8)
    store(pool, [k(1)])
    other = pool.reserve([k(3)], 10.0)
    res = pool.reserve([k(0), k(1), k(2), k(3), k(2), k(4)], 10.0)
    assert res.chunk_indices == (0, 2, 5)
    assert res.keys == (k(0), k(1), k(2), k(3), k(2), k(4))
    pool.abort(other.reservation_id)
    pool.abort(other.reservation_id)
    assert pool.stats().used_slabs == 4


def test_eviction_is_lru_and_lookup_touches() -> None:
    pool = make_pool(3)
    for i in range(3):
        store(pool, [k(i)])
    pool.release(pool.lookup([k(0)], 5.0).lease_id)  # k0 becomes most recent
    res = pool.reserve([k(10), k(11)], 10.0)
    assert res.num_chunks == 2
    assert not pool.contains(k(1)) and not pool.contains(k(2)) and pool.contains(k(0))
    assert res.slab_ids == (1, 2)
    assert pool.stats().evictions == 2


def test_pins_survive_eviction_pressure_and_full_pool_reserves_partially() -> None:
    evicted: list[tuple[bytes, int]] = []
    pool = make_pool(3, on_evict=lambda key, slab: evicted.append((key, slab)))
    store(pool, [k(0), k(1), k(2)])
    lease = pool.lookup([k(0), k(1)], 5.0)
    res = pool.reserve([k(5), k(6), k(7)], 10.0)
    assert res.chunk_indices == (0,) and res.slab_ids == (2,)
    assert evicted == [(k(2), 2)]
    assert pool.contains(k(0)) and pool.contains(k(1))
    assert pool.verify(lease.slab_ids, lease.generations) == 2
    # Everything pinned or being written: nothing to hand out, no error.
    assert pool.reserve([k(8)], 10.0).num_chunks == 0
    st = pool.stats()
    assert st == PoolStats(num_slabs=3, used_slabs=3, pinned_slabs=2, committed_chunks=2, evictions=1, leases=1, reservations=1)
    pool.release(lease.lease_id)
    assert pool.reserve([k(8)], 10.0).slab_ids == (0,)


def test_reserve_never_evicts_its_own_committed_prefix() -> None:
    pool = make_pool(2)
    store(pool, [k(0)])
    store(pool, [k(9)])
    pool.release(pool.lookup([k(9)], 1.0).lease_id)  # k0 is now the LRU victim
    res = pool.reserve([k(0), k(1), k(2)], 10.0)
    assert res.chunk_indices == (1,) and res.slab_ids == (1,)
    assert pool.contains(k(0)) and not pool.contains(k(9))


def test_lease_expiry_unpins() -> None:
    clock = FakeClock()
    pool = make_pool(1, clock)
    store(pool, [k(0)])
    lease = pool.lookup([k(0)], 2.0)
    assert pool.reserve([k(1)], 10.0).num_chunks == 0
    clock.now += 1.999
    assert pool.expire() == 0
    clock.now += 0.001
    assert pool.expire() == 1
    assert pool.stats().pinned_slabs == 0 and pool.stats().leases == 0
    res = pool.reserve([k(1)], 10.0)
    assert res.slab_ids == (0,)
    assert pool.verify(lease.slab_ids, lease.generations) == 0
    pool.release(lease.lease_id)  # late release of an expired lease is harmless
    assert pool.stats().pinned_slabs == 0


def test_reservation_expiry_quarantines_slabs_and_commit_after_it_is_refused() -> None:
    clock = FakeClock()
    gens = np.zeros(2, dtype=np.uint64)
    pool = SlabPool(np.zeros(2 * SLAB, dtype=np.uint8), gens, SLAB, clock=clock, quarantine_s=5.0)
    res = pool.reserve([k(0), k(1)], 1.0)
    assert res.generations == (1, 1)
    clock.now += 1.0
    assert pool.commit(res.reservation_id) == 0
    assert pool.lookup([k(0)], 1.0).num_chunks == 0
    st = pool.stats()
    assert (st.used_slabs, st.reservations, st.quarantined_slabs) == (2, 0, 2)
    assert gens.tolist() == [2, 2], "an expired reservation's slabs get a new generation"
    clock.now += 4.999
    assert pool.reserve([k(0)], 1.0).num_chunks == 0, "quarantined slabs are not handed out"
    clock.now += 0.001
    again = pool.reserve([k(0)], 1.0)
    assert again.num_chunks == 1 and again.generations == (3,)
    assert pool.stats().quarantined_slabs == 0


def test_abort_frees_slabs_at_once() -> None:
    pool = make_pool(1)
    pool.abort(pool.reserve([k(0)], 1.0).reservation_id)
    assert pool.stats().quarantined_slabs == 0 and pool.reserve([k(1)], 1.0).num_chunks == 1


def test_stalled_writer_resuming_after_expiry_tears_no_committed_chunk() -> None:
    """The issue's victim scenario on the pool alone: a writer's reservation expires while it is
    stalled mid-copy; another client reserves and commits 8 chunks; the stalled writer then
    finishes its copy into the slabs it was given. No committed chunk may change."""
    clock = FakeClock()
    data = np.zeros(16 * SLAB, dtype=np.uint8)
    pool = SlabPool(data, np.zeros(16, dtype=np.uint64), SLAB, clock=clock)
    stalled = pool.reserve([k(100 + i) for i in range(8)], 1.0)
    clock.now += 2.0  # the writer is stopped past its TTL
    victim_keys = [k(i) for i in range(8)]
    victim = pool.reserve(victim_keys, 10.0)
    assert victim.num_chunks == 8
    rng = np.random.default_rng(5)
    expected = {}
    for key, slab_id in zip(victim_keys, victim.slab_ids, strict=True):
        expected[key] = rng.integers(0, 256, SLAB, dtype=np.uint8)
        pool.slab(slab_id)[:] = expected[key]
    assert pool.commit(victim.reservation_id) == 8
    for slab_id in stalled.slab_ids:  # the stalled copy resumes
        pool.slab(slab_id)[:] = 0xEE
    assert pool.commit(stalled.reservation_id) == 0
    lease = pool.lookup(victim_keys, 5.0)
    assert lease.num_chunks == 8
    wrong = [key for key, slab_id in zip(victim_keys, lease.slab_ids, strict=True) if not np.array_equal(pool.slab(slab_id), expected[key])]
    assert wrong == []


def test_generation_bumps_on_every_reuse() -> None:
    gens = np.zeros(1, dtype=np.uint64)
    pool = SlabPool(np.zeros(SLAB, dtype=np.uint8), gens, SLAB, clock=FakeClock())
    for i in range(5):
        res = pool.reserve([k(i)], 1.0)
        assert res.generations == (i + 1,) and int(gens[0]) == i + 1
        if i % 2:
            pool.abort(res.reservation_id)
        else:
            pool.commit(res.reservation_id)
    assert pool.verify([0, 0], [5, 4]) == 1
    assert pool.verify([], []) == 0
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        pool.verify([0, 0], [5])


def test_on_commit_callback_and_clear_keeps_pinned() -> None:
    committed: list[tuple[bytes, int]] = []
    pool = make_pool(4, on_commit=lambda key, slab: committed.append((key, slab)))
    store(pool, [k(0), k(1), k(2)])
    assert committed == [(k(0), 0), (k(1), 1), (k(2), 2)]
    lease = pool.lookup([k(0)], 5.0)
    writing = pool.reserve([k(7)], 5.0)
    assert pool.clear() == 2
    assert pool.committed_keys() == [k(0)]
    assert pool.stats().used_slabs == 2
    pool.release(lease.lease_id)
    assert pool.commit(writing.reservation_id) == 1


def test_argument_validation() -> None:
    pool = make_pool(2)
    with pytest.raises(TypeError, match="keys\\[1\\] must be 32 bytes, got 'x'"):
        pool.lookup([k(0), "x"], 1.0)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="keys\\[0\\] must be 32 bytes, got b'short'"):
        pool.reserve([b"short"], 1.0)
    with pytest.raises(ValueError, match="ttl_s must be a positive number of seconds, got 0"):
        pool.reserve([k(0)], 0)
    empty = pool.lookup([k(0)], 1.0)
    assert empty.lease_id == 0 and empty.num_chunks == 0
    pool.release(empty.lease_id)


def test_random_walk_leaks_no_slab() -> None:
    """10k random operations; afterwards every slab is accounted for exactly once."""
    rng = random.Random(1234)
    clock = FakeClock()
    n = 16
    pool = make_pool(n, clock)
    leases, reservations = [], []
    for _ in range(10_000):
        op = rng.random()
        keys = [k(rng.randrange(40)) for _ in range(rng.randrange(1, 6))]
        if op < 0.3:
            reservations.append(pool.reserve(keys, rng.uniform(0.5, 5.0)))
        elif op < 0.5 and reservations:
            r = reservations.pop(rng.randrange(len(reservations)))
            (pool.commit if rng.random() < 0.8 else pool.abort)(r.reservation_id)
        elif op < 0.75:
            lease = pool.lookup(keys, rng.uniform(0.5, 5.0))
            assert pool.verify(lease.slab_ids, lease.generations) == lease.num_chunks
            leases.append(lease)
        elif op < 0.9 and leases:
            pool.release(leases.pop(rng.randrange(len(leases))).lease_id)
        elif op < 0.99:
            clock.now += rng.uniform(0.0, 0.5)
        else:
            pool.clear()
        st = pool.stats()
        assert st.used_slabs >= st.committed_chunks
    committed = pool.committed_keys()
    assert len(set(committed)) == len(committed)
    # Let every lease and reservation lapse: only committed chunks may hold slabs.
    clock.now += 100.0
    st = pool.stats()
    assert st.leases == 0 and st.reservations == 0 and st.pinned_slabs == 0
    assert st.used_slabs == st.committed_chunks
    assert pool.clear() == st.committed_chunks
    assert pool.stats().used_slabs == 0
    res = pool.reserve([k(1000 + i) for i in range(n + 1)], 1.0)
    assert sorted(res.slab_ids) == list(range(n))


def test_concurrent_threads_keep_index_consistent() -> None:
    pool = make_pool(8, clock=None)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                keys = [k(rng.randrange(20)) for _ in range(3)]
                res = pool.reserve(keys, 30.0)
                pool.commit(res.reservation_id)
                lease = pool.lookup(keys, 30.0)
                # Pinned slabs must keep their generation whatever others do.
                assert pool.verify(lease.slab_ids, lease.generations) == lease.num_chunks
                pool.release(lease.lease_id)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    st = pool.stats()
    assert st.leases == 0 and st.reservations == 0 and st.used_slabs == st.committed_chunks
