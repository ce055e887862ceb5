"""Time to first token (TTFT) of a real transformer with and without a prefix hit, and decode
beside KV transfers.

The model: transformers' Llama in the Llama-3-8B shape (32 layers, 8 KV heads x 128, bf16,
sdpa), random weights created on the GPU. Its KV lives in token_slot buffers behind
``LMCRadixCache`` (``lmc_transfer.demo.hf_engine``), IP and MP (a daemon subprocess).

TTFT: prompts of 2k, 8k and 32k tokens, stored by a first serve; then all but the last 256
tokens are cached on the host (the tree is evicted before every hit). Per prompt:
- recompute: the whole prompt prefilled from scratch;
- hit: lookup + load of the cached chunks into the engine's slots, the model's DynamicCache
  rebuilt from them, the 256-token suffix prefilled, until the first token is on the host;
- beside it: the load alone, a same-run pinned memcpy of the loaded bytes (the physical limit),
  the rebuild alone and the suffix's prefill alone over a ready KV cache. The target bound is
  memcpy + suffix prefill: a hit within 1.2x of it, and >= 8x (8k) / >= 12x (32k) faster than
  recomputing.

Decode: one decode step of 32 sequences at 2048 tokens of context, captured in a CUDA graph and
replayed with two steps in flight; its device time (CUDA events) alone and while a second
thread loads and stores another request's KV (8k tokens each way) in a loop. Target: <= 3%
slower.

Run on a CUDA machine with transformers installed (2 minutes on an H200, all 8 cases; GPU memory
peaks at an estimated ~45 GB at the 32k prompt, with ~5 GB of host memory pinned or shared):
    python -m pytest benchmarks/bench_ttft_gpu.py --benchmark-only -q -p no:cacheprovider
``LMC_BENCH_REPORT=path.md`` appends the result tables there.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from lmc_transfer.config import GB, LMCTransferConfig, load_config
from lmc_transfer.demo.hf_engine import (LLAMA_3_8B, HFEngine, LlamaShape, build_model, import_transformers,
                                         model_forward)
from lmc_transfer.demo.toy_engine import alloc_slots
from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.radix.lmc_radix_cache import LMCRadixCache
from lmc_transfer.radix.request import Req
from tests.conftest_mp import Daemon, daemons, start_daemon, workdir, write_config  # noqa: F401  (fixtures)

from .gpu_timing import RESULTS, memcpy_ms

pytestmark = pytest.mark.gpu

CHUNK = 256
PROMPTS = (2048, 8192, 32768)
MODES = ("ip", "mp")
REPEATS = 3  # timed runs per measurement, after one warm-up; medians are reported
BOUND_FACTOR = 1.2  # a hit's TTFT within this factor of memcpy + suffix prefill
SPEEDUP_TARGETS = {8192: 8.0, 32768: 12.0}  # recompute / hit, by prompt length
DECODE_SLOWDOWN_PCT = 3.0
DECODE_BATCH, DECODE_CONTEXT, DECODE_STEPS = 32, 2048, 80
TRANSFER_PROMPT = 8192  # the other request's KV, loaded and stored beside the decode batch


# ----- what is measured (no GPU needed) -----


@dataclass(frozen=True)
class TTFTCase:
    """A prompt of ``prompt_tokens``, stored by a first serve; a hit then loads the full chunks of
    all but its last token (the last token always runs) and computes the rest."""

    prompt_tokens: int
    chunk: int = CHUNK

    def __post_init__(self) -> None:
        if self.chunk <= 0 or self.prompt_tokens <= self.chunk:
            raise ValueError(f"prompt_tokens must exceed chunk={self.chunk} > 0, got {self.prompt_tokens}")

    @property
    def cached_tokens(self) -> int:
        return (self.prompt_tokens - 1) // self.chunk * self.chunk

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def pool_slots(self) -> int:
        """GPU KV slots: the tree's copy of the prompt and a recompute's own."""
        return 2 * self.prompt_tokens

    @property
    def host_chunks(self) -> int:
        """Host slabs: every full chunk of the prompt (the first serve stores them all), plus one."""
        return self.prompt_tokens // self.chunk + 1


@dataclass(frozen=True)
class TTFTTimes:
    """Medians of one case, in seconds; ``loaded_tokens`` came from the host cache in every hit."""

    recompute: float
    hit: float
    load: float
    rebuild: float
    suffix_prefill: float
    loaded_tokens: int


@dataclass(frozen=True)
class TTFTResult:
    mode: str
    case: TTFTCase
    times: TTFTTimes
    memcpy: float  # seconds: pinned host -> device copy of the loaded bytes, same run

    @property
    def speedup(self) -> float:
        return self.times.recompute / self.times.hit

    @property
    def bound(self) -> float:
        """What a hit costs at best: the bytes at memcpy speed, then the suffix's prefill."""
        return self.memcpy + self.times.suffix_prefill

    @property
    def missed(self) -> list[str]:
        """The targets this result misses, each with its numbers."""
        out = []
        if self.times.hit > BOUND_FACTOR * self.bound:
            out.append(f"hit {self.times.hit / self.bound:.2f}x memcpy + suffix prefill (target <= {BOUND_FACTOR}x)")
        target = SPEEDUP_TARGETS.get(self.case.prompt_tokens)
        if target is not None and self.speedup < target:
            out.append(f"speedup {self.speedup:.1f}x (target >= {target:.0f}x)")
        return out

    def row(self) -> dict[str, object]:
        t = self.times
        return {
            "ttft": self.mode,
            "prompt": self.case.prompt_tokens,
            "cached": t.loaded_tokens,
            "recompute_ms": t.recompute * 1e3,
            "hit_ms": t.hit * 1e3,
            "speedup": t.recompute / t.hit,
            "load_ms": t.load * 1e3,
            "memcpy_ms": self.memcpy * 1e3,
            "load_vs_memcpy": t.load / self.memcpy,
            "rebuild_ms": t.rebuild * 1e3,
            "suffix_prefill_ms": t.suffix_prefill * 1e3,
            "hit_vs_bound": t.hit / self.bound,
            "targets": "; ".join(self.missed) or "met",
        }


@dataclass(frozen=True)
class DecodeResult:
    """Per-step device times (ms) of the decode batch alone and beside the transfers."""

    mode: str
    alone_ms: list[float]
    beside_ms: list[float]
    transfer_gbps: float  # bytes loaded and stored per second by the other request meanwhile

    @property
    def slowdown_pct(self) -> float:
        return (statistics.median(self.beside_ms) / statistics.median(self.alone_ms) - 1) * 100

    def row(self) -> dict[str, object]:
        return {
            "decode": self.mode,
            "batch": DECODE_BATCH,
            "context": DECODE_CONTEXT,
            "step_ms_alone": statistics.median(self.alone_ms),
            "step_ms_beside_transfer": statistics.median(self.beside_ms),
            "slowdown_pct": self.slowdown_pct,
            "transfer_GBps": self.transfer_gbps,
            "target": "met" if self.slowdown_pct <= DECODE_SLOWDOWN_PCT else f"missed (<= {DECODE_SLOWDOWN_PCT}%)",
        }


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn`` until its device work on this stream is done."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def first_token(logits: torch.Tensor) -> int:
    """The greedy first output token, on the host (what TTFT waits for)."""
    return int(logits[-1].argmax())


def measure_ttft(engine: HFEngine, case: TTFTCase, prompt: list[int], repeats: int = REPEATS) -> TTFTTimes:
    """Serve ``prompt`` once (stores it), then time recomputes and hits; medians of ``repeats``
    after one warm-up each. The tree is evicted before each hit, so each one loads from the host."""
    if len(prompt) != case.prompt_tokens:
        raise ValueError(f"prompt: expected {case.prompt_tokens} tokens, got {len(prompt)}")
    device = engine.device
    cold = engine.match("cold", prompt)
    if cold.reused_tokens:
        raise ValueError(f"prompt: must be new to the caches, {cold.reused_tokens} tokens were reused")
    engine.prefill(cold)
    engine.finish(cold)
    engine.flush_device_tree()  # settles the store

    recompute, hit, load, loaded = [], [], [], []
    for i in range(repeats + 1):
        state = engine.fresh(f"recompute-{i}", prompt)
        recompute.append(timed(lambda: first_token(engine.prefill(state)), device))
        engine.release(state)
    for i in range(repeats + 1):
        engine.flush_device_tree()
        start = time.perf_counter()
        state = engine.match(f"hit-{i}", prompt)
        first_token(engine.prefill(state))
        hit.append(time.perf_counter() - start)
        load.append(state.load_seconds)
        loaded.append(state.loaded_tokens)
        engine.release(state)
    if set(loaded) != {case.cached_tokens}:
        raise AssertionError(f"every hit must load {case.cached_tokens} tokens from the host cache, loaded {loaded}")

    # The prefix is in the device tree now: the rebuild and the suffix's prefill alone.
    rebuild, suffix = [], []
    for i in range(repeats + 1):
        state = engine.match(f"device-{i}", prompt)
        kv: list[Any] = []
        rebuild.append(timed(lambda: kv.append(engine.rebuild_kv(state.prefix)), device))
        rest = prompt[state.reused_tokens:]
        suffix.append(timed(lambda: first_token(engine.forward(rest, kv[0])[0]), device))
        engine.release(state)
    return TTFTTimes(*(statistics.median(x[1:]) for x in (recompute, hit, load, rebuild, suffix)),
                     loaded_tokens=case.cached_tokens)


@dataclass
class TransferLoop:
    """Another request's KV, loaded and stored in a loop by a second thread: each cycle loads the
    cached prefix of ``prompt`` into fresh slots and stores a new prompt of the same length from
    slots (their bytes stand for KV computed elsewhere), then evicts the tree (which waits for the
    store). The engine must not be used by anyone else meanwhile."""

    engine: HFEngine
    prompt: list[int]
    seed: int = 1  # of the new prompts' tokens
    cycles: int = 0
    moved_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _error: list[BaseException] = field(default_factory=list)
    _tokens: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._tokens = torch.Generator().manual_seed(self.seed)

    def prepare(self) -> None:
        """Store ``prompt`` (its KV is whatever its slots hold), so that cycles have a hit."""
        self._store(self.prompt)
        self.engine.flush_device_tree()

    def cycle(self) -> None:
        engine = self.engine
        stored_before = engine.cache.store.stats().stored_bytes
        state = engine.match(f"load-{self.cycles}", self.prompt)
        if state.loaded_tokens == 0:
            raise AssertionError("the transfer loop's prompt was not loaded from the host cache")
        engine.release(state)
        vocab = engine.model.config.vocab_size
        self._store(torch.randint(1, vocab, (len(self.prompt),), generator=self._tokens).tolist())
        engine.flush_device_tree()
        stored = engine.cache.store.stats().stored_bytes - stored_before
        if stored == 0:
            raise AssertionError("the transfer loop's new prompt was not stored")
        self.moved_bytes += state.loaded_tokens * engine.buffers.geometry.token_bytes + stored
        self.cycles += 1

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Cycles in a thread (on a CUDA stream of its own) while the body runs; the first cycle
        has completed when the body starts."""
        started = threading.Event()
        device = self.engine.device

        def run() -> None:
            try:
                own_stream = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
                with own_stream:
                    while not self._stop.is_set():
                        self.cycle()
                        started.set()
            except BaseException as exc:  # re-raised in the caller's thread
                self._error.append(exc)
                started.set()

        thread = threading.Thread(target=run, name="transfer-loop", daemon=True)
        self._stop.clear()
        thread.start()
        started.wait(timeout=120)
        try:
            if self._error:
                raise self._error[0]
            yield
        finally:
            self._stop.set()
            thread.join(timeout=120)
        if self._error:
            raise self._error[0]
        if thread.is_alive():
            raise RuntimeError("the transfer loop did not stop within 120 s")

    def _store(self, tokens: list[int]) -> None:
        cache = self.engine.cache
        slots = alloc_slots(cache, len(tokens))
        req = Req(f"store-{self.cycles}", tokens, req_to_token=slots, last_node=cache.root_node)
        cache.cache_finished_req(req)


# ----- GPU only -----


class DecodeStep:
    """One decode step of ``batch`` sequences at ``context`` tokens of random KV, captured in a
    CUDA graph; every replay is the same step (its inputs are never appended to)."""

    def __init__(self, model: Any, batch: int, context: int, seed: int = 0) -> None:
        config = model.config
        device = model.device
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (batch, config.num_key_value_heads, context, config.head_dim)

        def planes() -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(torch.randn(shape, generator=g, device=device, dtype=model.dtype) for _ in range(2))

        cache = import_transformers().DynamicCache(
            ddp_cache_data=(planes() for _ in range(config.num_hidden_layers)), config=config)
        ids = torch.randint(1, config.vocab_size, (batch, 1), generator=g, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph; back to `context` tokens each time
                model_forward(model, ids, cache)
                cache.crop(-1)
        torch.cuda.current_stream(device).wait_stream(side)
        # What every replay reads: it must outlive the graph.
        self._inputs = [(layer.keys, layer.values) for layer in cache.layers]
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = model_forward(model, ids, cache)
        self._cache, self._ids = cache, ids
        self.device = device

    def step_times_ms(self, steps: int, in_flight: int = 2) -> list[float]:
        """Device time of each of ``steps`` replays (CUDA events), keeping ``in_flight`` queued."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        with torch.cuda.stream(stream):
            for i, (start, end) in enumerate(events):
                start.record(stream)
                self._graph.replay()
                end.record(stream)
                if i >= in_flight:
                    events[i - in_flight][1].synchronize()
        events[-1][1].synchronize()
        return [start.elapsed_time(end) for start, end in events]


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    built = build_model(LLAMA_3_8B, dtype=torch.bfloat16, device="cuda", seed=0)
    yield built
    del built
    torch.cuda.empty_cache()


def _config(mode: str, host_chunks: int, shape: LlamaShape, workdir: Path, daemons: list[Daemon]) -> LMCTransferConfig:
    pool_gb = host_chunks * shape.kv_pool(CHUNK, torch.bfloat16).token_bytes * CHUNK / GB
    settings: dict[str, Any] = {"chunk_size": CHUNK, "max_local_cpu_size": pool_gb, "lease_ttl_s": 60.0}
    if mode == "ip":
        return LMCTransferConfig.from_dict({"mode": "ip", **settings})
    path = write_config(workdir, lookup_timeout_ms=2000, request_timeout_ms=10000, **settings)
    start_daemon(daemons, path)
    return load_config(path)


@contextlib.contextmanager
def _engine(model: Any, mode: str, slots: int, host_chunks: int, workdir: Path, daemons: list[Daemon]) -> Iterator[HFEngine]:
    config = _config(mode, host_chunks, LLAMA_3_8B, workdir, daemons)
    buffers = LLAMA_3_8B.kv_pool(slots, torch.bfloat16).buffers(torch.device("cuda"), seed=1)
    cache = LMCRadixCache(TokenSlotAllocator(slots, device="cuda", kvcache=buffers), config=config,
                          model_id="bench-ttft-llama3-8b")
    try:
        yield HFEngine(model, cache)
    finally:
        cache.release_host_resources()
        del cache, buffers
        torch.cuda.empty_cache()


@pytest.mark.parametrize("prompt_tokens", PROMPTS)
@pytest.mark.parametrize("mode", MODES)
def test_ttft_recompute_vs_hit(benchmark, model, workdir, daemons, mode, prompt_tokens):
    case = TTFTCase(prompt_tokens)
    prompt = random_tokens(prompt_tokens, LLAMA_3_8B.vocab, seed=prompt_tokens)
    with _engine(model, mode, case.pool_slots, case.host_chunks, workdir, daemons) as engine:
        times = measure_ttft(engine, case, prompt)
        nbytes = case.cached_tokens * engine.buffers.geometry.token_bytes
        result = TTFTResult(mode, case, times, memcpy_ms(nbytes, to_device=True) / 1e3)
        RESULTS.add(**result.row())

        def hit_once() -> None:
            engine.flush_device_tree()
            state = engine.match("benchmark", prompt)
            first_token(engine.prefill(state))
            engine.release(state)

        benchmark.pedantic(hit_once, rounds=1, iterations=1)


@pytest.mark.parametrize("mode", MODES)
def test_decode_step_beside_transfer(benchmark, model, workdir, daemons, mode):
    step = DecodeStep(model, DECODE_BATCH, DECODE_CONTEXT)
    host_chunks = 3 * TRANSFER_PROMPT // CHUNK  # the loaded prompt, the stored one, the one before
    with _engine(model, mode, 3 * TRANSFER_PROMPT, host_chunks, workdir, daemons) as engine:
        loop = TransferLoop(engine, random_tokens(TRANSFER_PROMPT, LLAMA_3_8B.vocab, seed=7))
        loop.prepare()
        step.step_times_ms(5)  # warm-up
        alone = step.step_times_ms(DECODE_STEPS)
        with loop.running():
            cycles, moved, start = loop.cycles, loop.moved_bytes, time.perf_counter()
            beside = step.step_times_ms(DECODE_STEPS)
            seconds = time.perf_counter() - start
            cycles, moved = loop.cycles - cycles, loop.moved_bytes - moved
        if cycles == 0:
            raise AssertionError("no load/store cycle ran while the decode batch was measured")
        RESULTS.add(**DecodeResult(mode, alone, beside, moved / seconds / 1e9).row())
        benchmark.pedantic(lambda: step.step_times_ms(DECODE_STEPS), rounds=1, iterations=1)
