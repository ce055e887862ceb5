"""CPU benchmark of the MP control plane against a real daemon subprocess:

- LOOKUP round trip (MPStore.lookup, all 128 keys of a 32k-token prompt hit), p50/p99;
- LOOKUP throughput with 8 concurrent clients (one MPStore each, threads).

Run: pytest benchmarks/bench_mp_lookup.py --benchmark-only
The percentiles and the throughput are in each row's extra_info (--benchmark-json).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmc_transfer.config import load_config
from lmc_transfer.store.mp_client import MPStore
from lmc_transfer.keys import KeySalt, chunk_keys
from tests.conftest_mp import Daemon, make_buffers, write_config

PROMPT_TOKENS = 32 * 1024
CHUNK_SIZE = 256
NUM_KEYS = PROMPT_TOKENS // CHUNK_SIZE
CLIENTS = 8
LOOKUPS_PER_CLIENT = 300


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


def _prompt_keys(store: MPStore) -> list[bytes]:
    rng = np.random.default_rng(0)
    return chunk_keys(rng.integers(0, 150_000, PROMPT_TOKENS).tolist(), CHUNK_SIZE, KeySalt("bench", store.buffers.geometry))


def _filled_store(config) -> tuple[MPStore, list[bytes]]:
    store = MPStore(config, make_buffers(0))
    keys = _prompt_keys(store)
    if store.lookup(keys).num_chunks < NUM_KEYS:
        slots = torch.arange(NUM_KEYS * CHUNK_SIZE) % 512
        store.save(store.reserve(keys), slots)
    assert store.lookup(keys).num_chunks == NUM_KEYS
    return store, keys


def test_lookup_round_trip_32k_prompt(benchmark, daemon_config) -> None:
    store, keys = _filled_store(daemon_config)
    try:
        samples = []
        for _ in range(1000):
            t = time.perf_counter_ns()
            lease = store.lookup(keys)
            samples.append(time.perf_counter_ns() - t)
            assert lease.num_chunks == NUM_KEYS
        lease = benchmark(store.lookup, keys)
        assert lease.num_chunks == NUM_KEYS
        us = np.array(samples) / 1000
        benchmark.extra_info.update(p50_us=float(np.percentile(us, 50)), p99_us=float(np.percentile(us, 99)), keys=NUM_KEYS)
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
