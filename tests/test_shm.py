"""The shared-memory segment reserves its memory when created, and refuses sizes /dev/shm cannot hold."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lmc_transfer.daemon.shm import SegmentSpaceError, SharedSegment, segment_bytes, segment_exists, shm_free_bytes


def test_created_segment_has_all_its_memory_reserved():
    num_slabs, slab_bytes = 3, 1 << 20
    seg = SharedSegment.create(num_slabs, slab_bytes)
    try:
        st = os.stat(f"/dev/shm{seg.name}")
        size = segment_bytes(num_slabs, slab_bytes)
        assert st.st_size == size
        assert st.st_blocks * 512 >= size, "the pages are allocated now, not at the first touch (SIGBUS)"
        assert np.array_equal(seg.data[-4096:], np.zeros(4096, dtype=np.uint8))
    finally:
        seg.close()


def test_a_segment_larger_than_dev_shm_is_refused_before_anything_is_allocated():
    free = shm_free_bytes()
    slab_bytes = 1 << 30
    num_slabs = free // slab_bytes + 2
    name = f"/lmct-{os.getpid()}-too-big"
    with pytest.raises(SegmentSpaceError) as info:
        SharedSegment.create(num_slabs, slab_bytes, name=name)
    message = str(info.value)
    assert f"needs {segment_bytes(num_slabs, slab_bytes)} bytes" in message
    assert "/dev/shm has only" in message and "--shm-size" in message and "max_local_cpu_size" in message
    assert "\n" not in message
    assert not segment_exists(name)
