"""The demo's toy engine: a "model" that writes checkable KV bytes, and a scheduler loop.

The toy model writes deterministic bytes per (position, token id, layer, plane) into the
KV buffers, so every byte that comes back from the cache can be checked: a wrong slot or
a stale chunk shows up as a mismatch. ``ToyEngine`` drives an ``LMCRadixCache`` the way
SGLang's scheduler does (match, load back, compute the rest, cache the finished request).
Nothing in the library imports this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from lmc_transfer.kernels import KVBuffers
from lmc_transfer.radix.lmc_radix_cache import LMCRadixCache
from lmc_transfer.radix.request import Req
_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_SEED_MULTS = tuple(_signed(m) for m in (0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3))


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on wrapping int64 arithmetic."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


class ToyModel:
    """Writes and checks deterministic KV bytes per (position, token id, layer, plane)."""

    def __init__(self, buffers: KVBuffers) -> None:
        for plane, row in enumerate(buffers.geometry.plane_row_bytes):
            if row % 8:
                raise ValueError(f"buffers: plane {plane} rows must be a multiple of 8 bytes, got {row}")
        self.buffers = buffers

    def rows(self, layer: int, plane: int, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The ``[n, row_bytes]`` uint8 rows token ``tokens[i]`` at ``positions[i]`` has."""
        words = self.buffers.geometry.plane_row_bytes[plane] // 8
        a, b, c, d = _SEED_MULTS
        seed = positions.to(torch.int64) * a + tokens.to(torch.int64) * b + _signed(layer * c + plane * d)
        lanes = torch.arange(1, words + 1, dtype=torch.int64, device=seed.device) * _GOLDEN
        return _mix(seed.unsqueeze(1) + lanes).view(torch.uint8)

    def forward(self, token_ids: Sequence[int], start: int, slots: torch.Tensor) -> None:
        """"Compute" the KV of tokens ``start .. start + len(slots)`` into ``slots``."""
        positions, tokens = self._inputs(token_ids, start, slots.numel())
        for layer in range(self.buffers.num_layers):
            for plane in range(len(self.buffers.geometry.plane_shapes)):
                self.buffers.plane_rows(layer, plane)[slots] = self.rows(layer, plane, positions, tokens)

    def mismatched_tokens(self, token_ids: Sequence[int], slots: torch.Tensor) -> int:
        """How many of tokens ``0 .. len(slots)`` do not hold exactly their KV at ``slots``."""
        positions, tokens = self._inputs(token_ids, 0, slots.numel())
        bad = torch.zeros(slots.numel(), dtype=torch.bool, device=slots.device)
        for layer in range(self.buffers.num_layers):
            for plane in range(len(self.buffers.geometry.plane_shapes)):
                have = self.buffers.plane_rows(layer, plane)[slots]
                bad |= (have != self.rows(layer, plane, positions, tokens)).any(dim=1)
        return int(bad.sum())

    def _inputs(self, token_ids: Sequence[int], start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.buffers.device
        positions = torch.arange(start, start + n, dtype=torch.int64, device=device)
        tokens = torch.tensor(list(token_ids[start : start + n]), dtype=torch.int64, device=device)
        return positions, tokens


@dataclass(frozen=True)
class ToyShape:
    """A token_slot KV pool: per layer K and V ``[num_slots, heads, head_dim]``."""

    name: str
    layers: int
    heads: int
    head_dim: int
    num_slots: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def token_bytes(self) -> int:
        return self.layers * 2 * self.heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def buffers(self, device: torch.device, seed: int) -> KVBuffers:
        """Fresh buffers full of random bytes (a new engine's uninitialised memory), drawn on
        ``device`` itself (GBs of them for a real model's pool)."""
        device = torch.device(device)
        g = torch.Generator(device=device).manual_seed(seed)
        row = self.heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

        def plane() -> torch.Tensor:
            raw = torch.randint(0, 256, (self.num_slots, row), dtype=torch.uint8, generator=g, device=device)
            return raw.view(self.dtype).reshape(self.num_slots, self.heads, self.head_dim)

        return KVBuffers.token_slot([plane() for _ in range(self.layers)], [plane() for _ in range(self.layers)])


CPU_SHAPE = ToyShape("toy Llama-like (4 layers, 2 KV heads x 64, bf16)", 4, 2, 64, num_slots=4096)
GPU_SHAPE = ToyShape("Llama-3-8B (32 layers, 8 KV heads x 128, bf16)", 32, 8, 128, num_slots=16384)


@dataclass
class PhaseStats:
    requests: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # served from the device tree or the host cache
    loaded_tokens: int = 0  # came back from the host cache
    load_seconds: float = 0.0
    mismatched_tokens: int = 0
    # Time to first token (prefill to the first output's logits); engines with a real model only.
    ttft_seconds: float = 0.0  # as served, reusing what the caches hold
    recompute_ttft_seconds: float = 0.0  # the same prompts computed from scratch

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def alloc_slots(cache: LMCRadixCache, need: int) -> torch.Tensor:
    """``need`` free KV slots, evicting unlocked tree nodes first if too few are free."""
    allocator = cache.token_to_kv_pool_allocator
    short = need - allocator.available_size()
    if short > 0:
        cache.evict(short)
    slots = allocator.alloc(need)
    if slots is None:
        raise RuntimeError(f"KV pool too small: {need} slots needed, {allocator.available_size()} free")
    return slots


class ToyEngine:
    """Serves requests the way SGLang's scheduler drives a radix cache."""

    def __init__(self, cache: LMCRadixCache, model: ToyModel) -> None:
        self.cache = cache
        self.model = model
        self.allocator = cache.token_to_kv_pool_allocator
        self._sync = torch.cuda.synchronize if model.buffers.device.type == "cuda" else (lambda: None)

    def serve(self, rid: str, prompt: list[int], output: list[int], stats: PhaseStats) -> None:
        cache = self.cache
        req = Req(rid, list(prompt))
        loads = cache.load_back_stats
        tokens_before, seconds_before = loads.loaded_tokens, loads.seconds
        # The last prompt token is always computed: it yields the first output's logits.
        res = cache.match_prefix(prompt[:-1], req=req)
        prefix, node = res.device_indices, res.last_device_node
        if res.host_hit_length > 0:
            loaded, node = cache.init_load_back(node, res.host_hit_length, req)
            prefix = torch.cat([prefix, loaded])
        # Asynchronous (CUDA) loads are only issued above; their landing counts too.
        start = time.perf_counter()
        cache.finish_loads()
        self._sync()
        load_seconds = loads.seconds - seconds_before + time.perf_counter() - start
        cache.inc_lock_ref(node)
        req.last_node, req.prefix_indices, req.cache_protected_len = node, prefix, prefix.numel()

        stats.requests += 1
        stats.prompt_tokens += len(prompt)
        stats.reused_tokens += prefix.numel()
        newly_loaded = loads.loaded_tokens - tokens_before
        stats.loaded_tokens += newly_loaded
        if newly_loaded:
            stats.load_seconds += load_seconds
        stats.mismatched_tokens += self.model.mismatched_tokens(prompt, prefix)

        # KV exists for every token but the last output (it has not been fed back yet).
        tokens = list(prompt) + list(output)
        need = len(tokens) - 1 - prefix.numel()
        slots = alloc_slots(self.cache, need)
        self.model.forward(tokens, prefix.numel(), slots)
        req.output_ids = list(output)
        req.req_to_token = torch.cat([prefix, slots])
        cache.cache_finished_req(req)

    def flush_device_tree(self) -> None:
        """Evict everything unlocked (what memory pressure between turns would do)."""
        self.cache.evict(self.allocator.size)


@dataclass
class Conversation:
    """A chat: a shared system prompt, then alternating user and assistant turns."""

    cid: int
    history: list[int] = field(default_factory=list)


class Workload:
    def __init__(self, conversations: int, system_tokens: int, user_tokens: int, output_tokens: int, seed: int = 0,
                 vocab_size: int = 32000):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (token 0 is never drawn), got {vocab_size}")
        self._g = torch.Generator().manual_seed(seed)
        self._vocab_size = vocab_size
        system = self._tokens(system_tokens)
        self.conversations = [Conversation(c, list(system)) for c in range(conversations)]
        self.user_tokens, self.output_tokens = user_tokens, output_tokens

    def _tokens(self, n: int) -> list[int]:
        return torch.randint(1, self._vocab_size, (n,), generator=self._g).tolist()

    def turns(self) -> Iterator[tuple[Conversation, list[int], list[int]]]:
        """One turn of every conversation: (conversation, prompt, output); history grows."""
        for conv in self.conversations:
            prompt = conv.history + self._tokens(self.user_tokens)
            output = self._tokens(self.output_tokens)
            conv.history = prompt + output
            yield conv, prompt, output
