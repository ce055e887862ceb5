"""Radix prefix caches: ``RadixCache`` (SGLang semantics) and ``LMCRadixCache`` (backed by lmc-transfer)."""

from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.radix.policy import HostHit, LMCPolicy, LoadBack, LoadBackTree, LoadOutcome
from lmc_transfer.radix.lmc_radix_cache import LMCacheMode, LMCRadixCache
from lmc_transfer.radix.radix_cache import MatchResult, RadixCache, TreeNode
from lmc_transfer.radix.request import Req

__all__ = [
    "HostHit",
    "LMCPolicy",
    "LMCRadixCache",
    "LMCacheMode",
    "LoadBack",
    "LoadBackTree",
    "LoadOutcome",
    "MatchResult",
    "RadixCache",
    "Req",
    "TokenSlotAllocator",
    "TreeNode",
]
