"""MP mode on a GPU: LOOKUP + load from the daemon's shared-memory pool into GPU slots,
and the store of the same tokens, against a contiguous pinned memcpy of the same bytes.

The engine registers the daemon's segment with cudaHostRegister and runs the kernels
itself, so the bytes cross PCIe once and never cross the socket.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from lmc_transfer.config import load_config
from lmc_transfer.keys import KeySalt, chunk_keys
from lmc_transfer.store.mp_client import MPStore
from tests.conftest_mp import Daemon, daemons, workdir, write_config  # noqa: F401  (fixtures)

from .bench_transfer_gpu import CHUNK, LLAMA, NUM_SLOTS, _buffers
from .gpu_timing import RESULTS, gbps, memcpy_ms

pytestmark = pytest.mark.gpu


def _median_s(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("tokens", [2048, 8192])
def test_mp_lookup_load_and_store(benchmark, workdir, daemons, tokens):
    config_path = write_config(workdir, chunk_size=CHUNK, max_local_cpu_size=1.25 * tokens / 8192 + 0.3,
                               lookup_timeout_ms=2000, request_timeout_ms=5000, lease_ttl_s=60.0)
    daemons.append(Daemon(config_path))
    buffers = _buffers(LLAMA)
    store = MPStore(load_config(config_path), buffers)
    keys = chunk_keys(list(range(tokens)), CHUNK, KeySalt("bench-mp", buffers.geometry))
    perm = torch.randperm(NUM_SLOTS, device="cuda")
    src, dst = perm[:tokens], perm[tokens:2 * tokens]  # disjoint: loading must not overwrite the source
    nbytes = tokens * buffers.geometry.token_bytes

    def store_once():
        store.clear()
        reservation = store.reserve(keys)
        assert store.save(reservation, src) == len(keys)
        assert store.flush_stores(30)  # the commit follows the copy on the completion thread

    def lookup_load():
        lease = store.lookup(keys)
        result = store.load(lease, dst)
        store.release(lease)
        assert result.chunks_loaded == len(keys)

    try:
        _measure(store, store_once, lookup_load, buffers, src, dst, keys, tokens, nbytes)
        benchmark.pedantic(lookup_load, rounds=3, iterations=1)
    finally:
        store.close()


def _measure(store, store_once, lookup_load, buffers, src, dst, keys, tokens, nbytes) -> None:
    store_s = _median_s(store_once, 3)
    load_s = _median_s(lookup_load, 5)
    planes_src = [p.view(torch.uint8).view(buffers.num_slots, -1)[src] for layer in buffers.planes for p in layer]
    planes_dst = [p.view(torch.uint8).view(buffers.num_slots, -1)[dst] for layer in buffers.planes for p in layer]
    assert all(torch.equal(a, b) for a, b in zip(planes_src, planes_dst, strict=True)), "loaded bytes differ from stored bytes"
    lookup_times = []
    for _ in range(50):
        t0 = time.perf_counter()
        store.release(store.lookup(keys))
        lookup_times.append(time.perf_counter() - t0)
    h2d = memcpy_ms(nbytes, to_device=True) / 1e3
    d2h = memcpy_ms(nbytes, to_device=False) / 1e3
    RESULTS.add(mp_gpu="LOOKUP+load / store via daemon", tokens=tokens, load_ms=load_s * 1e3,
                load_GBps=gbps(nbytes, load_s * 1e3), load_vs_memcpy=load_s / h2d, store_ms=store_s * 1e3,
                store_GBps=gbps(nbytes, store_s * 1e3), store_vs_memcpy=store_s / d2h,
                lookup_p50_us=statistics.median(lookup_times) * 1e6)
