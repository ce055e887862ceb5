import random

import pytest
import torch

from lmc_transfer.radix.allocator import TokenSlotAllocator


def slots(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_alloc_hands_out_slots_in_page_order_and_counts():
    alloc = TokenSlotAllocator(8)
    first = alloc.alloc(3)
    assert first.dtype == torch.int64
    assert first.tolist() == [0, 1, 2]
    assert alloc.available_size() == 5
    assert alloc.alloc(5).tolist() == [3, 4, 5, 6, 7]
    assert alloc.available_size() == 0
    assert alloc.alloc(1) is None
    assert alloc.alloc(0).tolist() == []


def test_alloc_returns_none_without_taking_anything():
    alloc = TokenSlotAllocator(8, page_size=2)
    assert alloc.alloc(6).tolist() == [0, 1, 2, 3, 4, 5]
    assert alloc.alloc(3) is None
    assert alloc.available_size() == 2
    assert alloc.alloc(2).tolist() == [6, 7]


def test_freed_pages_are_reused_after_never_used_ones():
    alloc = TokenSlotAllocator(6)
    a = alloc.alloc(2)
    alloc.free(a[:1])
    assert alloc.alloc(5).tolist() == [2, 3, 4, 5, 0]


def test_paged_alloc_takes_whole_pages_and_returns_first_slots():
    alloc = TokenSlotAllocator(16, page_size=4)
    got = alloc.alloc(6)
    assert got.tolist() == [0, 1, 2, 3, 4, 5]
    # Pages 0 and 1 are taken whole: slots 6 and 7 are not free.
    assert alloc.available_size() == 8
    assert alloc.allocated_pages() == {0, 1}
    assert alloc.is_allocated(7) and not alloc.is_allocated(8)


def test_paged_free_releases_every_touched_page_once():
    alloc = TokenSlotAllocator(16, page_size=4)
    alloc.alloc(10)
    # A partial last page is freed through the slots actually used.
    alloc.free(slots(8, 9))
    assert alloc.allocated_pages() == {0, 1}
    # Several slots of one page in one call free it once.
    alloc.free(slots(0, 1, 2, 3, 5))
    assert alloc.allocated_pages() == set()
    assert alloc.available_size() == 16


def test_double_free_names_the_slot_and_frees_nothing():
    alloc = TokenSlotAllocator(16, page_size=4)
    alloc.alloc(8)
    alloc.free(slots(0))
    with pytest.raises(ValueError, match=r"slot 2\b.*double free"):
        alloc.free(slots(5, 2))
    # All-or-nothing: page 1 (slot 5) is still allocated.
    assert alloc.allocated_pages() == {1}
    assert alloc.available_size() == 12


@pytest.mark.parametrize("bad", [16, -1, 1000])
def test_out_of_range_free_names_the_slot(bad):
    alloc = TokenSlotAllocator(16)
    alloc.alloc(16)
    with pytest.raises(ValueError, match=rf"slot {bad}\b"):
        alloc.free(slots(3, bad))
    assert alloc.available_size() == 0


def test_free_rejects_non_tensors_and_float_tensors():
    alloc = TokenSlotAllocator(4)
    alloc.alloc(4)
    with pytest.raises(TypeError, match="free_index"):
        alloc.free([0, 1])
    with pytest.raises(TypeError, match="float32"):
        alloc.free(torch.tensor([0.0]))
    assert alloc.available_size() == 0


def test_free_of_empty_tensor_changes_nothing():
    alloc = TokenSlotAllocator(4)
    alloc.alloc(2)
    alloc.free(torch.empty(0, dtype=torch.int64))
    assert alloc.allocated_pages() == {0, 1}


def test_alloc_extend_fills_the_last_page_before_taking_new_pages():
    alloc = TokenSlotAllocator(16, page_size=4)
    first = alloc.alloc(6)
    ext = alloc.alloc_extend(int(first[-1]), 5)
    assert ext.tolist() == [6, 7, 8, 9, 10]
    assert alloc.allocated_pages() == {0, 1, 2}
    # A full last page: nothing to continue, fresh page only.
    assert alloc.alloc_extend(3, 2).tolist() == [12, 13]
    assert alloc.available_size() == 0
    # Room left in slot 13's page, but not for 3 tokens: None.
    assert alloc.alloc_extend(13, 3) is None
    assert alloc.alloc_extend(13, 2).tolist() == [14, 15]


def test_alloc_extend_without_previous_slot_is_alloc():
    alloc = TokenSlotAllocator(8, page_size=4)
    assert alloc.alloc_extend(-1, 2).tolist() == [0, 1]


def test_alloc_extend_rejects_a_free_last_slot():
    alloc = TokenSlotAllocator(8, page_size=4)
    with pytest.raises(ValueError, match="last_slot 5 is not allocated"):
        alloc.alloc_extend(5, 1)
    with pytest.raises(ValueError, match="got 8"):
        alloc.alloc_extend(8, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 0}, "size must be a positive int, got 0"),
        ({"size": 10, "page_size": 0}, "page_size must be a positive int, got 0"),
        ({"size": 10, "page_size": 4}, "multiple of page_size=4, got size=10"),
    ],
)
def test_constructor_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenSlotAllocator(**kwargs)


def test_alloc_rejects_negative_and_non_int_counts():
    alloc = TokenSlotAllocator(4)
    with pytest.raises(ValueError, match="need_size must be a non-negative int, got -1"):
        alloc.alloc(-1)
    with pytest.raises(TypeError, match="need_size must be an int, got float"):
        alloc.alloc(1.5)
    assert alloc.available_size() == 4


def test_clear_frees_everything():
    alloc = TokenSlotAllocator(8, page_size=2)
    alloc.alloc(5)
    alloc.clear()
    assert alloc.available_size() == 8
    assert alloc.alloc(8).tolist() == list(range(8))


def test_get_kvcache_returns_what_was_given():
    marker = object()
    assert TokenSlotAllocator(4, kvcache=marker).get_kvcache() is marker


@pytest.mark.parametrize("page_size", [1, 4])
def test_random_alloc_free_matches_a_page_model(page_size):
    rng = random.Random(1234 + page_size)
    gen = torch.Generator().manual_seed(99)
    size = 64 * page_size
    alloc = TokenSlotAllocator(size, page_size=page_size)
    held: list[torch.Tensor] = []
    model_pages: set[int] = set()
    for _ in range(3000):
        if held and rng.random() < 0.45:
            chunk = held.pop(rng.randrange(len(held)))
            alloc.free(chunk[torch.randperm(chunk.numel(), generator=gen)])
            model_pages -= {int(s) // page_size for s in chunk}
        else:
            need = rng.randint(0, 3 * page_size + 1)
            got = alloc.alloc(need)
            pages_needed = -(-need // page_size)
            if pages_needed > alloc.num_pages - len(model_pages):
                assert got is None
                continue
            assert got is not None and got.numel() == need
            got_pages = {int(s) // page_size for s in got}
            assert len(got_pages) == pages_needed
            assert not got_pages & model_pages
            # Page offsets follow token order inside each page.
            assert [int(s) % page_size for s in got] == [i % page_size for i in range(need)]
            model_pages |= got_pages
            if need:
                held.append(got)
        assert alloc.allocated_pages() == model_pages
        assert alloc.available_size() == size - len(model_pages) * page_size
    for chunk in held:
        alloc.free(chunk)
    assert alloc.available_size() == size
