"""A real transformer (transformers' Llama, tiny, random weights) behind LMCRadixCache, IP and MP.

A prompt is served and stored by one engine; a second engine (fresh random KV buffers, tree and
store objects; the same IP pool or MP daemon) serves that prompt plus a continuation. The KV it
loads must equal the first engine's bit for bit, touch no other slot, and the continuation's
logits must equal a full recompute's; with one token's KV replaced after the load, they must not.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmc_transfer.config import LMCTransferConfig, Mode, load_config
from lmc_transfer.demo.hf_engine import TINY_LLAMA, HFEngine, KVDigests, build_model, import_transformers
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.radix.lmc_radix_cache import LMCRadixCache
from lmc_transfer.store.base import CacheStore
from tests.conftest_mp import Daemon, daemons, start_daemon, workdir, write_config  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)

CHUNK = 16
NUM_SLOTS = 256
CACHED_CHUNKS = 3
PROMPT = CACHED_CHUNKS * CHUNK + 9  # stored: its 3 full chunks
CONTINUATION = 20
MODEL_ID = "tiny-llama-test"
# Logits of the same tokens from forwards of different lengths differ by rounding only:
# ~1e-6 (fp32) and one bf16 ulp of the largest logit; both bounds are relative to it.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-6}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

_models: dict[torch.dtype, object] = {}


def tiny_model(dtype: torch.dtype):
    if dtype not in _models:
        _models[dtype] = build_model(TINY_LLAMA, dtype=dtype, device="cpu", seed=0)
    return _models[dtype]


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_LLAMA.vocab, (n,), generator=g).tolist()


def all_kv_bytes(buffers: KVBuffers, slots: torch.Tensor) -> torch.Tensor:
    """Every layer's and plane's rows of ``slots`` as one uint8 tensor."""
    return torch.cat([buffers.plane_rows(layer, plane)[slots].reshape(-1)
                      for layer in range(buffers.num_layers) for plane in range(2)])


@dataclass
class Setup:
    config: LMCTransferConfig

    def engine(self, dtype: torch.dtype, seed: int, store: CacheStore | None = None) -> HFEngine:
        buffers = TINY_LLAMA.kv_pool(NUM_SLOTS, dtype).buffers("cpu", seed)
        cache = LMCRadixCache(TokenSlotAllocator(NUM_SLOTS, kvcache=buffers), config=self.config,
                              model_id=MODEL_ID, store=store)
        return HFEngine(tiny_model(dtype), cache)


@pytest.fixture(params=["ip", "mp"])
def setup(request, workdir: Path, daemons: list[Daemon]) -> Setup:
    pool_gb = 64 * TINY_LLAMA.kv_pool(1, torch.float32).token_bytes * CHUNK / 1024**3
    if request.param == "ip":
        return Setup(LMCTransferConfig.from_dict({"mode": "ip", "chunk_size": CHUNK, "max_local_cpu_size": pool_gb}))
    path = write_config(workdir, chunk_size=CHUNK, max_local_cpu_size=pool_gb)
    start_daemon(daemons, path)
    return Setup(load_config(path))


@dataclass
class Stored:
    engine: HFEngine  # engine 1, which computed and stored the prompt
    kv: torch.Tensor  # the bytes of the prompt's cached chunks, as engine 1 computed them
    continued: list[int]  # the prompt and its continuation
    full_logits: torch.Tensor  # of ``continued`` computed from scratch, [len(continued), vocab]

    def expected(self, reused_tokens: int) -> tuple[torch.Tensor, float]:
        """The logits the tokens past ``reused_tokens`` must have, and the tolerance."""
        expected = self.full_logits[reused_tokens:]
        return expected, TOLERANCE[self.full_logits.dtype] * expected.abs().max().item()


def serve_and_store(setup: Setup, dtype: torch.dtype, seed: int) -> Stored:
    """Engine 1 computes a prompt from nothing and stores it, then computes the prompt and a
    continuation from scratch (the reference)."""
    prompt = tokens(seed, PROMPT)
    first = setup.engine(dtype, seed=1)
    state = first.match("first", prompt)
    assert state.reused_tokens == 0
    first.prefill(state)
    stored = all_kv_bytes(first.buffers, state.req.req_to_token[: CACHED_CHUNKS * CHUNK]).clone()
    first.finish(state)
    first.flush_device_tree()  # settles the store
    assert first.cache.store.stats().stored_chunks == CACHED_CHUNKS
    continued = prompt + tokens(seed + 1, CONTINUATION)
    reference = first.fresh("reference", continued)
    full = first.prefill(reference, logits_to_keep=0)
    first.release(reference)
    return Stored(first, stored, continued, full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hit_reloads_exact_kv_and_matches_full_recompute(setup: Setup, dtype: torch.dtype):
    stored = serve_and_store(setup, dtype, seed=1)
    first = stored.engine
    # The IP pool is process memory, kept across the restart; the MP daemon keeps running.
    keep = first.cache.store if setup.config.mode is Mode.IP else None
    if keep is None:
        first.cache.release_host_resources()
    else:
        first.cache.reset()

    second = setup.engine(dtype, seed=2, store=keep)
    before = all_kv_bytes(second.buffers, torch.arange(NUM_SLOTS)).clone()
    state = second.match("second", stored.continued)
    assert (state.reused_tokens, state.loaded_tokens) == (CACHED_CHUNKS * CHUNK, CACHED_CHUNKS * CHUNK)
    assert torch.equal(all_kv_bytes(second.buffers, state.prefix), stored.kv)
    untouched = torch.ones(NUM_SLOTS, dtype=torch.bool)
    untouched[state.prefix] = False
    after = all_kv_bytes(second.buffers, torch.arange(NUM_SLOTS))
    rows = after.view(second.buffers.num_layers * 2, NUM_SLOTS, -1)
    assert torch.equal(rows[:, untouched], before.view_as(rows)[:, untouched])

    hit = second.prefill(state, logits_to_keep=0)
    expected, tol = stored.expected(state.reused_tokens)
    assert hit.shape == expected.shape == (len(stored.continued) - state.reused_tokens, TINY_LLAMA.vocab)
    assert (hit - expected).abs().max().item() <= tol
    second.finish(state)
    second.cache.release_host_resources()
    if keep is not None:
        keep.close()


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token_of_swapped_kv_changes_the_logits(setup: Setup, dtype: torch.dtype):
    """The negative control: the comparison above can fail."""
    stored = serve_and_store(setup, dtype, seed=3)
    first = stored.engine
    state = first.match("again", stored.continued)
    assert state.loaded_tokens == CACHED_CHUNKS * CHUNK
    # Token 5 gets token 6's KV, in every layer (a swap of both K and V would leave attention
    # over the set of tokens unchanged).
    for k, v in first.buffers.planes:
        k[state.prefix[5]] = k[state.prefix[6]]
        v[state.prefix[5]] = v[state.prefix[6]]
    hit = first.prefill(state, logits_to_keep=0)
    expected, tol = stored.expected(state.reused_tokens)
    assert (hit - expected).abs().max().item() > 10 * tol
    first.finish(state)
    first.cache.release_host_resources()


def test_digests_catch_one_changed_byte():
    setup = Setup(LMCTransferConfig.from_dict({"mode": "ip", "chunk_size": CHUNK, "max_local_cpu_size": 0.01}))
    engine = setup.engine(torch.float32, seed=5)
    digests = KVDigests(CHUNK)
    prompt = tokens(7, PROMPT)
    state = engine.fresh("a", prompt)
    engine.prefill(state)
    slots = state.req.req_to_token
    digests.record(engine.buffers, prompt, slots, computed_from=0)
    assert digests.mismatched_tokens(engine.buffers, prompt, slots) == 0
    engine.buffers.plane_rows(1, 1)[slots[CHUNK + 3], 7] ^= 0x10  # one byte of chunk 1
    assert digests.mismatched_tokens(engine.buffers, prompt, slots) == CHUNK
    assert digests.mismatched_tokens(engine.buffers, tokens(8, PROMPT), slots) == CACHED_CHUNKS * CHUNK  # other tokens: unknown
    engine.release(state)
    engine.cache.release_host_resources()


def test_engine_rejects_kv_buffers_of_another_shape():
    model = tiny_model(torch.float32)
    buffers = TINY_LLAMA.kv_pool(NUM_SLOTS, torch.bfloat16).buffers("cpu", seed=0)
    config = LMCTransferConfig.from_dict({"mode": "ip", "chunk_size": CHUNK, "max_local_cpu_size": 0.01})
    cache = LMCRadixCache(TokenSlotAllocator(NUM_SLOTS, kvcache=buffers), config=config, model_id=MODEL_ID)
    with pytest.raises(ValueError, match="float32.*got.*bfloat16"):
        HFEngine(model, cache)
    cache.release_host_resources()


def test_prompt_token_ids_must_fit_the_vocabulary():
    setup = Setup(LMCTransferConfig.from_dict({"mode": "ip", "chunk_size": CHUNK, "max_local_cpu_size": 0.01}))
    engine = setup.engine(torch.float32, seed=6)
    with pytest.raises(ValueError, match=r"\[0, 512\), got \[512\]"):
        engine.match("r", [1, 2, TINY_LLAMA.vocab])
    engine.cache.release_host_resources()


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package does on import
    with pytest.raises(ImportError, match=r"pip install 'lmc-transfer\[hf\]'"):
        import_transformers()
