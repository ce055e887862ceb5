"""Layerwise load/store overlapped with a simulated forward pass (GPU).

Per layer the "forward" runs bf16 matmuls sized so that their time is close to one
layer's load time (Llama-8B shape). Measured: compute alone, load alone, and both through
LayerTransferCounter (the compute stream waits on each layer's event; the CPU never
blocks per layer); the same for a LayerwiseStore gathering behind the forward pass.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.store.ip import IPStore
from lmc_transfer.keys import KeySalt, chunk_keys
from lmc_transfer.transfer.layerwise import LayerTransferCounter, LayerwiseStore
from lmc_transfer.transfer.paths import Transfer, TransferPath

from .bench_transfer_gpu import CHUNK, LLAMA, NUM_SLOTS, _buffers
from .gpu_timing import RESULTS, cuda_median_ms, gbps, memcpy_ms

pytestmark = pytest.mark.gpu

VARIANTS = [(TransferPath.ZERO_COPY, 8), (TransferPath.ZERO_COPY, 32), (TransferPath.STAGED, None)]
VARIANT_IDS = ["zero_copy_8", "zero_copy_32", "staged"]
LOAD_VARIANTS = [(TransferPath.ZERO_COPY, 8, True), (TransferPath.ZERO_COPY, 8, False),
                 (TransferPath.ZERO_COPY, 32, True), (TransferPath.STAGED, None, False)]
LOAD_VARIANT_IDS = ["zero_copy_8_signals", "zero_copy_8_events", "zero_copy_32_signals", "staged"]


def _forward_step(layer_load_ms: float):
    """A matmul loop whose time is close to one layer's load."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    one = cuda_median_ms(lambda: torch.mm(a, b))
    reps = max(1, round(layer_load_ms / one))
    return lambda: [torch.mm(a, b) for _ in range(reps)]


def _store(tokens: int) -> tuple[IPStore, list[bytes], torch.Tensor]:
    buffers = _buffers(LLAMA)
    config = LMCTransferConfig.from_dict({"chunk_size": CHUNK, "max_local_cpu_size": 1.25 * tokens / 8192 + 0.25})
    store = IPStore(config, buffers)
    salt = KeySalt("bench", buffers.geometry)
    keys = chunk_keys(list(range(tokens)), CHUNK, salt)
    src = torch.randperm(NUM_SLOTS, device="cuda")[:tokens]
    assert store.save(store.reserve(keys), src) == len(keys)
    return store, keys, src


@pytest.mark.parametrize("layer_signals", [True, False], ids=["signals", "events"])
@pytest.mark.parametrize("tokens", [256, 2048])
def test_layerwise_load_alone(benchmark, tokens, layer_signals):
    """start_load + wait_until(l) for every layer on an idle GPU: one launch with per-layer
    counters against one launch and one event per layer. Device time from the start of the load
    to the compute stream passing the last layer's wait; CPU time of those calls."""
    store, keys, _ = _store(tokens)
    buffers = store.buffers
    num_layers = buffers.num_layers
    dst = torch.randperm(NUM_SLOTS, device="cuda")[:tokens]
    counter = LayerTransferCounter(Transfer(buffers, CHUNK), layer_signals=layer_signals)
    assert counter.uses_layer_signals is layer_signals
    lease = store.lookup(keys)
    nbytes = tokens * buffers.geometry.token_bytes
    limit = memcpy_ms(nbytes, to_device=True)

    def load() -> tuple[float, float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        counter.start_load(store, lease, dst)
        for layer in range(num_layers):
            counter.wait_until(layer)
        cpu_us = (time.perf_counter() - t0) * 1e6
        end.record()
        assert counter.finish().chunks_loaded == len(keys)
        end.synchronize()
        return start.elapsed_time(end), cpu_us

    for _ in range(3):
        load()
    runs = [load() for _ in range(15)]
    ms = statistics.median(r[0] for r in runs)
    cpu_us = statistics.median(r[1] for r in runs)
    RESULTS.add(layerwise_load_alone="signals" if layer_signals else "events", tokens=tokens, layers=num_layers,
                GBps=gbps(nbytes, ms), memcpy_GBps=gbps(nbytes, limit), pct_memcpy=100 * limit / ms,
                cpu_us_start_and_waits=cpu_us)
    store.release(lease)
    benchmark.pedantic(load, rounds=3, iterations=1)


@pytest.mark.parametrize("path, programs, layer_signals", LOAD_VARIANTS, ids=LOAD_VARIANT_IDS)
@pytest.mark.parametrize("tokens", [2048, 8192])
def test_layerwise_load_overlap(benchmark, tokens, path, programs, layer_signals):
    store, keys, _ = _store(tokens)
    buffers = store.buffers
    num_layers = buffers.num_layers
    dst = torch.randperm(NUM_SLOTS, device="cuda")[:tokens]
    transfer = Transfer(buffers, CHUNK, path=path, max_programs=programs)
    counter = LayerTransferCounter(transfer, layer_signals=layer_signals)
    assert counter.uses_layer_signals is layer_signals
    nbytes = tokens * buffers.geometry.token_bytes
    lease = store.lookup(keys)

    def load_only():
        counter.start_load(store, lease, dst)
        counter.wait_until(num_layers - 1)
        counter.finish()

    load_ms = cuda_median_ms(load_only, iters=5)
    step = _forward_step(load_ms / num_layers)

    def compute_only():
        for _ in range(num_layers):
            step()

    def overlapped():
        counter.start_load(store, lease, dst)
        for layer in range(num_layers):
            counter.wait_until(layer)
            step()
        return counter.finish()

    compute_ms = cuda_median_ms(compute_only, iters=5)
    both_ms = cuda_median_ms(overlapped, iters=5)
    assert overlapped().chunks_loaded == len(keys)
    layer_ms = load_ms / num_layers
    RESULTS.add(layerwise_load=path.value, programs=programs or "-", signals=layer_signals, tokens=tokens,
                load_alone_ms=load_ms,
                load_GBps=gbps(nbytes, load_ms), compute_alone_ms=compute_ms, overlapped_ms=both_ms,
                bound_ms=compute_ms + layer_ms, pct_load_hidden=100 * min(1.0, (compute_ms + load_ms - both_ms) / load_ms),
                over_bound_pct=100 * (both_ms / (compute_ms + layer_ms) - 1))
    store.release(lease)
    benchmark.pedantic(lambda: (overlapped(), torch.cuda.synchronize()), rounds=3, iterations=1)


@pytest.mark.parametrize("path, programs", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("tokens", [2048, 8192])
def test_layerwise_store_behind_forward(benchmark, tokens, path, programs):
    store, keys, src = _store(tokens)
    store.clear()
    buffers = store.buffers
    num_layers = buffers.num_layers
    transfer = Transfer(buffers, CHUNK, path=path, max_programs=programs)
    nbytes = tokens * buffers.geometry.token_bytes
    step = _forward_step(nbytes / 53e9 * 1e3 / num_layers)

    def compute_only():
        for _ in range(num_layers):
            step()

    def store_only():
        reservation = store.reserve(keys)
        writer = LayerwiseStore(transfer, store, reservation, src)
        for layer in range(num_layers):
            writer.after_layer(layer)
        writer.finish()
        store.clear()

    def overlapped():
        reservation = store.reserve(keys)
        writer = LayerwiseStore(transfer, store, reservation, src)
        start, end, compute_end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        for layer in range(num_layers):
            step()
            writer.after_layer(layer)
        compute_end.record()
        committed = writer.finish()
        end.record()
        end.synchronize()
        store.clear()
        return committed, start.elapsed_time(compute_end), start.elapsed_time(end)

    compute_ms = cuda_median_ms(compute_only, iters=5)
    store_ms = cuda_median_ms(store_only, iters=3)
    runs = sorted((overlapped() for _ in range(5)), key=lambda r: r[2])
    committed, compute_with_ms, total_ms = runs[2]
    assert committed == len(keys)
    RESULTS.add(layerwise_store=path.value, programs=programs or "-", tokens=tokens, store_alone_ms=store_ms,
                store_GBps=gbps(nbytes, store_ms), compute_alone_ms=compute_ms, compute_with_store_ms=compute_with_ms,
                total_ms=total_ms, compute_slowdown_pct=100 * (compute_with_ms / compute_ms - 1),
                over_bound_pct=100 * (total_ms / (compute_ms + store_ms / num_layers) - 1))
    benchmark.pedantic(lambda: (overlapped(), torch.cuda.synchronize()), rounds=2, iterations=1)
