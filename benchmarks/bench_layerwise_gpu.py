"""Layerwise load/store beside a forward pass shaped like Llama-3-8B's (GPU).

Per layer the "forward" is a real Llama-3-8B decoder layer at that token count, minus rotary
embeddings: RMSNorm, the QKV projection, causal grouped-query attention (SDPA), the output
projection, RMSNorm, the gate/up projection, SiLU x up, the down projection and the residual adds
(bf16). Its GEMMs are compute-bound and fill every SM; the norms and activations are
memory-bound. One set of weights serves every layer.

Loads (``LayerTransferCounter``): ``wait_until(l)`` before layer ``l``. Stores
(``LayerwiseStore``): ``after_layer(l)`` after it. Reported, with the same run's contiguous pinned
memcpy of the same bytes:

- ``alone_pct_memcpy``: the transfer alone (idle GPU), memcpy time / transfer time;
- ``hidden_pct``: (compute + transfer - together) / transfer;
- ``compute_slowdown_pct``: stores: how much longer the forward pass took with the store behind it;
- ``over_bound_pct``: together / (compute + one layer's transfer) - 1 (loads), total until the store
  committed / (compute + one layer's transfer) - 1 (stores).

Variants: ``copy_engine`` (the staged path: DMA + full-width placement/gather at the layer
boundary), ``zero_copy_signals`` (one zero-copy launch, per-layer counters; loads only) and
``zero_copy_events`` (a zero-copy launch per layer), both with the default program cap.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.keys import KeySalt, chunk_keys
from lmc_transfer.store.ip import IPStore
from lmc_transfer.transfer.layerwise import LayerTransferCounter, LayerwiseStore
from lmc_transfer.transfer.paths import Transfer, TransferPath

from .bench_transfer_gpu import CHUNK, LLAMA, NUM_SLOTS, _buffers, _slots
from .gpu_timing import RESULTS, cuda_median_ms, gbps, memcpy_ms

pytestmark = pytest.mark.gpu

HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128


@dataclass(frozen=True)
class Variant:
    name: str
    path: TransferPath
    layer_signals: bool = False


COPY_ENGINE = Variant("copy_engine", TransferPath.STAGED)
LOAD_VARIANTS = [COPY_ENGINE, Variant("zero_copy_signals", TransferPath.ZERO_COPY, True),
                 Variant("zero_copy_events", TransferPath.ZERO_COPY)]
STORE_VARIANTS = [COPY_ENGINE, Variant("zero_copy_events", TransferPath.ZERO_COPY)]


class LlamaLayer:
    """One Llama-3-8B decoder layer's forward at ``tokens`` tokens (bf16, no rotary)."""

    def __init__(self, tokens: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(0)

        def weight(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=gen) * rows ** -0.5)

        self.w_qkv = weight(HIDDEN, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM)
        self.w_o = weight(Q_HEADS * HEAD_DIM, HIDDEN)
        self.w_gate_up = weight(HIDDEN, 2 * INTERMEDIATE)
        self.w_down = weight(INTERMEDIATE, HIDDEN)
        self.norm = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.h = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.tokens = tokens

    def __call__(self) -> torch.Tensor:
        """The layer's output (not fed back, so repeated calls see the same magnitudes)."""
        t = self.tokens
        x = F.rms_norm(self.h, (HIDDEN,), self.norm)
        q, k, v = (x @ self.w_qkv).split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = q.view(1, t, Q_HEADS, HEAD_DIM).transpose(1, 2)
        k = k.view(1, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v.view(1, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = self.h + a.transpose(1, 2).reshape(t, Q_HEADS * HEAD_DIM) @ self.w_o
        gate, up = (F.rms_norm(h, (HIDDEN,), self.norm) @ self.w_gate_up).split(INTERMEDIATE, dim=-1)
        return h + (F.silu(gate) * up) @ self.w_down


_layers: dict[int, LlamaLayer] = {}


def _forward(tokens: int) -> LlamaLayer:
    if tokens not in _layers:
        _layers.clear()
        _layers[tokens] = LlamaLayer(tokens)
    return _layers[tokens]


def _store(tokens: int, page: int) -> tuple[IPStore, list[bytes], torch.Tensor]:
    buffers = _buffers(LLAMA)
    config = LMCTransferConfig.from_dict({"chunk_size": CHUNK, "max_local_cpu_size": 1.25 * tokens / 8192 + 0.25})
    store = IPStore(config, buffers)
    keys = chunk_keys(list(range(tokens)), CHUNK, KeySalt("bench", buffers.geometry))
    src = _slots(tokens, page, seed=1)
    assert store.save(store.reserve(keys), src) == len(keys) and store.flush_stores(30)
    return store, keys, src


def _transfer(variant: Variant) -> Transfer:
    return Transfer(_buffers(LLAMA), CHUNK, path=variant.path)


@pytest.mark.parametrize("variant", LOAD_VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("tokens", [256, 2048])
def test_layerwise_load_alone(benchmark, tokens, variant):
    """start_load + wait_until(l) for every layer on an idle GPU. Device time from the start of the
    load to the compute stream passing the last layer; CPU time of those calls."""
    store, keys, _ = _store(tokens, 1)
    num_layers = store.buffers.num_layers
    dst = _slots(tokens, 1, seed=2)
    counter = LayerTransferCounter(_transfer(variant), layer_signals=variant.layer_signals)
    lease = store.lookup(keys)
    nbytes = tokens * store.buffers.geometry.token_bytes
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
    RESULTS.add(layerwise_load_alone=variant.name, tokens=tokens, layers=num_layers, GBps=gbps(nbytes, ms),
                memcpy_GBps=gbps(nbytes, limit), pct_memcpy=100 * limit / ms,
                cpu_us_start_and_waits=statistics.median(r[1] for r in runs))
    benchmark.pedantic(load, rounds=3, iterations=1)
    store.release(lease)
    store.close()


@pytest.mark.parametrize("variant", LOAD_VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("tokens", [2048, 8192])
def test_layerwise_load_beside_forward(benchmark, tokens, page, variant):
    store, keys, _ = _store(tokens, page)
    num_layers = store.buffers.num_layers
    dst = _slots(tokens, page, seed=2)
    counter = LayerTransferCounter(_transfer(variant), layer_signals=variant.layer_signals)
    nbytes = tokens * store.buffers.geometry.token_bytes
    lease = store.lookup(keys)
    step = _forward(tokens)

    def load_only():
        counter.start_load(store, lease, dst)
        counter.wait_until(num_layers - 1)
        counter.finish()

    def compute_only():
        for _ in range(num_layers):
            step()

    def overlapped():
        counter.start_load(store, lease, dst)
        for layer in range(num_layers):
            counter.wait_until(layer)
            step()
        return counter.finish()

    load_ms = cuda_median_ms(load_only, iters=5)
    compute_ms = cuda_median_ms(compute_only, iters=5)
    both_ms = cuda_median_ms(overlapped, iters=5)
    assert overlapped().chunks_loaded == len(keys)
    limit = memcpy_ms(nbytes, to_device=True)
    layer_ms = load_ms / num_layers
    RESULTS.add(layerwise_load=variant.name, tokens=tokens, page=page, memcpy_GBps=gbps(nbytes, limit),
                alone_ms=load_ms, alone_pct_memcpy=100 * limit / load_ms, compute_ms=compute_ms,
                together_ms=both_ms, hidden_pct=100 * min(1.0, (compute_ms + load_ms - both_ms) / load_ms),
                over_bound_pct=100 * (both_ms / (compute_ms + layer_ms) - 1))
    benchmark.pedantic(lambda: (overlapped(), torch.cuda.synchronize()), rounds=2, iterations=1)
    store.release(lease)
    store.close()


@pytest.mark.parametrize("variant", STORE_VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("tokens", [2048, 8192])
def test_layerwise_store_behind_forward(benchmark, tokens, page, variant):
    store, keys, src = _store(tokens, page)
    store.clear()
    num_layers = store.buffers.num_layers
    transfer = _transfer(variant)
    nbytes = tokens * store.buffers.geometry.token_bytes
    step = _forward(tokens)

    def compute_only():
        for _ in range(num_layers):
            step()

    def store_only():
        writer = LayerwiseStore(transfer, store, store.reserve(keys), src)
        for layer in range(num_layers):
            writer.after_layer(layer)
        writer.finish()
        store.clear()

    def overlapped() -> tuple[int, float, float]:
        writer = LayerwiseStore(transfer, store, store.reserve(keys), src)
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
    overlapped()
    runs = sorted((overlapped() for _ in range(5)), key=lambda r: r[2])
    committed, compute_with_ms, total_ms = runs[2]
    assert committed == len(keys)
    limit = memcpy_ms(nbytes, to_device=False)
    layer_ms = store_ms / num_layers
    RESULTS.add(layerwise_store=variant.name, tokens=tokens, page=page, memcpy_GBps=gbps(nbytes, limit),
                alone_ms=store_ms, alone_pct_memcpy=100 * limit / store_ms, compute_ms=compute_ms,
                compute_with_store_ms=compute_with_ms, total_ms=total_ms,
                hidden_pct=100 * min(1.0, (compute_ms + store_ms - total_ms) / store_ms),
                compute_slowdown_pct=100 * (compute_with_ms / compute_ms - 1),
                done_after_forward_ms=total_ms - compute_with_ms, one_layer_ms=layer_ms,
                over_bound_pct=100 * (total_ms / (compute_ms + layer_ms) - 1))
    benchmark.pedantic(lambda: (overlapped(), torch.cuda.synchronize()), rounds=2, iterations=1)
    store.close()
