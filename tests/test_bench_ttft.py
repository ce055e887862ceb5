"""The TTFT benchmark's logic on CPU: case sizes, target verdicts, and its measurement and
transfer loop driven through a tiny real model (the GPU runs only add timing and a CUDA graph)."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.bench_ttft_gpu import (DecodeResult, TransferLoop, TTFTCase, TTFTResult, TTFTTimes, measure_ttft,
                                       random_tokens)
from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.demo.hf_engine import TINY_LLAMA, HFEngine, build_model
from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.radix.lmc_radix_cache import LMCRadixCache

pytestmark = pytest.mark.timeout(120)

CHUNK = 16


def tiny_engine(num_slots: int = 512) -> HFEngine:
    buffers = TINY_LLAMA.kv_pool(num_slots, torch.float32).buffers("cpu", seed=3)
    config = LMCTransferConfig.from_dict({"mode": "ip", "chunk_size": CHUNK, "max_local_cpu_size": 0.002})
    cache = LMCRadixCache(TokenSlotAllocator(num_slots, kvcache=buffers), config=config, model_id="bench-ttft-test")
    return HFEngine(build_model(TINY_LLAMA, dtype=torch.float32, device="cpu", seed=0), cache)


@pytest.mark.parametrize("prompt, cached", [(2048, 1792), (8192, 7936), (32768, 32512), (300, 256)])
def test_case_caches_the_full_chunks_of_all_but_the_last_token(prompt, cached):
    case = TTFTCase(prompt)
    assert (case.cached_tokens, case.uncached_tokens) == (cached, prompt - cached)
    assert case.pool_slots == 2 * prompt and case.host_chunks == prompt // 256 + 1


def test_case_rejects_a_prompt_of_one_chunk():
    with pytest.raises(ValueError, match="exceed chunk=256 > 0, got 256"):
        TTFTCase(256)


def times(recompute: float, hit: float, suffix: float) -> TTFTTimes:
    return TTFTTimes(recompute=recompute, hit=hit, load=hit - suffix, rebuild=0.001, suffix_prefill=suffix,
                     loaded_tokens=7936)


def test_ttft_verdicts_name_the_missed_target_and_its_numbers():
    case = TTFTCase(8192)
    met = TTFTResult("ip", case, times(recompute=0.258, hit=0.030, suffix=0.008), memcpy=0.0197)
    assert met.missed == [] and met.row()["targets"] == "met"
    assert met.row()["speedup"] == pytest.approx(8.6, abs=0.01)
    slow = TTFTResult("mp", case, times(recompute=0.258, hit=0.040, suffix=0.008), memcpy=0.0197)
    assert slow.missed == ["hit 1.44x memcpy + suffix prefill (target <= 1.2x)", "speedup 6.5x (target >= 8x)"]
    short = TTFTResult("ip", TTFTCase(2048), times(recompute=0.063, hit=0.020, suffix=0.008), memcpy=0.0049)
    assert short.missed == ["hit 1.55x memcpy + suffix prefill (target <= 1.2x)"]  # no speedup target at 2k


def test_decode_slowdown_is_the_ratio_of_median_step_times():
    result = DecodeResult("ip", alone_ms=[10.0, 9.0, 11.0], beside_ms=[10.2, 10.4, 30.0], transfer_gbps=40.0)
    assert result.slowdown_pct == pytest.approx(4.0)
    assert result.row()["target"] == "missed (<= 3.0%)"
    assert DecodeResult("ip", [10.0], [10.2], 40.0).row()["target"] == "met"


def test_measure_ttft_times_recomputes_and_hits_that_load_every_cached_chunk():
    engine = tiny_engine()
    case = TTFTCase(5 * CHUNK, chunk=CHUNK)
    result = measure_ttft(engine, case, random_tokens(case.prompt_tokens, TINY_LLAMA.vocab, seed=1), repeats=2)
    assert result.loaded_tokens == case.cached_tokens == 4 * CHUNK
    assert min(result.recompute, result.hit, result.load, result.rebuild, result.suffix_prefill) > 0
    assert result.load < result.hit
    with pytest.raises(ValueError, match="must be new to the caches, 64 tokens were reused"):
        measure_ttft(engine, case, random_tokens(case.prompt_tokens, TINY_LLAMA.vocab, seed=1), repeats=1)
    engine.cache.release_host_resources()


def test_transfer_loop_loads_and_stores_in_a_thread_until_stopped():
    engine = tiny_engine()
    prompt = random_tokens(4 * CHUNK, TINY_LLAMA.vocab, seed=2)
    loop = TransferLoop(engine, prompt)
    loop.prepare()
    loop.cycle()
    token_bytes = engine.buffers.geometry.token_bytes
    # 3 chunks loaded (the last token always runs), 4 new chunks stored
    assert (loop.cycles, loop.moved_bytes) == (1, (3 + 4) * CHUNK * token_bytes)
    deadline = time.monotonic() + 60
    with loop.running():
        assert loop.cycles >= 2
        while loop.cycles < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    stopped_at = loop.cycles
    assert stopped_at >= 4
    time.sleep(0.05)
    assert loop.cycles == stopped_at  # the thread has ended
    engine.cache.release_host_resources()


def test_transfer_loop_reraises_what_failed_in_its_thread():
    engine = tiny_engine()
    loop = TransferLoop(engine, random_tokens(4 * CHUNK, TINY_LLAMA.vocab, seed=4))  # never stored: no hit
    with pytest.raises(AssertionError, match="was not loaded from the host cache"):
        with loop.running():
            pass
    engine.cache.release_host_resources()
