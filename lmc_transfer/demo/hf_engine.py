"""A real transformer behind ``LMCRadixCache``: Hugging Face ``transformers``' Llama with its KV in token_slot buffers.

For tests, benchmarks and the demo; nothing in the library imports this module, and
``transformers`` (the ``hf`` extra) is imported on first use. Weights are random (seeded) and
created on the target device directly: no downloads.

The KV of every computed token lives in SGLang-style token_slot buffers (per layer K and V
``[num_slots, kv_heads, head_dim]``) that ``LMCRadixCache`` loads into and stores from. A
prefill with a prefix hit loads the cached chunks into the engine's slots, rebuilds the model's
KV cache object (``DynamicCache``) from those slots, runs the model on the rest of the prompt
only, and writes the new tokens' KV back into fresh slots so that the cache can store them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Sequence

import torch

from lmc_transfer.kernels import KVBuffers, KVGeometry, LayoutKind
from lmc_transfer.demo.toy_engine import PhaseStats, ToyShape, alloc_slots
from lmc_transfer.radix.lmc_radix_cache import LMCRadixCache
from lmc_transfer.radix.request import Req

#: The optional-dependency group of lmc-transfer that installs transformers.
EXTRA = "hf"


def transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


def import_transformers() -> ModuleType:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"the real-model engine needs Hugging Face transformers: pip install 'lmc-transfer[{EXTRA}]' ({exc})"
        ) from exc
    return transformers


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama model (``LlamaConfig`` fields)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int = 131072
    rope_theta: float = 500000.0
    init_std: float = 0.02  # transformers' initializer_range

    def config(self) -> Any:
        """The ``LlamaConfig`` (sdpa attention)."""
        return import_transformers().LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            initializer_range=self.init_std,
            attn_implementation="sdpa",
        )

    def parameters(self) -> int:
        """Weights of the model: embeddings, lm_head, per layer attention + MLP + two norms, final norm."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return 2 * self.vocab * self.hidden + self.layers * (attention + mlp + 2 * self.hidden) + self.hidden

    def kv_pool(self, num_slots: int, dtype: torch.dtype) -> ToyShape:
        """The token_slot KV pool of ``num_slots`` tokens this model reads and writes."""
        return ToyShape(self.name, self.layers, self.kv_heads, self.head_dim, num_slots=num_slots, dtype=dtype)


TINY_LLAMA = LlamaShape("tiny Llama (2 layers, 4 heads, 2 KV heads x 16)", layers=2, hidden=64, intermediate=128,
                        heads=4, kv_heads=2, head_dim=16, vocab=512, max_positions=8192, init_std=0.2)
LLAMA_3_8B = LlamaShape("Llama-3-8B (32 layers, 8 KV heads x 128)", layers=32, hidden=4096, intermediate=14336,
                        heads=32, kv_heads=8, head_dim=128, vocab=128256)


def build_model(shape: LlamaShape, *, dtype: torch.dtype, device: torch.device | str, seed: int) -> Any:
    """``LlamaForCausalLM`` with seeded random weights, created on ``device`` in ``dtype``
    (no CPU copy of a GPU model's weights); eval mode, no gradients."""
    transformers = import_transformers()
    device = torch.device(device)
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch.device(device):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM._from_config(shape.config(), dtype=dtype)
    return model.eval().requires_grad_(False)


def model_forward(model: Any, input_ids: torch.Tensor, kv: Any, logits_to_keep: int = 1) -> torch.Tensor:
    """``model`` on ``input_ids`` ``[batch, n]`` after the KV in ``kv`` (a transformers ``Cache``,
    which grows by them); the logits of the last ``logits_to_keep`` tokens (0: all), ``[batch, n, vocab]``."""
    # transformers 5.24 renamed forward's past_key_values to cache (the old name warns).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep, **{name: kv}).logits


def warm_up(model: Any, tokens: int = 64) -> None:
    """One forward outside any cache, so that timings after it exclude first-use costs (CUDA
    context, cuBLAS handles and kernel selection)."""
    ids = torch.ones((1, tokens), dtype=torch.int64, device=model.device)
    int(model_forward(model, ids, import_transformers().DynamicCache(config=model.config))[0, -1].argmax())


def model_kv_geometry(model: Any) -> KVGeometry:
    """The token_slot geometry of ``model``'s KV: per layer K and V ``[kv_heads, head_dim]``."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plane = (int(config.num_key_value_heads), int(head_dim))
    return KVGeometry(LayoutKind.TOKEN_SLOT, int(config.num_hidden_layers), (plane, plane),
                      str(model.dtype).removeprefix("torch."))


@dataclass
class Prefill:
    """One request between ``match`` (or ``fresh``) and ``finish``."""

    req: Req
    prefix: torch.Tensor  # slots of the reused prompt prefix (device tree, then host cache)
    loaded_tokens: int  # of those, loaded from the host cache by this request
    load_seconds: float  # wall time of the lookup and load, until the loaded KV had landed
    kv: Any = None  # the model's DynamicCache once something was computed

    @property
    def reused_tokens(self) -> int:
        return int(self.prefix.numel())


class HFEngine:
    """Serves one request at a time with a transformers causal LM; its KV lives in the slots of
    ``cache``'s allocator (a token_slot ``KVBuffers`` matching the model)."""

    def __init__(self, model: Any, cache: LMCRadixCache) -> None:
        buffers = cache.token_to_kv_pool_allocator.get_kvcache()
        if not isinstance(buffers, KVBuffers):
            raise TypeError(f"cache: its allocator must carry KVBuffers, got {type(buffers).__name__}")
        expected = model_kv_geometry(model)
        if buffers.geometry != expected:
            raise ValueError(f"cache: KV buffers must have this model's geometry {expected}, got {buffers.geometry}")
        if buffers.device != model.device:
            raise ValueError(f"cache: KV buffers must be on the model's device {model.device}, got {buffers.device}")
        self.model = model
        self.cache = cache
        self.buffers = buffers
        self.device = buffers.device
        self._dynamic_cache = import_transformers().DynamicCache

    # ----- a request's life -----

    def match(self, rid: str, prompt: Sequence[int]) -> Prefill:
        """Reuse what the device tree and the host cache hold of ``prompt`` (all but its last
        token, which always runs: it yields the first output's logits); host chunks are loaded
        into this engine's slots and have landed when this returns."""
        self._check_prompt(prompt)
        cache = self.cache
        req = Req(rid, list(prompt))
        loaded_before = cache.load_back_stats.loaded_tokens
        self._sync()
        start = time.perf_counter()
        res = cache.match_prefix(req.origin_input_ids[:-1], req=req)
        prefix, node = res.device_indices, res.last_device_node
        if res.host_hit_length > 0:
            loaded, node = cache.init_load_back(node, res.host_hit_length, req)
            prefix = torch.cat([prefix, loaded])
        cache.finish_loads()
        self._sync()
        seconds = time.perf_counter() - start
        cache.inc_lock_ref(node)
        req.last_node, req.prefix_indices, req.cache_protected_len = node, prefix, prefix.numel()
        req.req_to_token = prefix
        return Prefill(req, prefix, cache.load_back_stats.loaded_tokens - loaded_before, seconds)

    def fresh(self, rid: str, prompt: Sequence[int]) -> Prefill:
        """Reuse nothing: ``prompt`` is computed from scratch (a miss, or an engine without a cache)."""
        self._check_prompt(prompt)
        none = torch.empty(0, dtype=torch.int64, device=self.device)  # slots live on the KV's device
        req = Req(rid, list(prompt), req_to_token=none, prefix_indices=none, last_node=self.cache.root_node)
        return Prefill(req, none, 0, 0.0)

    def prefill(self, state: Prefill, logits_to_keep: int = 1) -> torch.Tensor:
        """Compute the prompt past the reused prefix; returns the logits of its last
        ``logits_to_keep`` tokens (0: all of them), ``[n, vocab]``."""
        if state.kv is not None:
            raise ValueError(f"request {state.req.rid}: already prefilled")
        state.kv = self.rebuild_kv(state.prefix)
        return self._compute(state, state.req.origin_input_ids[state.reused_tokens:], logits_to_keep)

    def extend(self, state: Prefill, tokens: Sequence[int], logits_to_keep: int = 1) -> torch.Tensor:
        """Compute the KV of ``tokens`` (the request's output, fed back) after everything so far."""
        if state.kv is None:
            raise ValueError(f"request {state.req.rid}: extend needs a prefill first")
        if not tokens:
            raise ValueError(f"request {state.req.rid}: tokens must not be empty")
        state.req.output_ids = state.req.output_ids + list(tokens)
        return self._compute(state, list(tokens), logits_to_keep)

    def finish(self, state: Prefill) -> None:
        """Hand the request's KV to the tree; the cache stores its full chunks."""
        state.kv = None
        self.cache.cache_finished_req(state.req)

    def release(self, state: Prefill) -> None:
        """Drop the request without keeping its KV (its own slots go back, nothing is stored)."""
        state.kv = None
        self.cache.cache_finished_req(state.req, is_insert=False)

    def flush_device_tree(self) -> None:
        """Evict everything unlocked (what memory pressure between turns would do)."""
        self.cache.evict(self.cache.token_to_kv_pool_allocator.size)

    # ----- the model's side -----

    def rebuild_kv(self, prefix: torch.Tensor) -> Any:
        """A ``DynamicCache`` holding the KV of ``prefix``'s slots, in order (batch of one)."""
        if prefix.numel() == 0:
            return self._dynamic_cache(config=self.model.config)
        # [n, H, D] rows -> the model's [1, H, n, D]; the cache copies them into its own tensors.
        layers = [(k[prefix].transpose(0, 1).unsqueeze(0), v[prefix].transpose(0, 1).unsqueeze(0))
                  for k, v in self.buffers.planes]
        return self._dynamic_cache(ddp_cache_data=layers, config=self.model.config)

    def forward(self, tokens: Sequence[int], kv: Any, logits_to_keep: int = 1) -> torch.Tensor:
        """The model on ``tokens`` after the KV in ``kv`` (which grows by them); logits ``[1, n, vocab]``."""
        ids = torch.tensor([list(tokens)], dtype=torch.int64, device=self.device)
        return model_forward(self.model, ids, kv, logits_to_keep)

    # ----- internals -----

    def _compute(self, state: Prefill, tokens: list[int], logits_to_keep: int) -> torch.Tensor:
        req = state.req
        start = req.kv_len
        slots = alloc_slots(self.cache, len(tokens))
        try:
            logits = self.forward(tokens, state.kv, logits_to_keep)
            with torch.no_grad():
                for layer, (k, v) in zip(state.kv.layers, self.buffers.planes):
                    k[slots] = layer.keys[0, :, start:].transpose(0, 1)
                    v[slots] = layer.values[0, :, start:].transpose(0, 1)
        except BaseException:
            self.cache.token_to_kv_pool_allocator.free(slots)
            raise
        req.req_to_token = torch.cat([req.req_to_token, slots])
        return logits[0]

    def _check_prompt(self, prompt: Sequence[int]) -> None:
        vocab = self.model.config.vocab_size
        if len(prompt) == 0:
            raise ValueError("prompt must hold at least one token, got none")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token ids must be in [0, {vocab}), got {bad[:5]}")

    def _sync(self) -> None:
        # This stream only: another thread's work (a decode batch) must not be waited for.
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


class KVDigests:
    """What this process computed, chunk by chunk: a digest of each full chunk's KV bytes (all
    layers), keyed by the chunk's token prefix. A chunk may have several versions (recomputing
    the same tokens in a forward of another length may round differently); KV reused from the
    caches must match one of them."""

    def __init__(self, chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self._versions: dict[bytes, set[bytes]] = {}

    def record(self, buffers: KVBuffers, token_ids: Sequence[int], slots: torch.Tensor, computed_from: int) -> None:
        """Record the full chunks of ``slots`` in ``buffers`` (the KV of ``token_ids[:len(slots)]``)
        that hold a token at or past ``computed_from``."""
        for key, rows in self._chunks(token_ids, slots):
            if rows[-1] >= computed_from:
                self._versions.setdefault(key, set()).add(_digest(buffers, slots[rows[0]:rows[-1] + 1]))

    def mismatched_tokens(self, buffers: KVBuffers, token_ids: Sequence[int], slots: torch.Tensor) -> int:
        """Tokens of the full chunks of ``slots`` in ``buffers`` whose KV is no version this process computed."""
        bad = 0
        for key, rows in self._chunks(token_ids, slots):
            if _digest(buffers, slots[rows[0]:rows[-1] + 1]) not in self._versions.get(key, ()):
                bad += len(rows)
        return bad

    def _chunks(self, token_ids: Sequence[int], slots: torch.Tensor) -> list[tuple[bytes, range]]:
        n = slots.numel() // self.chunk_size * self.chunk_size
        out, key = [], b""
        for start in range(0, n, self.chunk_size):
            chunk = token_ids[start:start + self.chunk_size]
            key = hashlib.sha256(key + torch.tensor(list(chunk), dtype=torch.int64).numpy().tobytes()).digest()
            out.append((key, range(start, start + self.chunk_size)))
        return out



def _digest(buffers: KVBuffers, slots: torch.Tensor) -> bytes:
    h = hashlib.sha256()
    for layer in range(buffers.num_layers):
        for plane in range(len(buffers.geometry.plane_shapes)):
            h.update(buffers.plane_rows(layer, plane)[slots].cpu().numpy().tobytes())
    return h.digest()


@dataclass
class HFChatEngine:
    """The demo's serving loop on a real model: every request is served through the caches and,
    for comparison, computed again from scratch; reused KV is checked against ``digests``."""

    engine: HFEngine
    digests: KVDigests

    @property
    def cache(self) -> LMCRadixCache:
        return self.engine.cache

    def serve(self, rid: str, prompt: list[int], output: list[int], stats: PhaseStats) -> None:
        engine = self.engine
        state = engine.match(rid, prompt)
        served_s = state.load_seconds + self._time_prefill(state)
        stats.requests += 1
        stats.prompt_tokens += len(prompt)
        stats.reused_tokens += state.reused_tokens
        stats.loaded_tokens += state.loaded_tokens
        if state.loaded_tokens:
            stats.load_seconds += state.load_seconds
        stats.mismatched_tokens += self.digests.mismatched_tokens(engine.buffers, prompt, state.prefix)
        stats.ttft_seconds += served_s
        # KV exists for every token but the last output (it has not been fed back yet).
        if len(output) > 1:
            engine.extend(state, output[:-1])
        self.digests.record(engine.buffers, state.req.fill_ids, state.req.req_to_token, computed_from=state.reused_tokens)
        engine.finish(state)

        recompute = engine.fresh(f"{rid}-recompute", prompt)
        stats.recompute_ttft_seconds += self._time_prefill(recompute)
        engine.release(recompute)

    def flush_device_tree(self) -> None:
        self.engine.flush_device_tree()

    def _time_prefill(self, state: Prefill) -> float:
        """Prefill until the first output token is known on the host."""
        start = time.perf_counter()
        int(self.engine.prefill(state)[-1].argmax())
        return time.perf_counter() - start
