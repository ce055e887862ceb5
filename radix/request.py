"""The request state the radix cache reads and updates (a slim SGLang ``Req``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmc_transfer.radix.radix_cache import TreeNode


def _empty_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


@dataclass(eq=False)
class Req:
    """One request as the cache sees it.

    ``req_to_token[i]`` is the KV slot of token ``i`` of ``origin_input_ids +
    output_ids``; it covers exactly the tokens whose KV has been computed (in
    SGLang the last sampled token has none yet), so ``fill_ids`` is that prefix
    of the token ids. ``last_node`` is the tree node the request holds a lock
    ref on, and the first ``cache_protected_len`` slots belong to the tree, not
    to the request (they are never freed through the request).
    """

    rid: str
    origin_input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    req_to_token: torch.Tensor = field(default_factory=_empty_slots)
    prefix_indices: torch.Tensor = field(default_factory=_empty_slots)
    last_node: TreeNode | None = None
    cache_protected_len: int = 0

    def __post_init__(self) -> None:
        for name in ("req_to_token", "prefix_indices"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.dim() != 1:
                raise TypeError(
                    f"Req.{name} must be a 1-D torch.int64 tensor, got "
                    f"{getattr(value, 'dtype', type(value).__name__)} "
                    f"with shape {tuple(getattr(value, 'shape', ()))}"
                )

    @property
    def all_token_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def kv_len(self) -> int:
        return int(self.req_to_token.numel())

    @property
    def fill_ids(self) -> list[int]:
        """The token ids whose KV slots are in ``req_to_token``."""
        tokens = self.all_token_ids
        if self.kv_len > len(tokens):
            raise ValueError(
                f"request {self.rid}: req_to_token has {self.kv_len} slots but only "
                f"{len(tokens)} token ids exist"
            )
        return tokens[: self.kv_len]
