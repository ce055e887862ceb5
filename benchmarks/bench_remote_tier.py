"""CPU benchmark: the remote tier against raw redis-py GETs on a loopback redis-server, in one run.

Run from the repository root: ``python -m pytest benchmarks/bench_remote_tier.py -s``
(``-s`` shows the interleaved comparison: ``test_overhead_vs_raw``).

- lookup: ``longest_prefix`` over the 128 chunk keys of a 32k-token prompt (chunk size 256) vs
  one raw pipeline of 128 EXISTS.
- fetch: 2048 tokens of a Llama-8B shape (32 layers x K,V x 8 heads x 128 dims x bf16 =
  128 KiB/token) as 32 chunks of 64 tokens (8 MiB each), the shape of the issue's measurement,
  vs one raw pipeline of 32 GETs of the same stored values: with hiredis (the client's fastest
  reply parser) and with redis-py's own. The tier reads into slabs (one 256 MiB buffer, as the
  pool's) and checks every value's checksum; ``fill`` is the whole path a lookup takes
  (existence check, slab reservations, fetch, commits) into a SlabPool.
"""

from __future__ import annotations

import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pytest

redis = pytest.importorskip("redis")

from redis._parsers import _RESP2Parser  # noqa: E402

from lmc_transfer.store.pool import SlabPool  # noqa: E402
from lmc_transfer.tiers.format import SlabFormat  # noqa: E402
from lmc_transfer.tiers.remote import RemoteTier  # noqa: E402
from lmc_transfer.tiers.remote_cost import FetchPolicy, RecomputeModel  # noqa: E402
from lmc_transfer.tiers.remote_sync import RemoteSync  # noqa: E402
from tests.test_remote_tier import RedisServer  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server binary not installed")

GEOMETRY = b"\x07" * 32  # stands for the geometry digest of a Llama-8B token_slot bf16 slab
LOOKUP_KEYS = 32 * 1024 // 256
TOKEN_BYTES = 32 * 2 * 8 * 128 * 2
FETCH_CHUNKS = 32
CHUNK_TOKENS = 2048 // FETCH_CHUNKS
CHUNK_BYTES = CHUNK_TOKENS * TOKEN_BYTES  # 8 MiB
FETCH_BYTES = FETCH_CHUNKS * CHUNK_BYTES
DEADLINE_S = 30.0
#: The issue's bound on what the tier may add to a raw GET of the same values.
MAX_OVERHEAD = 0.10


class Setup(NamedTuple):
    server: RedisServer
    tier: RemoteTier  # 4 connections (the default)
    single: RemoteTier  # 1 connection
    raw: "redis.Redis"  # hiredis parser
    raw_python: "redis.Redis"  # redis-py's own parser
    keys: list[bytes]
    slabs: np.ndarray  # FETCH_CHUNKS x CHUNK_BYTES
    pool: SlabPool  # over ``slabs``
    sync: RemoteSync  # between ``pool`` and ``tier``, under a cost rule where every fetch pays


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    srv = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    srv.start()
    fmt = SlabFormat(GEOMETRY, CHUNK_BYTES)
    tier = RemoteTier(srv.url, fmt, timeout_s=1.0, connections=4)
    single = RemoteTier(srv.url, fmt, timeout_s=1.0, connections=1)
    slabs = np.zeros((FETCH_CHUNKS, CHUNK_BYTES), dtype=np.uint8)  # touched once, like a pool's pages
    gens = np.zeros(FETCH_CHUNKS, dtype=np.uint64)
    pool = SlabPool(slabs.reshape(-1), gens, CHUNK_BYTES)
    always = FetchPolicy(RecomputeModel(3600.0), CHUNK_TOKENS, fmt.value_bytes, probe_chunks=FETCH_CHUNKS)
    sync = RemoteSync(tier, slabs.reshape(-1), gens, policy=always, timeout_s=DEADLINE_S)
    try:
        raw = srv.client()
        raw_python = redis.Redis(
            connection_pool=redis.ConnectionPool(port=srv.port, socket_timeout=5, parser_class=_RESP2Parser)
        )
        rng = random.Random(0)
        keys = [rng.randbytes(32) for _ in range(LOOKUP_KEYS)]
        payload = rng.randbytes(CHUNK_BYTES)
        for i, key in enumerate(keys):
            # Fetched chunks get distinct 8 MiB payloads; the rest only need to exist.
            value = tier.format.encode(key, payload[i:] + payload[:i]) if i < FETCH_CHUNKS else b"x"
            raw.set(tier._chunk_key(key), value)
        yield Setup(srv, tier, single, raw, raw_python, keys, slabs, pool, sync)
    finally:
        sync.close()  # and the tier
        single.close()
        srv.stop()


def _raw(client: "redis.Redis", command: str, names: list[bytes]) -> list:
    pipe = client.pipeline(transaction=False)
    for n in names:
        pipe.execute_command(command, n)
    return pipe.execute()


def _fetch_into(tier: RemoteTier, s: Setup) -> int:
    return tier.fetch_into(s.keys[:FETCH_CHUNKS], list(s.slabs), time.monotonic() + DEADLINE_S)


def _fill(s: Setup) -> int:
    """The whole remote path of a lookup that misses L1, into an emptied pool."""
    s.pool.clear()
    return s.sync.fill(s.pool, s.keys[:FETCH_CHUNKS], 60.0)


def _interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each call, taking turns so that all see the same machine state."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@pytest.mark.benchmark(group="remote-lookup-32k-tokens")
def test_lookup_tier(benchmark, setup: Setup) -> None:
    assert benchmark(setup.tier.longest_prefix, setup.keys) == LOOKUP_KEYS


@pytest.mark.benchmark(group="remote-lookup-32k-tokens")
def test_lookup_raw(benchmark, setup: Setup) -> None:
    names = [setup.tier._chunk_key(k) for k in setup.keys]
    assert sum(benchmark(_raw, setup.raw, "EXISTS", names)) == LOOKUP_KEYS


@pytest.mark.benchmark(group="remote-fetch-2048-tokens-llama8b")
def test_fetch_tier(benchmark, setup: Setup) -> None:
    assert benchmark.pedantic(_fetch_into, (setup.tier, setup), rounds=5, warmup_rounds=1) == FETCH_CHUNKS


@pytest.mark.benchmark(group="remote-fetch-2048-tokens-llama8b")
def test_fetch_raw(benchmark, setup: Setup) -> None:
    names = [setup.tier._chunk_key(k) for k in setup.keys[:FETCH_CHUNKS]]
    got = benchmark.pedantic(_raw, (setup.raw, "GET", names), rounds=5, warmup_rounds=1)
    assert [len(v) for v in got] == [setup.tier.format.value_bytes] * FETCH_CHUNKS


def test_overhead_vs_raw(setup: Setup) -> None:
    """Tier vs raw GET in one interleaved loop: the tier (its whole fill path) adds at most 10%."""
    s = setup
    lookup_names = [s.tier._chunk_key(k) for k in s.keys]
    fetch_names = lookup_names[:FETCH_CHUNKS]
    lookup = _interleaved(
        {"tier": lambda: s.tier.longest_prefix(s.keys), "raw": lambda: _raw(s.raw, "EXISTS", lookup_names)}, rounds=50
    )
    _fill(s)  # warm: the pool's pages and every connection exist before timing
    fetch = _interleaved(
        {
            "raw GET, hiredis": lambda: _raw(s.raw, "GET", fetch_names),
            "raw GET, redis-py parser": lambda: _raw(s.raw_python, "GET", fetch_names),
            "tier fetch_into, 1 connection": lambda: _fetch_into(s.single, s),
            "tier fetch_into, 4 connections": lambda: _fetch_into(s.tier, s),
            "tier fill into a SlabPool, 4 connections": lambda: _fill(s),
        },
        rounds=7,
    )
    raw_s = fetch["raw GET, hiredis"]
    print(
        f"\nlookup {LOOKUP_KEYS} keys: tier {lookup['tier'] * 1e3:.2f} ms, raw {lookup['raw'] * 1e3:.2f} ms "
        f"({lookup['tier'] / lookup['raw'] - 1:+.1%})"
        f"\nfetch {FETCH_CHUNKS} x {CHUNK_BYTES >> 20} MiB (median of 7, vs raw GET with hiredis):"
    )
    for name, seconds in fetch.items():
        print(f"  {name:42s} {seconds * 1e3:6.0f} ms  {FETCH_BYTES / seconds / 1e9:5.2f} GB/s  {seconds / raw_s - 1:+6.1%}")
    assert _fetch_into(s.tier, s) == FETCH_CHUNKS
    assert all(s.slabs[i].tobytes() == s.raw.get(fetch_names[i])[-CHUNK_BYTES:] for i in range(FETCH_CHUNKS))
    stats = s.tier.stats()
    assert stats.corrupt_dropped == 0 and stats.errors == 0
    assert fetch["tier fill into a SlabPool, 4 connections"] <= (1 + MAX_OVERHEAD) * raw_s
