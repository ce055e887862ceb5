"""SGLang's own pools and process-wide config, built the same way for every tested release.

Import only after ``load_sglang`` made ``sglang.srt.mem_cache`` importable.
"""

from __future__ import annotations

import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lmc_transfer.kernels import KVBuffers
from tests.kv_model import DIM, HEADS, LAYERS, write_kv

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

NUM_SLOTS = 256


@dataclass
class KVPools:
    pool: Any  # MHATokenToKVPool
    allocator: Any  # TokenToKVPoolAllocator
    req_pool: Any  # ReqToTokenPool

    @property
    def buffers(self) -> KVBuffers:
        """Our view of the KV pool: writes through it land in the pool."""
        return KVBuffers.token_slot(list(self.pool.k_buffer), list(self.pool.v_buffer))

    def slots_accounted(self, tree_size: int) -> bool:
        """Idle engine: every slot is either free or owned by the tree."""
        return self.allocator.available_size() + tree_size == NUM_SLOTS

    def compute_rest(self, cache: Any, req: Any, prefix: torch.Tensor, tokens: list[int], output_ids: list[int]) -> None:
        """The forward pass past ``prefix`` as SGLang leaves a finished request: slots for every token
        but the last sampled one (evicting from ``cache`` when short), the request's token row, their KV."""
        kv_len = len(tokens) - 1  # the last sampled token has no KV yet
        need = kv_len - prefix.numel()
        if self.allocator.available_size() < need:
            cache.evict(EvictParams(num_tokens=need - self.allocator.available_size()))
        new = self.allocator.alloc(need)
        assert new is not None
        self.req_pool.alloc([req])
        row = torch.cat([prefix, new])
        self.req_pool.write((req.kv.req_pool_idx, slice(0, kv_len)), row.to(torch.int32))
        write_kv(self.buffers, tokens[:kv_len], prefix.numel(), new)
        req.kv.kv_allocated_len = req.kv.kv_committed_len = kv_len
        req.output_ids = array("q", output_ids)


class Engine:
    """What the tiers' engines share: SGLang pools (``self.pools``) under a cache (``self.cache``)."""

    pools: KVPools
    cache: Any

    def evict_all(self) -> None:
        self.cache.evict(EvictParams(num_tokens=10**9))
        assert self.cache.total_size() == 0

    def slots_accounted(self) -> bool:
        return self.pools.slots_accounted(self.cache.total_size())


def make_pools(seed: int) -> KVPools:
    """SGLang's CPU pools; the KV starts as random bytes, so a load that writes nothing cannot match by luck."""
    pool = MHATokenToKVPool(
        size=NUM_SLOTS, page_size=1, dtype=torch.float16, head_num=HEADS, head_dim=DIM,
        layer_num=LAYERS, device="cpu", enable_memory_saver=False,
    )
    g = torch.Generator().manual_seed(seed)
    for buffers in (pool.k_buffer, pool.v_buffer):
        for b in buffers:
            raw = b.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))
    allocator = TokenToKVPoolAllocator(NUM_SLOTS, torch.float16, "cpu", pool, need_sort=False)
    req_pool = ReqToTokenPool(size=4, max_context_len=512, device="cpu", enable_memory_saver=False)
    return KVPools(pool, allocator, req_pool)


def publish_runtime(model_dir: Path, **server_args: Any) -> Any:
    """Publish SGLang's process-wide config (``runtime_context.publish``), which request
    handling reads, for a tiny local model config: no network, no weights."""
    from transformers import LlamaConfig

    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    LlamaConfig(
        architectures=["LlamaForCausalLM"], hidden_size=HEADS * DIM, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=DIM, vocab_size=32000,
        max_position_embeddings=512,
    ).save_pretrained(model_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        args = ServerArgs(model_path=str(model_dir), skip_tokenizer_init=True, device="cpu", **server_args)
        runtime_context.publish(args, role="scheduler")
    return args
