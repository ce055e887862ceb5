"""Token-slot allocator: hands out KV-pool slot indices, page by page.

It plays the role of SGLang's ``token_to_kv_pool_allocator``: the radix cache
and the engine ask it for slot indices (one per token) and give them back.
Bookkeeping is per page (``page_size`` consecutive slots, page ``p`` owning
slots ``p * page_size .. p * page_size + page_size - 1``): ``alloc`` takes
whole pages, and ``free`` gives back every page that any of its slots touches,
as SGLang's paged allocator does. That lets an engine free a request's partly
used last page by freeing just the slots it used.
"""

from __future__ import annotations

import operator
from collections import deque
from typing import Any

import numpy as np
import torch


class TokenSlotAllocator:
    """Slots ``0 .. size - 1`` of a token-indexed KV pool, allocated by whole pages."""

    def __init__(
        self,
        size: int,
        page_size: int = 1,
        device: torch.device | str = "cpu",
        kvcache: Any = None,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if size % page_size != 0:
            raise ValueError(
                f"size must be a multiple of page_size={page_size}, got size={size}"
            )
        self.size = size
        self.page_size = page_size
        self.device = torch.device(device)
        self.num_pages = size // page_size
        # The KV buffers these slots index (e.g. a KVBuffers); the allocator never
        # reads them, it only carries them to the cache adapters that move KV.
        self._kvcache = kvcache
        self._page_free = np.ones(self.num_pages, dtype=bool)
        self._free_pages: deque[int] = deque(range(self.num_pages))

    def get_kvcache(self) -> Any:
        return self._kvcache

    def available_size(self) -> int:
        """Free slots (always a multiple of ``page_size``)."""
        return len(self._free_pages) * self.page_size

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """``need_size`` slot indices (int64, on ``device``), or None if too few are free.

        Takes ``ceil(need_size / page_size)`` fresh pages and returns their first
        ``need_size`` slots in order, so token ``i`` of the result sits at offset
        ``i % page_size`` of its page; the unused rest of the last page stays
        allocated until the page is freed.
        """
        need_size = self._check_count("need_size", need_size)
        num_pages = -(-need_size // self.page_size)
        if num_pages > len(self._free_pages):
            return None
        pages = [self._free_pages.popleft() for _ in range(num_pages)]
        self._page_free[pages] = False
        slots = self._page_slots(pages)[:need_size]
        return slots.to(self.device)

    def alloc_extend(self, last_slot: int, need_size: int) -> torch.Tensor | None:
        """``need_size`` slots that continue a sequence whose last slot is ``last_slot``.

        The rest of ``last_slot``'s page is used first (it is already allocated to
        the caller), then fresh pages; a paged attention kernel needs token
        positions and page offsets to agree. ``last_slot < 0`` means "no
        previous slot" and behaves like ``alloc``. None if too few are free.
        """
        need_size = self._check_count("need_size", need_size)
        last_slot = operator.index(last_slot)
        if last_slot < 0:
            return self.alloc(need_size)
        self._check_slot(last_slot)
        if self._page_free[last_slot // self.page_size]:
            raise ValueError(f"last_slot {last_slot} is not allocated (its page is free)")
        page_end = (last_slot // self.page_size + 1) * self.page_size
        tail = torch.arange(
            last_slot + 1, min(page_end, last_slot + 1 + need_size), dtype=torch.int64
        )
        fresh = self.alloc(need_size - tail.numel())
        if fresh is None:
            return None
        return torch.cat([tail.to(self.device), fresh])

    def free(self, free_index: torch.Tensor) -> None:
        """Give back every page that a slot in ``free_index`` belongs to.

        All-or-nothing: an out-of-range slot, or a slot whose page is already
        free (a double free), raises ValueError naming the slot and frees nothing.
        """
        if not isinstance(free_index, torch.Tensor):
            raise TypeError(
                f"free_index must be a torch.Tensor of slot indices, got {type(free_index).__name__}"
            )
        if free_index.is_floating_point() or free_index.is_complex() or free_index.dtype == torch.bool:
            raise TypeError(f"free_index must hold integer slots, got dtype {free_index.dtype}")
        if free_index.numel() == 0:
            return
        slots = free_index.reshape(-1).to("cpu", torch.int64).numpy()
        out_of_range = (slots < 0) | (slots >= self.size)
        if out_of_range.any():
            bad = int(slots[out_of_range][0])
            raise ValueError(f"cannot free slot {bad}: slots are 0..{self.size - 1}")
        pages, first = np.unique(slots // self.page_size, return_index=True)
        already_free = self._page_free[pages]
        if already_free.any():
            bad = int(slots[first[already_free][0]])
            raise ValueError(f"cannot free slot {bad}: its page is already free (double free)")
        self._page_free[pages] = True
        self._free_pages.extend(int(p) for p in pages)

    def clear(self) -> None:
        """Everything free again (SGLang's ``clear``; used on a cache flush)."""
        self._page_free[:] = True
        self._free_pages = deque(range(self.num_pages))

    def is_allocated(self, slot: int) -> bool:
        self._check_slot(int(slot))
        return not bool(self._page_free[int(slot) // self.page_size])

    def allocated_pages(self) -> set[int]:
        """Pages currently handed out (for accounting checks)."""
        return {int(p) for p in np.flatnonzero(~self._page_free)}

    def _page_slots(self, pages: list[int]) -> torch.Tensor:
        base = torch.tensor(pages, dtype=torch.int64).unsqueeze(1) * self.page_size
        return (base + torch.arange(self.page_size, dtype=torch.int64)).reshape(-1)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.size:
            raise ValueError(f"slot must be in 0..{self.size - 1}, got {slot}")

    @staticmethod
    def _check_count(name: str, value: int) -> int:
        try:
            count = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
        if isinstance(value, bool) or count < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        return count
