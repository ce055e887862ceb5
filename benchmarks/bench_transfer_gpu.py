"""GPU throughput of gather/scatter against contiguous pinned memcpy (the physical limit).

``staged`` is the copy-engine path (DMA of slab pieces into an HBM staging buffer plus one
full-width placement/gather launch per unit); ``zero_copy`` the kernel over host memory.

Run: ``pytest benchmarks/bench_transfer_gpu.py --benchmark-only`` on a CUDA machine;
set ``LMC_BENCH_REPORT=path.md`` to append the result table there. Device times come
from CUDA events (median); pytest-benchmark's own wall-clock columns include the sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from lmc_transfer.kernels import Direction, KVBuffers, gather, scatter
from lmc_transfer.transfer.paths import Transfer, TransferPath

from .gpu_timing import RESULTS, cuda_median_ms, gbps, memcpy_ms

pytestmark = pytest.mark.gpu

CHUNK = 256


@dataclass(frozen=True)
class Model:
    name: str
    num_layers: int
    plane_shapes: tuple[tuple[int, int], ...]

    def buffers(self, num_slots: int) -> KVBuffers:
        planes = [[torch.randn(num_slots, *s, device="cuda", dtype=torch.bfloat16) for s in self.plane_shapes]
                  for _ in range(self.num_layers)]
        if len(self.plane_shapes) == 1:
            return KVBuffers.mla([p[0] for p in planes])
        return KVBuffers.token_slot([p[0] for p in planes], [p[1] for p in planes])


LLAMA = Model("llama3-8b", 32, ((8, 128), (8, 128)))
MLA = Model("mla-61L", 61, ((1, 576),))
_buffer_cache: dict[str, KVBuffers] = {}
NUM_SLOTS = 2 * 8192


def _buffers(model: Model) -> KVBuffers:
    if model.name not in _buffer_cache:
        _buffer_cache.clear()
        torch.cuda.empty_cache()
        _buffer_cache[model.name] = model.buffers(NUM_SLOTS)
    return _buffer_cache[model.name]


def _slots(n: int, page: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if page == 1:
        return torch.randperm(NUM_SLOTS, generator=gen)[:n].cuda()
    blocks = torch.randperm(NUM_SLOTS // page, generator=gen)[: (n + page - 1) // page]
    return (blocks[:, None] * page + torch.arange(page)).reshape(-1)[:n].cuda()


def _host_slabs(buffers: KVBuffers, n: int) -> list[torch.Tensor]:
    slab_bytes = buffers.geometry.slab_bytes(CHUNK)
    pool = torch.empty(((n + CHUNK - 1) // CHUNK) * slab_bytes, dtype=torch.uint8, pin_memory=True)
    return list(pool.split(slab_bytes))


def _torch_baseline(buffers: KVBuffers, slots: torch.Tensor, host: torch.Tensor, direction: Direction):
    """index_select into one GPU staging buffer + one memcpy (and memcpy + index_copy_ back)."""
    planes = [t.view(torch.uint8).view(buffers.num_slots, -1) for layer in buffers.planes for t in layer]
    n = slots.numel()
    staging = torch.empty(n * sum(p.shape[1] for p in planes), dtype=torch.uint8, device="cuda")
    views, offset = [], 0
    for p in planes:
        views.append(staging[offset:offset + n * p.shape[1]].view(n, p.shape[1]))
        offset += n * p.shape[1]
    host = host[: staging.numel()]

    def run():
        if direction is Direction.GATHER:
            for p, v in zip(planes, views):
                torch.index_select(p, 0, slots, out=v)
            host.copy_(staging, non_blocking=True)
        else:
            staging.copy_(host, non_blocking=True)
            for p, v in zip(planes, views):
                p.index_copy_(0, slots, v)
    return run


@pytest.mark.parametrize("programs", [8, 32, 132])
@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.value)
def test_program_cap_sweep(benchmark, direction, programs):
    buffers = _buffers(LLAMA)
    n = 2048
    slots = _slots(n, 1)
    slabs = _host_slabs(buffers, n)
    transfer = Transfer(buffers, CHUNK, path=TransferPath.ZERO_COPY, max_programs=programs)
    prepared = transfer.prepare(slots, slabs)
    nbytes = n * buffers.geometry.token_bytes
    ms = cuda_median_ms(lambda: transfer.run(prepared, direction))
    limit = memcpy_ms(nbytes, to_device=direction is Direction.SCATTER)
    RESULTS.add(sweep="zero_copy program cap", model=LLAMA.name, tokens=n, direction=direction.value,
                programs=programs, GBps=gbps(nbytes, ms), memcpy_GBps=gbps(nbytes, limit), pct_memcpy=100 * limit / ms)
    benchmark.pedantic(lambda: (transfer.run(prepared, direction), torch.cuda.synchronize()), rounds=5, iterations=1)


@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("tokens", [256, 2048, 8192])
@pytest.mark.parametrize("model", [LLAMA, MLA], ids=lambda m: m.name)
@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.value)
def test_all_layer_throughput(benchmark, direction, model, tokens, page):
    buffers = _buffers(model)
    slots = _slots(tokens, page)
    slabs = _host_slabs(buffers, tokens)
    nbytes = tokens * buffers.geometry.token_bytes
    limit = memcpy_ms(nbytes, to_device=direction is Direction.SCATTER)
    row = dict(model=model.name, tokens=tokens, page=page, direction=direction.value,
               memcpy_GBps=gbps(nbytes, limit))
    for path in (TransferPath.ZERO_COPY, TransferPath.STAGED):
        transfer = Transfer(buffers, CHUNK, path=path)
        prepared = transfer.prepare(slots, slabs)
        ms = cuda_median_ms(lambda: transfer.run(prepared, direction))
        row[f"{path.value}_GBps"] = gbps(nbytes, ms)
        row[f"{path.value}_pct"] = 100 * limit / ms
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    ms = cuda_median_ms(_torch_baseline(buffers, slots, host, direction))
    row["torch_GBps"] = gbps(nbytes, ms)
    row["torch_pct"] = 100 * limit / ms
    RESULTS.add(**row)
    transfer = Transfer(buffers, CHUNK)
    prepared = transfer.prepare(slots, slabs)
    benchmark.pedantic(lambda: (transfer.run(prepared, direction), torch.cuda.synchronize()), rounds=3, iterations=1)


@pytest.mark.parametrize("fast_launch", ["1", "0"], ids=["fast_launch", "triton_launch"])
@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.value)
def test_layerwise_32_single_layer_transfers(benchmark, monkeypatch, direction, fast_launch):
    from lmc_transfer.kernels import launch

    monkeypatch.setattr(launch, "FAST_LAUNCH", fast_launch == "1")
    buffers = _buffers(LLAMA)
    n = 256
    slots = _slots(n, 1)
    slabs = _host_slabs(buffers, n)
    nbytes = n * buffers.geometry.token_bytes
    limit = memcpy_ms(nbytes, to_device=direction is Direction.SCATTER)
    transfer = Transfer(buffers, CHUNK, path=TransferPath.ZERO_COPY)
    prepared = transfer.prepare(slots, slabs)

    def per_layer():
        for layer in range(buffers.num_layers):
            transfer.run(prepared, direction, layers=range(layer, layer + 1))

    ms = cuda_median_ms(per_layer)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        per_layer()
    cpu_us = (time.perf_counter() - t0) / (10 * buffers.num_layers) * 1e6
    torch.cuda.synchronize()
    RESULTS.add(layerwise="32 x 1 layer, 256 tokens", direction=direction.value, fast_launch=fast_launch,
                fast_launch_broken=str(launch.fast_launch_broken), GBps=gbps(nbytes, ms),
                memcpy_GBps=gbps(nbytes, limit), pct_memcpy=100 * limit / ms, cpu_us_per_layer=cpu_us)
    benchmark.pedantic(lambda: (per_layer(), torch.cuda.synchronize()), rounds=5, iterations=1)


@pytest.mark.parametrize("tokens", [256, 2048])
@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.value)
def test_one_shot_against_prepared(benchmark, direction, tokens):
    """``kernels.gather/scatter`` (a plan built per call) against ``run_copy`` of a prepared plan,
    all layers, zero-copy: device time from before the call to after its kernel."""
    buffers = _buffers(LLAMA)
    slots = _slots(tokens, 1)
    slabs = _host_slabs(buffers, tokens)
    nbytes = tokens * buffers.geometry.token_bytes
    limit = memcpy_ms(nbytes, to_device=direction is Direction.SCATTER)
    one_shot = gather if direction is Direction.GATHER else scatter
    transfer = Transfer(buffers, CHUNK, path=TransferPath.ZERO_COPY)
    prepared = transfer.prepare(slots, slabs)
    prepared_ms = cuda_median_ms(lambda: transfer.run(prepared, direction), iters=20)
    one_shot_ms = cuda_median_ms(lambda: one_shot(buffers, slots, slabs, chunk_size=CHUNK), iters=20)
    t0 = time.perf_counter()
    for _ in range(20):
        one_shot(buffers, slots, slabs, chunk_size=CHUNK)
    cpu_us = (time.perf_counter() - t0) / 20 * 1e6
    torch.cuda.synchronize()
    RESULTS.add(one_shot=direction.value, tokens=tokens, memcpy_GBps=gbps(nbytes, limit),
                prepared_pct_memcpy=100 * limit / prepared_ms, one_shot_pct_memcpy=100 * limit / one_shot_ms,
                one_shot_cpu_us=cpu_us)
    benchmark.pedantic(lambda: (one_shot(buffers, slots, slabs, chunk_size=CHUNK), torch.cuda.synchronize()),
                       rounds=3, iterations=1)


@pytest.mark.parametrize("path, programs", [("memcpy", None), (TransferPath.ZERO_COPY, 8),
                                            (TransferPath.ZERO_COPY, 32), (TransferPath.STAGED, None)],
                         ids=["memcpy", "zero_copy_8", "zero_copy_32", "staged"])
@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.value)
def test_beside_compute_stream(benchmark, direction, path, programs):
    """Transfer on a side stream while 20 bf16 8192^2 matmuls run on the main stream."""
    buffers = _buffers(LLAMA)
    n = 4096
    slots = _slots(n, 1)
    slabs = _host_slabs(buffers, n)
    nbytes = n * buffers.geometry.token_bytes
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream(priority=-1)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    if path == "memcpy":
        def transfer_fn():
            if direction is Direction.GATHER:
                host.copy_(dev, non_blocking=True)
            else:
                dev.copy_(host, non_blocking=True)
    else:
        transfer = Transfer(buffers, CHUNK, path=path, max_programs=programs)
        prepared = transfer.prepare(slots, slabs)

        def transfer_fn():
            transfer.run(prepared, direction, stream=side)

    def compute():
        for _ in range(20):
            torch.mm(a, b)

    compute_ms = cuda_median_ms(compute, iters=5)
    with torch.cuda.stream(side):
        transfer_ms = cuda_median_ms(transfer_fn, iters=5, stream=side)
    main = torch.cuda.current_stream()
    both, slowed = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        start, c_end, t_end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record(main)
        side.wait_event(start)
        with torch.cuda.stream(side):
            transfer_fn()
        t_end.record(side)
        compute()
        c_end.record(main)
        torch.cuda.synchronize()
        both.append(max(start.elapsed_time(c_end), start.elapsed_time(t_end)))
        slowed.append(start.elapsed_time(c_end))
    both_ms, compute_with_ms = sorted(both)[2], sorted(slowed)[2]
    hidden = (compute_ms + transfer_ms - both_ms) / transfer_ms
    RESULTS.add(beside_compute=str(getattr(path, "value", path)), programs=programs or "-", direction=direction.value, tokens=n,
                transfer_alone_ms=transfer_ms, compute_alone_ms=compute_ms, together_ms=both_ms,
                pct_hidden=100 * min(1.0, hidden), compute_slowdown_pct=100 * (compute_with_ms / compute_ms - 1))
    benchmark.pedantic(lambda: (transfer_fn(), torch.cuda.synchronize()), rounds=3, iterations=1)

