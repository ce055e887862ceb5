"""The MP daemon with a Redis remote tier: two daemons ("hosts") share one real
redis-server on loopback (started and stopped by the fixture from test_remote_tier)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from lmc_transfer.tiers.format import geometry_digest
from lmc_transfer.store.mp_client import MPStore
from lmc_transfer.daemon.protocol import MsgType
from tests.conftest_mp import (  # noqa: F401  (fixtures)
    CHUNK,
    daemons,
    engine_load,
    engine_store,
    expected_after_load,
    kv_bytes,
    make_buffers,
    prompt_keys,
    start_daemon,
    tokens_for,
    workdir,
    write_config,
)
# Imports the redis client the way test_remote_tier does (a skip without it, unless CI requires it).
from tests.test_remote_tier import RedisServer, needs_redis_server, server  # noqa: F401  (fixture)

pytestmark = [needs_redis_server, pytest.mark.timeout(120)]

LOOKUP_TIMEOUT_S = 0.3  # write_config's lookup_timeout_ms
REMOTE_TIMEOUT_MS = 100
#: A model whose every token takes ~30 minutes to recompute: fetching any remote prefix pays.
SLOW_RECOMPUTE = {"remote_model_params_b": 1000.0, "remote_recompute_tflops": 0.001}


def _host(workdir: Path, name: str, server: RedisServer, **overrides) -> Path:
    """The config of one "host": its own directory, socket and (so) segment."""
    directory = workdir / name
    directory.mkdir()
    settings = {"remote_url": server.url, "remote_timeout_ms": REMOTE_TIMEOUT_MS, **SLOW_RECOMPUTE, **overrides}
    return write_config(directory, **settings)


def _redis_chunk_key(seed: int, index: int) -> bytes:
    buffers = make_buffers(0)
    digest = geometry_digest(buffers.geometry, CHUNK)
    return b"lmc:" + digest.hex().encode() + b":c:" + prompt_keys(buffers, tokens_for(seed, index + 1))[index]


def _check_load(d, seed: int, chunks: int, hit: int) -> None:
    result, kv = engine_load(d.config, seed, chunks)
    assert result == {"hit": hit, "loaded": hit}
    assert kv == expected_after_load(seed, hit)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def _stored_chunks(server: RedisServer) -> int:
    return sum(1 for _ in server.client().scan_iter(match=b"lmc:*:c:*"))


def test_prefix_stored_through_one_host_loads_byte_exact_on_another(workdir, daemons, server):
    a = start_daemon(daemons, _host(workdir, "a", server))
    b = start_daemon(daemons, _host(workdir, "b", server))
    assert engine_store(a.config, 21, 3) == {"committed": 3}
    assert a.stop() == 0 and a.leftovers() == []  # SIGTERM flushes the write-behind
    assert _stored_chunks(server) == 3
    _check_load(b, 21, 3, hit=3)
    remote = b.stats()["remote"]
    assert b.stats()["counters"]["remote_promotions"] == 3
    assert (remote["hits"], remote["filled"], remote["corrupt_dropped"], remote["errors"]) == (3, 3, 0, 0)
    # what came from the remote is not written back
    assert (remote["puts"], remote["queued"], remote["skipped_refill"]) == (0, 0, 3)
    # a second engine on B hits L1: no more remote traffic
    _check_load(b, 21, 3, hit=3)
    assert b.stats()["remote"]["gets"] == remote["gets"]
    # a prompt nobody stored is a miss on every tier
    _check_load(b, 99, 2, hit=0)
    assert b.stop() == 0 and b.leftovers() == []


def test_corrupt_value_in_redis_is_rejected_and_never_served(workdir, daemons, server):
    a = start_daemon(daemons, _host(workdir, "a", server))
    assert engine_store(a.config, 23, 3) == {"committed": 3}
    assert a.stop() == 0
    r = server.client()
    key = _redis_chunk_key(23, 1)
    value = bytearray(r.get(key))
    value[-1] ^= 0x40  # one bit of the last payload byte
    r.set(key, bytes(value))
    b = start_daemon(daemons, _host(workdir, "b", server))
    _check_load(b, 23, 3, hit=1)  # chunk 0 only: the prefix stops at the corrupt chunk
    remote = b.stats()["remote"]
    assert (remote["corrupt_dropped"], remote["filled"]) == (1, 1)
    assert r.get(key) is None, "the corrupt value is deleted"
    assert r.get(_redis_chunk_key(23, 2)) is not None
    assert b.stop() == 0 and b.leftovers() == []


def test_a_value_copied_under_another_key_is_never_served(workdir, daemons, server):
    """Another host (or anyone with Redis access) copies valid values to other chunk keys:
    before values were bound to their key, every copied chunk was served as a hit."""
    a = start_daemon(daemons, _host(workdir, "a", server))
    assert engine_store(a.config, 27, 3) == {"committed": 3}
    assert a.stop() == 0
    r = server.client()
    for i in range(3):
        r.set(_redis_chunk_key(28, i), r.get(_redis_chunk_key(27, i)))  # prompt 28's keys, prompt 27's bytes
    b = start_daemon(daemons, _host(workdir, "b", server))
    _check_load(b, 28, 3, hit=0)
    remote = b.stats()["remote"]
    assert (remote["filled"], remote["hits"]) == (0, 0)
    # Chunk 0 ends the prefix; the parallel reads of chunks 1 and 2 may have found theirs invalid too.
    deleted = [r.get(_redis_chunk_key(28, i)) is None for i in range(3)]
    assert deleted[0], "the misplaced value is deleted"
    assert remote["corrupt_dropped"] == sum(deleted)
    _check_load(b, 27, 3, hit=3)  # the originals still serve
    assert b.stop() == 0 and b.leftovers() == []


def test_a_remote_prefix_slower_than_recomputing_it_is_skipped_and_counted(workdir, daemons, server):
    """The test model's geometry (2 layers, 2 KV heads x 8) makes a 2 KiB chunk cost nanoseconds to
    recompute at the default FLOP rate: no Redis can beat that, so after the first fill's probe
    (one chunk over one connection) the daemon leaves the rest of the prefix to the engine."""
    a = start_daemon(daemons, _host(workdir, "a", server))
    assert engine_store(a.config, 29, 6) == {"committed": 6}
    remote = a.stats()["remote"]
    assert (remote["est_bytes_per_s"], remote["est_latency_s"]) == (0.0, 0.0), "nothing fetched: no estimate"
    assert a.stop() == 0
    no_cost = {"remote_model_params_b": None, "remote_recompute_tflops": 500.0, "remote_connections": 1}
    b = start_daemon(daemons, _host(workdir, "b", server, **no_cost))
    _check_load(b, 29, 6, hit=1)
    remote = b.stats()["remote"]
    assert (remote["probes"], remote["filled"], remote["cost_skips"], remote["cost_skipped_chunks"]) == (1, 1, 1, 5)
    assert remote["est_bytes_per_s"] > 0 and remote["est_latency_s"] > 0
    exists = server.client().info("commandstats")["cmdstat_exists"]["calls"]
    _check_load(b, 29, 6, hit=1)  # chunk 0 from L1; the rest skipped without asking Redis
    remote = b.stats()["remote"]
    assert (remote["gets"], remote["cost_skips"], remote["cost_skipped_chunks"]) == (1, 2, 5)
    assert server.client().info("commandstats")["cmdstat_exists"]["calls"] == exists
    assert b.stop() == 0 and b.leftovers() == []


def test_redis_hung_then_killed_mid_fetch_is_a_bounded_miss_and_recovers(workdir, daemons, server):
    a = start_daemon(daemons, _host(workdir, "a", server))
    assert engine_store(a.config, 24, 3) == {"committed": 3}
    assert a.stop() == 0
    b = start_daemon(daemons, _host(workdir, "b", server))
    buffers = make_buffers(24 + 500)
    before = kv_bytes(buffers, torch.arange(buffers.num_slots)).clone()
    store = MPStore(b.config, buffers)
    try:
        server.signal(signal.SIGSTOP)  # the server stops answering in the middle of the fill
        try:
            keys = prompt_keys(buffers, tokens_for(24, 3))
            start = time.monotonic()
            lease = store.lookup(keys)
            elapsed = time.monotonic() - start
            assert lease.num_chunks == 0
            assert elapsed < LOOKUP_TIMEOUT_S, f"lookup took {elapsed:.3f}s"
            assert torch.equal(kv_bytes(buffers, torch.arange(buffers.num_slots)), before)
            assert b.request(MsgType.PING)["pid"] == b.proc.pid, "the daemon keeps serving"
        finally:
            server.signal(signal.SIGKILL)
            server.proc.wait(timeout=10)
        assert b.stats()["remote"]["errors"] >= 1
        server.start()  # same port, empty
        _wait_for(lambda: not b.stats()["remote"]["breaker_open"], 20, "the remote tier to reconnect")
        # recovery: B writes behind again, and serves from the remote once L1 is gone
        assert engine_store(b.config, 25, 3) == {"committed": 3}
        _wait_for(lambda: _stored_chunks(server) == 3, 10, "the write-behind of 3 chunks")
        assert b.request(MsgType.CLEAR)["cleared"] == 3
        _check_load(b, 25, 3, hit=3)
        assert b.stats()["counters"]["remote_promotions"] == 3
    finally:
        store.close()
    assert b.stop() == 0 and b.leftovers() == []


def test_fetch_failing_after_the_existence_check_is_a_miss(workdir, daemons, tmp_path):
    # GET is disabled on this server: EXISTS answers, every fetch fails mid-fill.
    srv = RedisServer(tmp_path, extra_args=("--rename-command", "GET", ""))
    srv.start()
    try:
        a = start_daemon(daemons, _host(workdir, "a", srv))
        assert engine_store(a.config, 26, 2) == {"committed": 2}
        assert a.stop() == 0
        assert _stored_chunks(srv) == 2
        b = start_daemon(daemons, _host(workdir, "b", srv))
        start = time.monotonic()
        _check_load(b, 26, 2, hit=0)
        assert time.monotonic() - start < 10  # a fresh engine process, not a hang
        remote = b.stats()["remote"]
        assert (remote["errors"], remote["gets"], remote["filled"], remote["hits"]) == (1, 2, 0, 0)  # EXISTS found 2, GET failed
        assert b.stop() == 0 and b.leftovers() == []
    finally:
        srv.stop()


def test_ip_stores_on_two_hosts_share_the_remote_tier(server):
    from lmc_transfer.config import LMCTransferConfig
    from lmc_transfer.store.ip import IPStore
    from tests.conftest_mp import SLAB_BYTES

    config = LMCTransferConfig(
        chunk_size=CHUNK,
        max_local_cpu_size=16 * SLAB_BYTES / 1024**3,
        remote_url=server.url,
        remote_timeout_ms=REMOTE_TIMEOUT_MS,
        **SLOW_RECOMPUTE,
    )
    src, dst = make_buffers(31), make_buffers(31 + 500)
    keys = prompt_keys(src, tokens_for(31, 3))
    a = IPStore(config, src)
    try:
        assert a.save(a.reserve(keys), torch.arange(3 * CHUNK)) == 3
        assert a.flush_remote(5)
    finally:
        a.close()
    assert _stored_chunks(server) == 3
    b = IPStore(config, dst)
    try:
        lease = b.lookup(keys)
        assert lease.num_chunks == 3
        shift = 7
        assert b.load(lease, torch.arange(3 * CHUNK) + shift).chunks_loaded == 3
        b.release(lease)
        assert b.flush_remote(5)
        stats = b._remote.stats()
        assert (stats.filled, stats.queued, stats.skipped_refill) == (3, 0, 3)
    finally:
        b.close()
    expected = make_buffers(31 + 500)
    for layer in range(2):
        for plane in range(2):
            expected.plane_rows(layer, plane)[shift : shift + 3 * CHUNK] = src.plane_rows(layer, plane)[: 3 * CHUNK]
    assert torch.equal(kv_bytes(dst, torch.arange(dst.num_slots)), kv_bytes(expected, torch.arange(dst.num_slots)))
