"""CPU benchmark of the MP control plane against a real daemon subprocess:

- LOOKUP round trip (MPStore.lookup, all 128 keys of a 32k-token prompt hit), p50/p99;
- LOOKUP throughput with 8 concurrent clients (one MPStore each, threads);
- the same 128-key prefix probed in the shared-memory chunk index instead (no message),
  p50/p99, in a table sized for a full 16384-slab pool.

Run: pytest benchmarks/bench_mp_lookup.py --benchmark-only
The percentiles and the throughput are in each row's extra_info (--benchmark-json).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest
import torch

from lmc_transfer.config import load_config
from lmc_transfer.daemon.chunk_index import ChunkIndexReader, ChunkIndexWriter, index_capacity
from lmc_transfer.kernels.geometry import KVGeometry
from lmc_transfer.store.mp_client import MPStore
from lmc_transfer.keys import KeySalt, chunk_keys
from tests.conftest_mp import Daemon, make_buffers, write_config

PROMPT_TOKENS = 32 * 1024
CHUNK_SIZE = 256
NUM_KEYS = PROMPT_TOKENS // CHUNK_SIZE
CLIENTS = 8
LOOKUPS_PER_CLIENT = 300
INDEX_POOL_SLABS = 16384
SAMPLES = 1000
T = TypeVar("T")


@pytest.fixture(scope="module")
def daemon_config():
    workdir = Path(tempfile.mkdtemp(prefix="lmct-bench-"))
    geometry_bytes = make_buffers(0).geometry.slab_bytes(CHUNK_SIZE)
    cfg = write_config(
        workdir,
        chunk_size=CHUNK_SIZE,
        max_local_cpu_size=(NUM_KEYS + 8) * geometry_bytes / 1024**3,
        lookup_timeout_ms=2000,
        request_timeout_ms=2000,
        lease_ttl_s=600.0,
    )
    daemon = Daemon(cfg)
    try:
        yield load_config(cfg)
    finally:
        daemon.stop()
        daemon.cleanup_leftovers()
        shutil.rmtree(workdir, ignore_errors=True)


def _prompt_keys(geometry: KVGeometry, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return chunk_keys(rng.integers(0, 150_000, PROMPT_TOKENS).tolist(), CHUNK_SIZE, KeySalt("bench", geometry))


def _percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    us = np.array(samples_ns) / 1000
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99))}


def _timed(call: Callable[[], T], check: Callable[[T], bool]) -> dict[str, float]:
    """p50/p99 of SAMPLES calls, each checked."""
    samples = []
    for _ in range(SAMPLES):
        t = time.perf_counter_ns()
        result = call()
        samples.append(time.perf_counter_ns() - t)
        assert check(result)
    return _percentiles_us(samples)


def _filled_store(config) -> tuple[MPStore, list[bytes]]:
    store = MPStore(config, make_buffers(0))
    keys = _prompt_keys(store.buffers.geometry)
    if store.lookup(keys).num_chunks < NUM_KEYS:
        slots = torch.arange(NUM_KEYS * CHUNK_SIZE) % 512
        store.save(store.reserve(keys), slots)
    assert store.lookup(keys).num_chunks == NUM_KEYS
    return store, keys


def test_lookup_round_trip_32k_prompt(benchmark, daemon_config) -> None:
    store, keys = _filled_store(daemon_config)
    try:
        percentiles = _timed(lambda: store.lookup(keys), lambda lease: lease.num_chunks == NUM_KEYS)
        lease = benchmark(store.lookup, keys)
        assert lease.num_chunks == NUM_KEYS
        benchmark.extra_info.update(**percentiles, keys=NUM_KEYS)
    finally:
        store.close()


def test_lookup_throughput_8_clients(benchmark, daemon_config) -> None:
    first, keys = _filled_store(daemon_config)
    stores = [first] + [MPStore(daemon_config, make_buffers(0)) for _ in range(CLIENTS - 1)]
    hits = [0] * CLIENTS

    def client(i: int) -> None:
        for _ in range(LOOKUPS_PER_CLIENT):
            hits[i] += stores[i].lookup(keys).num_chunks == NUM_KEYS

    def run() -> float:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return CLIENTS * LOOKUPS_PER_CLIENT / (time.perf_counter() - start)

    try:
        rate = benchmark.pedantic(run, rounds=3, iterations=1)
        assert hits == [3 * LOOKUPS_PER_CLIENT] * CLIENTS
        benchmark.extra_info.update(lookups_per_s=rate, clients=CLIENTS, keys_per_lookup=NUM_KEYS)
    finally:
        for s in stores:
            s.close()


def test_index_probe_32k_prompt(benchmark) -> None:
    """The prefix probe an engine does instead of a LOOKUP: the prompt's 128 keys among a full
    pool's worth of other keys (load 1/2), read-only mapping, no message."""
    writer = ChunkIndexWriter.create(index_capacity(INDEX_POOL_SLABS), "bench")
    reader = ChunkIndexReader.open(writer.name, "bench")
    try:
        geometry = make_buffers(0).geometry
        keys = _prompt_keys(geometry)
        puts = []
        for slab_id, key in enumerate(keys):
            t = time.perf_counter_ns()
            assert writer.put(key, slab_id, 1)
            puts.append(time.perf_counter_ns() - t)
        seed = 1
        while len(writer) < INDEX_POOL_SLABS:
            for key in _prompt_keys(geometry, seed)[: INDEX_POOL_SLABS - len(writer)]:
                writer.put(key, len(writer), 1)
            seed += 1
        expected = tuple(range(NUM_KEYS))
        percentiles = _timed(lambda: reader.probe_prefix(keys), lambda found: found.slab_ids == expected)
        found = benchmark(reader.probe_prefix, keys)
        assert found.slab_ids == expected and reader.stats.retries == 0
        benchmark.extra_info.update(
            **percentiles,
            keys=NUM_KEYS,
            entries=len(writer),
            capacity=writer.capacity,
            window=writer.window,
            not_indexed=writer.stats.not_indexed,
            put_p50_us=_percentiles_us(puts)["p50_us"],
        )
    finally:
        reader.close()
        writer.close()
