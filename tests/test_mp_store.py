"""MPStore against a real daemon subprocess: cross-process round trips, failures of
the daemon (down, killed mid-load / mid-store, restarted), eviction under
concurrent clients, TP ranks, late replies."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
import zmq

from lmc_transfer.config import load_config
from lmc_transfer.kernels import SlotRangeError
from lmc_transfer.store.mp_client import DaemonConnection, DaemonUnavailable, MPStore, StoreClosed
from lmc_transfer.transfer.store_copies import StoreCopies
from lmc_transfer.daemon.protocol import PROTOCOL_VERSION, MsgType
from tests.conftest_mp import (  # noqa: F401  (fixtures)
    CHUNK,
    LAYERS,
    SLAB_BYTES,
    daemons,
    engine_load,
    expected_after_load,
    kv_bytes,
    make_buffers,
    prompt_keys,
    run_engine,
    start_daemon,
    tokens_for,
    workdir,
    write_config,
)

pytestmark = pytest.mark.timeout(120)


def rows(store: MPStore, slots: torch.Tensor) -> torch.Tensor:
    return kv_bytes(store.buffers, slots)


def test_round_trip_across_processes(workdir, daemons):
    """Engine A stores and exits; engine B (a new process) loads byte-exact."""
    cfg = write_config(workdir)
    d = start_daemon(daemons, cfg)
    assert run_engine("store", "--config", str(cfg), "--seed", "21", "--chunks", "4") == {"committed": 4}
    out = workdir / "b.bin"
    assert run_engine("load", "--config", str(cfg), "--seed", "21", "--chunks", "4", "--out", str(out)) == {"hit": 4, "loaded": 4}
    assert out.read_bytes() == expected_after_load(21, 4)
    # an engine restart in this process finds it too, and a prompt never stored misses
    _, kv = engine_load(d.config, 21, 4)
    assert kv == expected_after_load(21, 4)
    assert engine_load(d.config, 22, 4)[0] == {"hit": 0, "loaded": 0}


def test_daemon_down_means_miss_and_dropped_store_within_timeouts(workdir, daemons):
    cfg = write_config(workdir, lookup_timeout_ms=150, request_timeout_ms=250)
    config = load_config(cfg)
    start = time.monotonic()
    store = MPStore(config, make_buffers(31))  # no daemon yet: not an error
    try:
        assert time.monotonic() - start < 1.0
        keys = prompt_keys(store.buffers, tokens_for(31, 3))
        for _ in range(3):
            t = time.monotonic()
            assert store.lookup(keys).num_chunks == 0
            res = store.reserve(keys)
            assert res.num_chunks == 0 and store.save(res, torch.arange(3 * CHUNK)) == 0
            assert time.monotonic() - t < 0.15 + 0.25 + 0.1
        stats = store.stats()
        assert (stats.lookups, stats.miss_chunks, stats.dropped_chunks, stats.extra["connected"]) == (3, 9, 9, 0.0)
        start_daemon(daemons, cfg)
        deadline = time.monotonic() + 5  # backoff is at most 2 s
        committed = 0
        while not committed and time.monotonic() < deadline:
            committed = store.save(store.reserve(keys), torch.arange(3 * CHUNK))
            time.sleep(0.05)
        assert committed == 3
        lease = store.lookup(keys)
        assert lease.num_chunks == 3
        store.release(lease)
    finally:
        store.close()


def test_daemon_killed_mid_load_and_mid_store(workdir, daemons):
    cfg = write_config(workdir, lookup_timeout_ms=150, request_timeout_ms=250)
    d = start_daemon(daemons, cfg)
    writer = MPStore(d.config, make_buffers(41))
    reader = MPStore(d.config, make_buffers(41 + 500))
    try:
        keys = prompt_keys(writer.buffers, tokens_for(41, 4))
        assert writer.save(writer.reserve(keys), torch.arange(4 * CHUNK)) == 4
        lease = reader.lookup(keys)
        assert lease.num_chunks == 4
        more = prompt_keys(writer.buffers, tokens_for(42, 2))
        pending = writer.reserve(more)
        assert pending.num_chunks == 2
        d.stats()
        d.kill()  # SIGKILL while a lease and a reservation are outstanding

        # mid-load: the copy from the still-mapped segment is either exact or reported missing
        before = rows(reader, torch.arange(512)).clone()
        dest = torch.arange(4 * CHUNK) + 100
        t = time.monotonic()
        loaded = reader.load(lease, dest)
        n = loaded.tokens_loaded
        assert torch.equal(rows(reader, dest[:n]), rows(writer, torch.arange(n)))
        untouched = torch.ones(512, dtype=torch.bool)
        untouched[dest] = False
        assert torch.equal(kv_bytes(reader.buffers, torch.arange(512)[untouched]),
                           _select(before, untouched))
        reader.release(lease)
        # mid-store: the commit cannot reach the daemon: dropped, counted, bounded in time
        assert writer.save(pending, torch.arange(2 * CHUNK)) == 0
        assert writer.stats().dropped_chunks == 2
        assert reader.lookup(keys).num_chunks == 0
        assert time.monotonic() - t < 4 * 0.25 + 0.5

        # a new daemon (new segment, new epoch): the old lease loads nothing, new work succeeds
        d2 = start_daemon(daemons, cfg)
        assert d2.stats()["segment"] is None
        deadline = time.monotonic() + 5
        committed = 0
        while not committed and time.monotonic() < deadline:
            committed = writer.save(writer.reserve(keys), torch.arange(4 * CHUNK))
            time.sleep(0.05)
        assert committed == 4
        assert reader.load(lease, dest) == type(loaded)(0, 0)
        lease2 = reader.lookup(keys)
        deadline = time.monotonic() + 5
        while lease2.num_chunks == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            lease2 = reader.lookup(keys)
        assert lease2.num_chunks == 4
        dest2 = torch.arange(4 * CHUNK) + 300
        assert reader.load(lease2, dest2).chunks_loaded == 4
        assert torch.equal(rows(reader, dest2), rows(writer, torch.arange(4 * CHUNK)))
        reader.release(lease2)
    finally:
        writer.close()
        reader.close()


def _select(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows ``mask`` of a ``kv_bytes`` dump of all 512 slots, in kv_bytes' order."""
    per_plane = flat.view(LAYERS * 2, 512, -1)
    return per_plane[:, mask].reshape(-1)


def test_generation_change_is_reported_as_a_miss(workdir, daemons):
    cfg = write_config(workdir, lease_ttl_s=0.5, max_local_cpu_size=2 * SLAB_BYTES / 1024**3)
    d = start_daemon(daemons, cfg)
    a = MPStore(d.config, make_buffers(51))
    b = MPStore(d.config, make_buffers(52))
    try:
        keys = [bytes([1]) * 32, bytes([2]) * 32]
        assert a.save(a.reserve(keys), torch.arange(2 * CHUNK)) == 2
        lease = a.lookup(keys)
        assert a.verify(lease) == 2
        time.sleep(0.7)  # the lease expires; b's store evicts and rewrites both slabs
        other = [bytes([3]) * 32, bytes([4]) * 32]
        assert b.save(b.reserve(other), torch.arange(2 * CHUNK)) == 2
        assert a.verify(lease) == 0
        assert a.load(lease, torch.arange(2 * CHUNK) + 64).chunks_loaded == 0
        assert a.stats().generation_misses == 2
    finally:
        a.close()
        b.close()


def test_eviction_under_pressure_with_concurrent_clients(workdir, daemons, monkeypatch):
    """Three engines store and load distinct prompts through an 8-slab pool; every
    chunk that loads is byte-exact, and the pool evicts."""
    # Without a GPU the kernels run in Triton's interpreter, which is not thread-safe:
    # serialise the copies only; the daemon requests of the engines still interleave.
    copy_lock = threading.Lock()
    for name in ("load", "save"):
        original = getattr(StoreCopies, name)

        def locked(self, *args, _original=original, **kwargs):
            with copy_lock:
                return _original(self, *args, **kwargs)

        monkeypatch.setattr(StoreCopies, name, locked)
    cfg = write_config(workdir, max_local_cpu_size=8 * SLAB_BYTES / 1024**3, lookup_timeout_ms=2000, request_timeout_ms=2000)
    d = start_daemon(daemons, cfg)
    errors: list[str] = []
    hits = [0, 0, 0]

    def engine(idx: int) -> None:
        store = MPStore(d.config, make_buffers(60 + idx))
        try:
            for rnd in range(12):
                # store one of the engine's prompts, then read back both: the fresh one
                # usually hits, the older one has often been evicted by the others
                for step, seed_off in enumerate((rnd % 2, 1 - rnd % 2)):
                    seed = 100 * idx + seed_off
                    keys = prompt_keys(store.buffers, tokens_for(seed, 2))
                    src = torch.arange(2 * CHUNK) + 64 * seed_off  # each prompt's KV lives at its own slots
                    if step == 0:
                        store.save(store.reserve(keys), src)
                    lease = store.lookup(keys)
                    if lease.num_chunks:
                        dest = torch.arange(lease.num_chunks * CHUNK) + 400
                        got = store.load(lease, dest)
                        n = got.tokens_loaded
                        if not torch.equal(rows(store, dest[:n]), rows(store, src[:n])):
                            errors.append(f"engine {idx} round {rnd}: wrong bytes")
                        hits[idx] += got.chunks_loaded
                    store.release(lease)
        except Exception as exc:  # surfaced by the main thread
            errors.append(f"engine {idx}: {exc!r}")
        finally:
            store.close()

    threads = [threading.Thread(target=engine, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    stats = d.stats()
    pool = stats["pool"]
    assert pool["evictions"] > 0
    assert pool["committed_chunks"] <= 8 and (pool["leases"], pool["reservations"], pool["pinned_slabs"]) == (0, 0, 0)
    assert sum(hits) > 0 and stats["counters"]["hit_chunks"] >= sum(hits)
    assert stats["counters"]["lookups"] == 3 * 12 * 2


def test_two_tp_ranks_never_collide(workdir, daemons):
    """Two ranks store the same prompt with their own head shard; each loads its own."""
    d = start_daemon(daemons, write_config(workdir))
    tokens = tokens_for(70, 3)
    ranks = [MPStore(d.config, make_buffers(70 + r)) for r in range(2)]
    try:
        keys = [prompt_keys(s.buffers, tokens, tp_rank=r, tp_size=2) for r, s in enumerate(ranks)]
        assert not set(keys[0]) & set(keys[1])
        for r, s in enumerate(ranks):
            assert s.save(s.reserve(keys[r]), torch.arange(3 * CHUNK)) == 3
        assert d.stats()["pool"]["committed_chunks"] == 6
        for r, s in enumerate(ranks):
            lease = s.lookup(keys[r])
            dest = torch.arange(3 * CHUNK) + 200
            assert s.load(lease, dest).chunks_loaded == 3
            assert torch.equal(rows(s, dest), rows(s, torch.arange(3 * CHUNK)))
            s.release(lease)
        assert not torch.equal(rows(ranks[0], torch.arange(CHUNK)), rows(ranks[1], torch.arange(CHUNK)))
    finally:
        for s in ranks:
            s.close()


def test_late_reply_to_a_timed_out_request_is_discarded(workdir):
    """A slow daemon answers request 1 after its deadline; request 2 gets its own reply."""
    url = f"ipc://{workdir}/slow.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(url)
    stop = threading.Event()

    def slow_server() -> None:
        import json

        pending = []
        while not stop.is_set():
            if router.poll(20):
                ident, frame = router.recv_multipart()
                pending.append((ident, json.loads(frame)["id"]))
            if len(pending) == 2:  # answer the old request first, then the new one
                for ident, rid in pending:
                    router.send_multipart([ident, json.dumps({"v": PROTOCOL_VERSION, "id": rid, "ok": True, "body": {"answer": rid}}).encode()])
                pending.clear()

    thread = threading.Thread(target=slow_server)
    thread.start()
    conn = DaemonConnection(url)
    conn._socket()  # one socket for both requests: a timeout must not lose the late reply's correlation
    conn.reset = lambda: None  # keep the socket, so the late reply really arrives on it
    try:
        with pytest.raises(DaemonUnavailable):
            conn.request(MsgType.PING, deadline=time.monotonic() + 0.2)
        assert conn.request(MsgType.PING, deadline=time.monotonic() + 2) == {"answer": 2}
    finally:
        stop.set()
        thread.join(timeout=5)
        del conn.reset
        conn.close()
        router.close()
        ctx.term()


def test_bad_slots_abort_the_save_at_once_and_are_named(workdir, daemons):
    """A store with an out-of-range or negative slot would commit the slab's old bytes for
    that row: it is refused, and its keys are free to be stored again right away."""
    d = start_daemon(daemons, write_config(workdir))
    store = MPStore(d.config, make_buffers(61))
    try:
        keys = prompt_keys(store.buffers, tokens_for(61, 2))
        slots = torch.arange(2 * CHUNK)
        slots[CHUNK + 3] = store.buffers.num_slots + 9
        with pytest.raises(SlotRangeError, match=rf"slots\[{CHUNK + 3}\] = {store.buffers.num_slots + 9} is outside"):
            store.save(store.reserve(keys), slots)
        assert d.stats()["pool"]["reservations"] == 0
        slots[CHUNK + 3] = -1
        with pytest.raises(SlotRangeError, match=rf"slots\[{CHUNK + 3}\] = -1 is outside"):
            store.save(store.reserve(keys), slots)
        assert store.save(store.reserve(keys), torch.arange(2 * CHUNK)) == 2
        lease = store.lookup(keys)
        far = torch.arange(2 * CHUNK) + 40
        far[1] = store.buffers.num_slots
        with pytest.raises(SlotRangeError, match=rf"slots\[1\] = {store.buffers.num_slots} is past the end"):
            store.load(lease, far)
        store.release(lease)
    finally:
        store.close()


def test_calls_after_close_raise_a_clear_error(workdir, daemons):
    d = start_daemon(daemons, write_config(workdir))
    store = MPStore(d.config, make_buffers(63))
    keys = prompt_keys(store.buffers, tokens_for(63, 1))
    assert store.save(store.reserve(keys), torch.arange(CHUNK)) == 1
    lease = store.lookup(keys)
    store.close()
    store.close()  # idempotent
    for call in (lambda: store.lookup(keys), lambda: store.reserve(keys), store.daemon_stats, store.clear):
        with pytest.raises(StoreClosed, match=rf"this MPStore \(cache daemon at {d.config.mp_url}\) is closed"):
            call()
    store.release(lease)  # what is left over is let go quietly (the lease expires in the daemon)


def test_the_link_to_the_daemon_is_logged_once_per_change(workdir, daemons, caplog):
    cfg = write_config(workdir, lookup_timeout_ms=150, request_timeout_ms=250)
    caplog.set_level(logging.DEBUG, logger="lmc_transfer.store.mp_client")
    store = MPStore(load_config(cfg), make_buffers(64))
    try:
        keys = prompt_keys(store.buffers, tokens_for(64, 2))
        for _ in range(5):
            assert store.lookup(keys).num_chunks == 0
            assert store.reserve(keys).num_chunks == 0
            time.sleep(0.06)
        d = start_daemon(daemons, cfg)
        deadline = time.monotonic() + 5
        while store.save(store.reserve(keys), torch.arange(2 * CHUNK)) != 2:
            assert time.monotonic() < deadline, "the store never reconnected"
            time.sleep(0.05)
        for _ in range(5):
            store.release(store.lookup(keys))
        d.stop()
        for _ in range(5):
            assert store.lookup(keys).num_chunks == 0
    finally:
        store.close()
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    url = load_config(cfg).mp_url
    assert [level for level, _ in records] == [logging.WARNING] * 3, records
    assert records[0][1].startswith(f"cache daemon at {url} unreachable: ")
    assert records[0][1].endswith("; lookups miss and stores are dropped until it answers")
    assert records[1][1].startswith(f"cache daemon at {url}: reachable again (epoch ")
    assert records[2][1].startswith(f"cache daemon at {url} unreachable: ")
