"""RemoteTier (and RemoteSync's write-behind into it) against a real redis-server started on a
free loopback port."""

from __future__ import annotations

import importlib
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

#: CI (.ci/run) sets this to 1: there a missing redis-server or redis client fails these tests
#: instead of skipping them, so a broken install can never pass as green.
REQUIRE_REDIS_ENV = "LMC_TRANSFER_REQUIRE_REDIS"
REDIS_REQUIRED = os.environ.get(REQUIRE_REDIS_ENV) == "1"
redis = importlib.import_module("redis") if REDIS_REQUIRED else pytest.importorskip("redis")

from lmc_transfer.store.pool import SlabPool  # noqa: E402
from lmc_transfer.tiers.format import HEADER_BYTES, SlabFormat  # noqa: E402
from lmc_transfer.tiers.remote import RemoteTier, TLSOptions, _CircuitBreaker  # noqa: E402
from lmc_transfer.tiers.remote_cost import FetchPolicy, RecomputeModel  # noqa: E402
from lmc_transfer.tiers.remote_sync import RemoteSync  # noqa: E402
from tests.redis_proxy import RedisProxy  # noqa: E402
from tests.test_pool import FakeClock  # noqa: E402

REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None and not REDIS_REQUIRED, reason="redis-server binary not installed (apt-get install redis-server)"
)
pytestmark = [needs_redis_server, pytest.mark.timeout(60)]

GEOM_A = b"\x01" * 32  # two slab formats (geometry digests): two namespaces
GEOM_B = b"\x02" * 32
TIMEOUT_S = 0.2
SLACK_S = 0.5


# A cluster node also listens on its port + 10000 (the cluster bus), so that port must exist and be free too.
CLUSTER_BUS_OFFSET = 10000


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(bus_offset: int | None = None) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if bus_offset is None:
            return port
        if port + bus_offset <= 65535 and _port_is_free(port + bus_offset):
            return port
    raise RuntimeError(f"no free loopback port with a free port {bus_offset} above it after 200 tries")


class RedisServer:
    """One redis-server process on loopback; restartable on the same port."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = (), bus_offset: int | None = None) -> None:
        self.workdir = workdir
        self.port = _free_port(bus_offset)
        self.extra_args = extra_args
        self.log_path = workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if REDIS_SERVER is None:
            pytest.fail(f"redis-server is not on PATH and {REQUIRE_REDIS_ENV}=1 requires the remote-tier tests to run")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes", "--logfile", str(self.log_path), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except redis.exceptions.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else "(no log)"
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start; its log ends:\n{log}")
                time.sleep(0.05)

    def client(self) -> "redis.Redis":
        return redis.Redis(port=self.port, socket_timeout=5)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def tiers() -> Iterator[list[RemoteTier]]:
    made: list[RemoteTier] = []
    try:
        yield made
    finally:
        for t in made:
            t.close()


def _tier(tiers: list[RemoteTier], url: str, size: int, geometry: bytes = GEOM_A, **kw) -> RemoteTier:
    kw.setdefault("timeout_s", TIMEOUT_S)
    kw.setdefault("backoff_initial_s", 0.05)
    kw.setdefault("backoff_max_s", 0.2)
    t = RemoteTier(url, SlabFormat(geometry, size), **kw)
    tiers.append(t)
    return t


def _put(tier: RemoteTier, key: bytes, payload: bytes) -> bool:
    return tier.put(key, tier.format.encode(key, payload))


def _fetch(tier: RemoteTier, keys: list[bytes], timeout_s: float = 5.0) -> list[bytes]:
    """The payloads ``fetch_into`` delivered, read into destinations that start as random bytes."""
    rng = np.random.default_rng(len(keys))
    dests = [rng.integers(0, 256, tier.format.payload_bytes, dtype=np.uint8) for _ in keys]
    arrived = tier.fetch_into(keys, dests, time.monotonic() + timeout_s)
    return [d.tobytes() for d in dests[:arrived]]


def always_fetch(tier: RemoteTier) -> FetchPolicy:
    """A cost rule under which any fetch pays: recomputing a token takes an hour."""
    return FetchPolicy(RecomputeModel(3600.0), 1, tier.format.value_bytes, probe_chunks=tier.connections)


def _chunks(n: int, size: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(seed)
    keys = [rng.randbytes(32) for _ in range(n)]
    payloads = [rng.randbytes(size) for _ in range(n)]
    return keys, payloads


def _redis_key(geometry: bytes, key: bytes) -> bytes:
    return b"lmc:" + geometry.hex().encode() + b":c:" + key


def test_round_trip_byte_exact(server: RedisServer, tiers: list[RemoteTier]) -> None:
    tier = _tier(tiers, server.url, 4096 + 7)
    keys, payloads = _chunks(5, 4096 + 7, seed=1)
    for k, p in zip(keys[:4], payloads[:4]):
        assert _put(tier, k, p)
    assert tier.longest_prefix(keys) == 4
    assert tier.longest_prefix(keys[1:]) == 3
    assert tier.longest_prefix([keys[4]] + keys[:4]) == 0
    assert _fetch(tier, keys) == payloads[:4]
    stored = server.client().get(_redis_key(GEOM_A, keys[0]))
    assert stored == tier.format.encode(keys[0], payloads[0])
    assert len(stored) == HEADER_BYTES + len(payloads[0])
    s = tier.stats()
    assert (s.puts, s.put_errors, s.gets, s.hits, s.corrupt_dropped, s.errors) == (4, 0, 5, 4, 0, 0)


def test_two_hosts_share_one_redis(server: RedisServer, tiers: list[RemoteTier]) -> None:
    keys, payloads = _chunks(3, 65536, seed=3)
    host_a = _tier(tiers, server.url, 65536)
    for k, p in zip(keys, payloads):
        assert _put(host_a, k, p)
    host_a.close()
    host_b = _tier(tiers, server.url, 65536)
    assert host_b.longest_prefix(keys) == 3
    assert _fetch(host_b, keys) == payloads


def test_namespace_isolation(server: RedisServer, tiers: list[RemoteTier]) -> None:
    keys, payloads = _chunks(2, 100, seed=4)
    a = _tier(tiers, server.url, 100, geometry=GEOM_A)
    b = _tier(tiers, server.url, 100, geometry=GEOM_B)
    assert _put(a, keys[0], payloads[0])
    assert _put(b, keys[0], payloads[1])  # same chunk key, another slab format
    assert _fetch(a, keys[:1]) == [payloads[0]]
    assert _fetch(b, keys[:1]) == [payloads[1]]
    assert a.longest_prefix(keys[1:]) == 0


def _corruptions(value: bytes, other_key_value: bytes) -> dict[str, bytes]:
    flipped = bytearray(value)
    flipped[HEADER_BYTES + 17] ^= 0x01
    wrong_version = bytearray(value)
    wrong_version[8] += 1
    payload = value[HEADER_BYTES:]
    return {
        "flipped": bytes(flipped),
        "truncated": value[:-1],
        "header_only": value[: HEADER_BYTES - 1],
        "wrong_geometry": SlabFormat(GEOM_B, len(payload)).encode(value[48:80], payload),
        "wrong_version": bytes(wrong_version),
        "other_key": other_key_value,  # a valid value, copied under another key
        "older_format": struct.pack("<4sHH16sQI", b"LMCR", 1, 0, bytes(16), len(payload), 0) + payload,
    }


@pytest.mark.parametrize(
    "kind", ["flipped", "truncated", "header_only", "wrong_geometry", "wrong_version", "other_key", "older_format"]
)
def test_invalid_value_rejected_counted_deleted(server: RedisServer, tiers: list[RemoteTier], kind: str) -> None:
    tier = _tier(tiers, server.url, 2048)
    keys, payloads = _chunks(3, 2048, seed=5)
    for k, p in zip(keys, payloads):
        assert _put(tier, k, p)
    raw = server.client()
    bad_key = _redis_key(GEOM_A, keys[1])
    raw.set(bad_key, _corruptions(raw.get(bad_key), raw.get(_redis_key(GEOM_A, keys[2])))[kind])
    assert _fetch(tier, keys) == payloads[:1]
    assert tier.stats().corrupt_dropped == 1
    assert raw.exists(bad_key) == 0
    assert raw.get(_redis_key(GEOM_A, keys[2])) == tier.format.encode(keys[2], payloads[2])


def _sync(
    tier: RemoteTier, num_slabs: int, seed: int, *, policy: FetchPolicy | None = None, timeout_s: float = 1.0, **kw
) -> tuple[RemoteSync, np.ndarray, np.ndarray]:
    data = np.random.default_rng(seed).integers(0, 256, num_slabs * tier.format.payload_bytes, dtype=np.uint8)
    gens = np.ones(num_slabs, dtype=np.uint64)
    sync = RemoteSync(tier, data, gens, policy=policy or always_fetch(tier), timeout_s=timeout_s, **kw)
    return sync, data, gens


def _pool(sync: RemoteSync, data: np.ndarray, gens: np.ndarray) -> SlabPool:
    return SlabPool(data, gens, sync.tier.format.payload_bytes, on_commit=sync.on_commit)


def _store_raw(server: RedisServer, tier: RemoteTier, n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """``n`` valid values written straight into Redis (faster than put for large values)."""
    keys, payloads = _chunks(n, tier.format.payload_bytes, seed)
    pipe = server.client().pipeline(transaction=False)
    for k, p in zip(keys, payloads):
        pipe.set(_redis_key(tier.format.geometry, k), tier.format.encode(k, p))
    pipe.execute()
    return keys, payloads


def _pool_bytes(pool: SlabPool, keys: list[bytes]) -> list[bytes]:
    """The committed bytes of the leading run of ``keys`` in ``pool``."""
    lease = pool.lookup(keys, 10.0)
    out = [pool.slab(s).tobytes() for s in lease.slab_ids]
    if lease.num_chunks:
        pool.release(lease.lease_id)
    return out


def _calls(server: RedisServer, command: str) -> int:
    return server.client().info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_write_behind_queue_full_drops_without_blocking(server: RedisServer, tiers: list[RemoteTier], caplog) -> None:
    caplog.set_level(logging.WARNING, logger="lmc_transfer.tiers.writeback")
    tier = _tier(tiers, server.url, 512, timeout_s=2.0)
    sync, data, _ = _sync(tier, 10, seed=6, max_queue=2)
    keys, _ = _chunks(10, 512, seed=6)
    server.signal(signal.SIGSTOP)  # the writer's first SET hangs until the socket timeout
    try:
        sync.on_commit(keys[0], 0)
        deadline = time.monotonic() + 5
        while not sync._writes._queue.empty():  # wait until the writer holds item 0 in flight
            assert time.monotonic() < deadline
            time.sleep(0.005)
        for i in range(1, 10):
            t0 = time.monotonic()
            sync.on_commit(keys[i], i)
            assert time.monotonic() - t0 < 0.05
        s = sync.stats()
        assert (s.queued, s.queue_full) == (2, 8)
        assert [r.getMessage() for r in caplog.records] == [
            "remote-tier: write-behind queue full (2 items); dropping writes until it drains"
        ]
    finally:
        server.signal(signal.SIGCONT)
    assert sync.flush(10)
    sync.close()


def test_write_behind_skips_a_slab_reused_before_its_copy(server: RedisServer, tiers: list[RemoteTier]) -> None:
    tier = _tier(tiers, server.url, 300)
    sync, data, gens = _sync(tier, 2, seed=15)
    keys, _ = _chunks(2, 300, seed=15)
    sync.on_commit(keys[0], 0)
    assert sync.flush(5)
    gens[1] += np.uint64(1)  # handed out again after the commit hook queued it (driven directly)
    sync._write((keys[1], 1, int(gens[1]) - 1))
    assert _fetch(tier, keys) == [data[:300].tobytes()]
    assert sync.stats().stale == 1 and tier.stats().puts == 1
    sync.close()


def test_ttl_applied_and_expires(server: RedisServer, tiers: list[RemoteTier]) -> None:
    tier = _tier(tiers, server.url, 100, ttl_s=30.0)
    keys, payloads = _chunks(1, 100, seed=8)
    assert _put(tier, keys[0], payloads[0])
    pttl = server.client().pttl(_redis_key(GEOM_A, keys[0]))
    assert 29_000 < pttl <= 30_000
    short = _tier(tiers, server.url, 100, geometry=GEOM_B, ttl_s=0.3)
    assert _put(short, keys[0], payloads[0])
    assert short.longest_prefix(keys) == 1
    time.sleep(0.5)
    assert short.longest_prefix(keys) == 0
    assert _fetch(short, keys) == []


def test_namespace_byte_budget_trims_oldest(server: RedisServer, tiers: list[RemoteTier]) -> None:
    size = 1000
    value_bytes = HEADER_BYTES + size
    tier = _tier(tiers, server.url, size, max_namespace_bytes=3 * value_bytes)
    other = _tier(tiers, server.url, size, geometry=GEOM_B, max_namespace_bytes=3 * value_bytes)
    keys, payloads = _chunks(5, size, seed=9)
    assert _put(other, keys[0], payloads[0])
    for k, p in zip(keys, payloads):  # one at a time, so write order is age order
        assert _put(tier, k, p)
    assert _put(tier, keys[4], payloads[4])  # a rewrite is not counted twice
    raw = server.client()
    assert [raw.exists(_redis_key(GEOM_A, k)) for k in keys] == [0, 0, 1, 1, 1]
    assert int(raw.get(b"lmc:" + GEOM_A.hex().encode() + b":m:bytes")) == 3 * value_bytes
    assert tier.stats().evicted == 2
    assert _fetch(other, keys[:1]) == payloads[:1]


def test_killed_mid_fetch_returns_miss_within_timeout(server: RedisServer, tiers: list[RemoteTier]) -> None:
    tier = _tier(tiers, server.url, 8 << 20)
    keys, payloads = _chunks(8, 8 << 20, seed=10)
    raw = server.client()
    for k, p in zip(keys, payloads):
        raw.set(_redis_key(GEOM_A, k), tier.format.encode(k, p))
    result: list = []
    done = threading.Event()

    def fetch() -> None:
        result.append(_fetch(tier, keys))
        done.set()

    worker = threading.Thread(target=fetch)
    worker.start()
    time.sleep(0.05)
    killed_at = time.monotonic()
    server.signal(signal.SIGKILL)
    assert done.wait(TIMEOUT_S + SLACK_S)
    worker.join()
    assert time.monotonic() - killed_at < TIMEOUT_S + SLACK_S
    assert result[0] == []  # the kill lands while the 64 MiB reply is being read
    assert (tier.stats().errors, tier.stats().hits) == (1, 0)
    t0 = time.monotonic()
    assert _fetch(tier, keys) == []
    assert tier.longest_prefix(keys) == 0
    assert time.monotonic() - t0 < TIMEOUT_S + SLACK_S


def test_hung_server_bounded_by_timeout_then_breaker(server: RedisServer, tiers: list[RemoteTier], caplog) -> None:
    caplog.set_level(logging.WARNING, logger="lmc_transfer.tiers.remote")
    tier = _tier(tiers, server.url, 256, backoff_initial_s=5.0, backoff_max_s=5.0)
    keys, payloads = _chunks(4, 256, seed=11)
    assert tier.longest_prefix(keys) == 0  # opens the pooled connection while healthy
    server.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert tier.longest_prefix(keys) == 0
        assert time.monotonic() - t0 < TIMEOUT_S + SLACK_S
        assert tier.stats().errors == 1 and tier.stats().breaker_open
        t0 = time.monotonic()
        assert _fetch(tier, keys) == []  # breaker open: no network wait at all
        assert not _put(tier, keys[0], payloads[0])
        assert time.monotonic() - t0 < 0.05
        assert (tier.stats().skipped, tier.stats().put_errors) == (1, 1)
    finally:
        server.signal(signal.SIGCONT)
    assert [r.getMessage() for r in caplog.records] == [
        f"remote tier (namespace {GEOM_A.hex()[:16]}) unavailable (TimeoutError): lookups miss and writes are "
        "dropped until it answers again"
    ]


def test_killed_mid_write_then_recovers_on_restart(server: RedisServer, tiers: list[RemoteTier], caplog) -> None:
    caplog.set_level(logging.WARNING, logger="lmc_transfer.tiers.remote")
    tier = _tier(tiers, server.url, 4 << 20)
    sync, data, _ = _sync(tier, 6, seed=12)
    keys, _ = _chunks(6, 4 << 20, seed=12)
    for i, k in enumerate(keys):
        sync.on_commit(k, i)
    time.sleep(0.02)
    server.signal(signal.SIGKILL)
    server.proc.wait(timeout=5)
    t0 = time.monotonic()
    assert sync.flush(5)
    assert time.monotonic() - t0 < 6 * (TIMEOUT_S + SLACK_S)
    s = tier.stats()
    assert s.puts + s.put_errors == 6 and s.put_errors >= 1
    assert tier.longest_prefix(keys) == 0
    assert _fetch(tier, keys) == []

    server.start()  # same port, empty data set (no persistence)
    deadline = time.monotonic() + 5
    while tier.stats().breaker_open:  # the monitor thread reconnects in the background
        assert time.monotonic() < deadline, "breaker did not close after the restart"
        time.sleep(0.02)
    assert tier.longest_prefix(keys) == 0
    for i, k in enumerate(keys[:2]):
        sync.on_commit(k, i)
    assert sync.flush(5)
    assert _fetch(tier, keys) == [data[: 4 << 20].tobytes(), data[4 << 20 : 8 << 20].tobytes()]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "unavailable" in messages[0] and messages[1].endswith("answers again"), messages
    sync.close()


def test_server_down_at_start_degrades_then_connects(tmp_path: Path, tiers: list[RemoteTier]) -> None:
    srv = RedisServer(tmp_path)
    try:
        tier = _tier(tiers, srv.url, 64)
        keys, payloads = _chunks(1, 64, seed=13)
        t0 = time.monotonic()
        assert tier.longest_prefix(keys) == 0
        assert not _put(tier, keys[0], payloads[0])
        assert time.monotonic() - t0 < TIMEOUT_S + SLACK_S
        assert tier.stats().put_errors == 1
        srv.start()
        deadline = time.monotonic() + 5
        while tier.stats().breaker_open:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _put(tier, keys[0], payloads[0])
        assert _fetch(tier, keys) == payloads
    finally:
        srv.stop()


def test_cluster_url(tmp_path: Path, tiers: list[RemoteTier]) -> None:
    srv = RedisServer(
        tmp_path,
        ("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf")),
        bus_offset=CLUSTER_BUS_OFFSET,
    )
    srv.start()
    try:
        raw = srv.client()
        raw.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in raw.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        tier = _tier(tiers, f"redis+cluster://127.0.0.1:{srv.port}", 300, max_namespace_bytes=2 * (HEADER_BYTES + 300))
        keys, payloads = _chunks(3, 300, seed=14)
        for k, p in zip(keys, payloads):
            assert _put(tier, k, p)
        assert tier.longest_prefix(keys[1:]) == 2
        assert _fetch(tier, keys[1:]) == payloads[1:]
        assert tier.longest_prefix(keys) == 0  # the oldest was trimmed by the budget
        assert tier.stats().errors == 0
    finally:
        srv.stop()


def test_invalid_arguments() -> None:
    fmt = SlabFormat(GEOM_A, 10)
    with pytest.raises(TypeError, match="slab_format: expected SlabFormat, got bytes"):
        RemoteTier("redis://127.0.0.1:1/0", GEOM_A)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        RemoteTier("redis://127.0.0.1:1/0", fmt, timeout_s=0)
    with pytest.raises(ValueError, match="tls: needs a rediss:// or rediss\\+cluster:// url, got one with scheme 'redis'") as info:
        RemoteTier("redis://user:hunter2@127.0.0.1:1/0", fmt, tls=TLSOptions())
    assert "hunter2" not in str(info.value)
    tier = RemoteTier("redis://127.0.0.1:1/0", fmt)
    try:
        with pytest.raises(TypeError, match="keys\\[1\\] must be 32 bytes"):
            tier.longest_prefix([bytes(32), "k"])
        with pytest.raises(TypeError, match="keys\\[0\\] must be 32 bytes"):
            tier.fetch_into([b"k"], [bytearray(10)], time.monotonic() + 1)
        with pytest.raises(ValueError, match="destinations\\[1\\]: expected a writable C-contiguous buffer of 10 bytes, "
                           "got a read-only buffer of 10 bytes"):
            tier.fetch_into([bytes(32)] * 2, [bytearray(10), bytes(10)], time.monotonic() + 1)
        with pytest.raises(ValueError, match="destinations\\[0\\]: .* got a writable buffer of 9 bytes"):
            tier.fetch_into([bytes(32)], [bytearray(9)], time.monotonic() + 1)
        with pytest.raises(ValueError, match="destinations: expected one per key \\(2\\), got 1"):
            tier.fetch_into([bytes(32)] * 2, [bytearray(10)], time.monotonic() + 1)
        with pytest.raises(ValueError, match="connections: expected an int >= 1, got 0"):
            RemoteTier("redis://127.0.0.1:1/0", fmt, connections=0)
        with pytest.raises(ValueError, match="value: expected 114 bytes from slab_format.encode"):
            tier.put(bytes(32), b"x" * 10)
    finally:
        tier.close()


def test_breaker_backoff_doubles_to_cap_and_resets() -> None:
    now = [100.0]
    breaker = _CircuitBreaker(0.5, 2.0, clock=lambda: now[0])
    assert breaker.seconds_to_probe() is None and not breaker.is_open
    waits = []
    for _ in range(4):
        breaker.trip()
        waits.append(breaker.seconds_to_probe())
    assert waits == [0.5, 1.0, 2.0, 2.0]
    now[0] += 2.5
    assert breaker.seconds_to_probe() == -0.5
    breaker.reset()
    assert breaker.seconds_to_probe() is None
    breaker.trip()
    assert breaker.seconds_to_probe() == 0.5


# --------------------------------------------------------------- parallel fetch into slabs


def test_replies_the_tier_does_not_read_itself_go_through_hiredis(server: RedisServer, tiers: list[RemoteTier]) -> None:
    from redis._parsers import _HiredisParser

    tier = _tier(tiers, server.url, 64)
    assert tier.longest_prefix([bytes(32)]) == 0
    conn = tier._get_client().connection_pool.get_connection()
    try:
        assert isinstance(conn._parser, _HiredisParser)
    finally:
        tier._get_client().connection_pool.release(conn)


def test_parallel_fetch_is_byte_exact(server: RedisServer, tiers: list[RemoteTier]) -> None:
    size = 3 * 65536 + 13  # no multiple of any socket read
    tier = _tier(tiers, server.url, size, connections=4)
    keys, payloads = _store_raw(server, tier, 11, seed=20)  # 11 keys: runs of 3, 3, 3 and 2
    for n in (11, 4, 1):
        assert _fetch(tier, keys[:n]) == payloads[:n]
    missing = _chunks(1, size, seed=21)[0]
    assert _fetch(tier, keys[:5] + missing + keys[5:]) == payloads[:5]
    s = tier.stats()
    assert (s.gets, s.hits, s.fetched_bytes, s.errors, s.corrupt_dropped) == (28, 21, 21 * size, 0, 0)
    assert _calls(server, "get") == 28


def test_fetch_reads_over_one_connection_per_run(server: RedisServer, tiers: list[RemoteTier]) -> None:
    # Slowed to 4 MB/s per connection so the four runs surely overlap and need four connections.
    proxy = RedisProxy(server.port, bytes_per_s=4e6)
    try:
        tier = _tier(tiers, proxy.url, 65536, connections=4, timeout_s=2.0)
        keys, payloads = _store_raw(server, tier, 8, seed=22)
        assert _fetch(tier, keys) == payloads
        assert proxy.connections == 4
        assert tier.throughput().bytes_per_s < 4 * 4e6 * 1.05
    finally:
        proxy.stop()


def test_fetch_over_two_cluster_shards(tmp_path: Path, tiers: list[RemoteTier]) -> None:
    nodes = [
        RedisServer(d, ("--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf")), bus_offset=CLUSTER_BUS_OFFSET)
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    try:
        for node, slots in zip(nodes, ((0, 8191), (8192, 16383))):
            node.workdir.mkdir()
            node.start()
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", *slots)
        nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[1].port)
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO") for n in nodes):
            assert time.monotonic() < deadline, "the two-node cluster did not form"
            time.sleep(0.05)
        tier = _tier(tiers, f"redis+cluster://127.0.0.1:{nodes[0].port}", 4096, connections=4)
        keys, payloads = _chunks(16, 4096, seed=23)
        for k, p in zip(keys, payloads):
            assert _put(tier, k, p)
        assert _fetch(tier, keys) == payloads
        per_node = [_calls(n, "get") for n in nodes]
        assert sum(per_node) == 16 and min(per_node) > 0, per_node
        assert tier.stats().errors == 0
    finally:
        for n in nodes:
            n.stop()


def _all_in_one_probe(tier: RemoteTier, n: int) -> FetchPolicy:
    """Fetches pay, and the first fill fetches all ``n`` keys at once (runs of n / connections)."""
    return FetchPolicy(RecomputeModel(3600.0), 1, tier.format.value_bytes, probe_chunks=n)


@pytest.mark.parametrize("failure", ["cut", "stall"])
def test_one_connection_failing_mid_fetch_is_a_bounded_miss_never_wrong_bytes(
    server: RedisServer, tiers: list[RemoteTier], failure: str
) -> None:
    size = 1 << 20
    # Each of 4 connections reads a run of 2 values; the first to pass 1.5 values' bytes fails.
    limit = {"cut_after" if failure == "cut" else "stall_after": HEADER_BYTES + size + size // 2}
    proxy = RedisProxy(server.port, **limit)
    try:
        tier = _tier(tiers, proxy.url, size, connections=4)
        sync, data, gens = _sync(tier, 8, seed=24, policy=_all_in_one_probe(tier, 8), timeout_s=TIMEOUT_S)
        pool = _pool(sync, data, gens)
        keys, payloads = _store_raw(server, tier, 8, seed=24)
        t0 = time.monotonic()
        filled = sync.fill(pool, keys, 10.0)
        assert time.monotonic() - t0 < TIMEOUT_S + SLACK_S
        assert proxy.fired
        # The failed run ends the prefix at its second key; the runs before it arrived whole.
        assert filled in (1, 3, 5, 7), filled
        assert _pool_bytes(pool, keys) == payloads[:filled]
        assert not any(pool.contains(k) for k in keys[filled:]), "a slab that did not arrive whole is never committed"
        assert pool.stats().used_slabs == filled
        s = tier.stats()
        assert (s.hits, s.errors, s.corrupt_dropped, s.breaker_open) == (filled, 1, 0, True)
        sync.close()
    finally:
        proxy.stop()


# -------------------------------------------------------------------------- the cost rule

#: What recomputing one chunk costs in the cost-rule tests.
CHUNK_RECOMPUTE_S = 0.020


def _cost_policy(tier: RemoteTier, clock: FakeClock) -> FetchPolicy:
    return FetchPolicy(
        RecomputeModel(CHUNK_RECOMPUTE_S), 1, tier.format.value_bytes, probe_chunks=tier.connections,
        probe_interval_s=60.0, clock=clock,
    )


def test_cost_rule_skips_a_tier_slower_than_recompute_and_counts(server: RedisServer, tiers: list[RemoteTier]) -> None:
    size = 65536
    # 256 KiB/s per connection, 1 MiB/s over four: a chunk takes ~60 ms, recomputing it 20 ms.
    proxy = RedisProxy(server.port, bytes_per_s=256 * 1024)
    try:
        tier = _tier(tiers, proxy.url, size, connections=4, timeout_s=2.0)
        clock = FakeClock()
        sync, data, gens = _sync(tier, 16, seed=25, policy=_cost_policy(tier, clock), timeout_s=3.0)
        pool = _pool(sync, data, gens)
        keys, payloads = _store_raw(server, tier, 12, seed=25)

        assert sync.fill(pool, keys, 10.0) == 4  # no estimate yet: a probe, one chunk per connection
        s = sync.stats()
        assert (s.filled, s.probes, s.cost_skips, s.cost_skipped_chunks) == (4, 1, 1, 8)
        assert tier.throughput().bytes_per_s < size / CHUNK_RECOMPUTE_S
        assert _pool_bytes(pool, keys) == payloads[:4]

        exists, gets = _calls(server, "exists"), _calls(server, "get")
        assert sync.fill(pool, keys[4:], 10.0) == 0  # no prefix can pay: not even the existence check
        assert (_calls(server, "exists"), _calls(server, "get")) == (exists, gets)
        assert sync.stats().cost_skips == 2

        clock.now += 60.0  # the estimate is stale: the next fill measures again
        assert sync.fill(pool, keys[4:], 10.0) == 4
        s = sync.stats()
        assert (s.filled, s.probes, s.cost_skips, s.cost_skipped_chunks) == (8, 2, 3, 12)
        assert _pool_bytes(pool, keys) == payloads[:8]
        sync.close()
    finally:
        proxy.stop()


def test_cost_rule_fetches_a_tier_faster_than_recompute(server: RedisServer, tiers: list[RemoteTier]) -> None:
    size = 65536
    tier = _tier(tiers, server.url, size, connections=4, timeout_s=2.0)
    sync, data, gens = _sync(tier, 16, seed=26, policy=_cost_policy(tier, FakeClock()), timeout_s=3.0)
    pool = _pool(sync, data, gens)
    keys, payloads = _store_raw(server, tier, 12, seed=26)
    assert sync.fill(pool, keys, 10.0) == 12  # the probe's 4, then the other 8 because they pay
    s = sync.stats()
    assert (s.filled, s.probes, s.cost_skips, s.cost_skipped_chunks) == (12, 1, 0, 0)
    assert tier.throughput().bytes_per_s > size / CHUNK_RECOMPUTE_S
    assert _pool_bytes(pool, keys) == payloads
    assert _calls(server, "get") == 12
    sync.close()
