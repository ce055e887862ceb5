"""The CacheStore contract both stores share (store.base): the same slot rules, the same stats
for skipped keys, the same expiry margin; IP against its in-process pool, MP against a real
daemon subprocess. Also: torch-free types for the daemon, the IP remote fill's time bound."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest
import torch

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.store.base import COPY_MARGIN_S, CacheStore
from lmc_transfer.store.ip import IPStore
from lmc_transfer.store.mp_client import MPStore
from lmc_transfer.tiers.format import HEADER_BYTES, SlabFormat, Verdict
from tests.conftest_mp import (  # noqa: F401  (fixtures)
    CHUNK,
    SLAB_BYTES,
    daemons,
    kv_bytes,
    make_buffers,
    prompt_keys,
    start_daemon,
    tokens_for,
    workdir,
    write_config,
)

pytestmark = pytest.mark.timeout(120)

NUM_SLABS = 4
TTL_S = 10.0


@pytest.fixture(params=["ip", "mp"])
def store(request, workdir: Path, daemons) -> Iterator[CacheStore]:
    """A 4-slab store over ``make_buffers(7)`` with a 10 s lease TTL, of either mode."""
    size = {"max_local_cpu_size": (NUM_SLABS + 0.5) * SLAB_BYTES / 1024**3, "lease_ttl_s": TTL_S}
    buffers = make_buffers(7)
    if request.param == "ip":
        made: CacheStore = IPStore(LMCTransferConfig.from_dict({"chunk_size": CHUNK, **size}), buffers)
    else:
        made = MPStore(start_daemon(daemons, write_config(workdir, **size)).config, buffers)
    try:
        yield made
    finally:
        made.close()


def keys_of(store: CacheStore, seed: int, chunks: int) -> list[bytes]:
    return prompt_keys(store.buffers, tokens_for(seed, chunks))


def test_store_base_imports_no_torch():
    code = "import sys, lmc_transfer.store.base; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_int32_slots_and_extra_entries_round_trip_byte_exact(store: CacheStore):
    keys = keys_of(store, 1, 2)
    src = torch.tensor([*range(40, 40 + CHUNK), *range(100, 100 + CHUNK), 7, 8], dtype=torch.int32)  # 2 extra
    assert store.save(store.reserve(keys), src) == 2
    dst = torch.arange(300, 300 + 3 * CHUNK, dtype=torch.int32)  # a chunk more than the lease
    before = kv_bytes(store.buffers, torch.arange(store.buffers.num_slots)).clone()
    lease = store.lookup(keys)
    try:
        assert store.load(lease, dst).tokens_loaded == 2 * CHUNK
    finally:
        store.release(lease)
    loaded = dst[: 2 * CHUNK].long()
    assert torch.equal(kv_bytes(store.buffers, loaded), kv_bytes(store.buffers, src[: 2 * CHUNK].long()))
    untouched = torch.ones(store.buffers.num_slots, dtype=torch.bool)
    untouched[loaded] = False
    everything = torch.arange(store.buffers.num_slots)
    assert torch.equal(kv_bytes(store.buffers, everything[untouched]), _rows_of(before, store, untouched))


def _rows_of(flat: torch.Tensor, store: CacheStore, mask: torch.Tensor) -> torch.Tensor:
    """Rows ``mask`` of a ``kv_bytes`` dump of every slot, in kv_bytes' order."""
    planes = sum(len(p) for p in store.buffers.planes)
    return flat.view(planes, store.buffers.num_slots, -1)[:, mask].reshape(-1)


@pytest.mark.parametrize(
    ("slots", "error", "message"),
    [
        (torch.arange(2 * CHUNK - 1), ValueError,
         rf"slots: expected a 1-D tensor of at least {2 * CHUNK} slot indices \(2 keys of {CHUNK}\), got shape \({2 * CHUNK - 1},\)"),
        (torch.arange(2 * CHUNK).view(2, CHUNK), ValueError, rf"got shape \(2, {CHUNK}\)"),
        (torch.arange(2 * CHUNK, dtype=torch.float32), TypeError, "slots: expected dtype torch.int32 or torch.int64, got torch.float32"),
        (torch.arange(2 * CHUNK, device="meta"), ValueError, "slots: expected device cpu like the KV buffers, got meta"),
        (list(range(2 * CHUNK)), TypeError, "slots: expected a torch.Tensor of slot indices, got list"),
    ],
    ids=["short", "2-D", "float", "device", "list"],
)
def test_bad_save_slots_raise_the_same_error_and_abort(store: CacheStore, slots, error, message):
    keys = keys_of(store, 2, 2)
    with pytest.raises(error, match=message):
        store.save(store.reserve(keys), slots)
    again = store.reserve(keys)  # the failed store left nothing "being written"
    assert again.num_chunks == 2
    store.abort(again)


def test_bad_load_slots_raise_the_same_error(store: CacheStore):
    keys = keys_of(store, 3, 2)
    assert store.save(store.reserve(keys), torch.arange(2 * CHUNK)) == 2
    lease = store.lookup(keys)
    try:
        with pytest.raises(ValueError, match=rf"at least {2 * CHUNK} slot indices \(2 chunks of {CHUNK}\), got shape \({CHUNK},\)"):
            store.load(lease, torch.arange(CHUNK))
        with pytest.raises(TypeError, match="got torch.int16"):
            store.load(lease, torch.arange(2 * CHUNK, dtype=torch.int16))
    finally:
        store.release(lease)


def test_skipped_keys_count_as_dedup_or_dropped_the_same(store: CacheStore):
    cached = keys_of(store, 4, 2)
    assert store.save(store.reserve(cached), torch.arange(2 * CHUNK)) == 2
    lease = store.lookup(cached)  # pins 2 of the 4 slabs
    try:
        new = keys_of(store, 5, 4)
        res = store.reserve(cached + new)  # 2 cached, 2 new ones fit, 2 have no room
        assert (res.chunk_indices, res.no_room) == ((2, 3), 2)
        assert store.save(res, torch.arange(6 * CHUNK)) == 2
    finally:
        store.release(lease)
    stats = store.stats()
    assert (stats.dedup_chunks, stats.dropped_chunks, stats.stored_chunks) == (2, 2, 4)
    assert (stats.lookups, stats.hit_chunks, stats.miss_chunks) == (1, 2, 0)


def test_expiry_margin_is_a_second_or_a_quarter_of_the_ttl(store: CacheStore):
    assert store.lease_ttl_s == TTL_S
    now = store.clock()
    assert not store.has_time_for_copy(now + COPY_MARGIN_S - 0.05)
    assert store.has_time_for_copy(now + COPY_MARGIN_S + 0.5)


def test_a_lease_or_reservation_near_its_deadline_copies_nothing(store: CacheStore):
    keys = keys_of(store, 6, 2)
    assert store.save(store.reserve(keys), torch.arange(2 * CHUNK)) == 2
    before = kv_bytes(store.buffers, torch.arange(store.buffers.num_slots)).clone()
    lease = store.lookup(keys)
    late = dataclasses.replace(lease, deadline=store.clock() + COPY_MARGIN_S / 2)
    assert store.load(late, torch.arange(200, 200 + 2 * CHUNK)).chunks_loaded == 0
    store.release(lease)
    assert torch.equal(kv_bytes(store.buffers, torch.arange(store.buffers.num_slots)), before)
    other = keys_of(store, 8, 2)
    res = store.reserve(other)
    late_res = dataclasses.replace(res, deadline=store.clock() + COPY_MARGIN_S / 2)
    assert store.save(late_res, torch.arange(2 * CHUNK)) == 0
    assert store.lookup(other).num_chunks == 0
    again = store.reserve(other)  # the dropped save gave its slabs back at once
    assert again.num_chunks == 2
    store.abort(again)
    stats = store.stats()
    assert (stats.generation_misses, stats.dropped_chunks, stats.loaded_bytes) == (2, 2, 0)


class GatedTier:
    """A RemoteTier in memory whose existence check waits for ``gate`` (a hung Redis)."""

    connections = 4

    def __init__(self, slab_format: SlabFormat) -> None:
        self.format = slab_format
        self.values: dict[bytes, bytes] = {}
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key: bytes, value: bytes) -> bool:
        self.values[key] = value
        return True

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        assert self.gate.wait(timeout=30)
        n = 0
        while n < len(keys) and keys[n] in self.values:
            n += 1
        return n

    def fetch_into(self, keys: Sequence[bytes], destinations: Sequence[np.ndarray], deadline: float) -> int:
        for key, dest in zip(keys, destinations, strict=True):
            assert self.format.check_value(key, self.values[key]) is Verdict.OK
            dest[:] = np.frombuffer(self.values[key], dtype=np.uint8, offset=HEADER_BYTES)
        return len(keys)

    def throughput(self) -> None:
        return None  # never measured: fills probe, ``connections`` chunks at a time

    def close(self) -> None:
        pass


def test_ip_lookup_waits_for_a_hung_remote_at_most_remote_timeout_ms(monkeypatch):
    tiers: list[GatedTier] = []

    def build(config: LMCTransferConfig, slab_format: SlabFormat) -> GatedTier:
        if not tiers:
            tiers.append(GatedTier(slab_format))
        return tiers[0]  # one remote shared by both stores

    monkeypatch.setattr("lmc_transfer.tiers.remote_sync.build_remote_tier", build)
    timeout_s = 0.1
    config = LMCTransferConfig.from_dict({
        "chunk_size": CHUNK, "max_local_cpu_size": 8 * SLAB_BYTES / 1024**3,
        "remote_url": "redis://127.0.0.1:1/0", "remote_timeout_ms": int(timeout_s * 1000),
    })
    src = IPStore(config, make_buffers(11))
    keys = keys_of(src, 11, 3)
    try:
        assert src.save(src.reserve(keys), torch.arange(3 * CHUNK)) == 3
        assert src.flush_remote(5)
    finally:
        src.close()
    dst = IPStore(config, make_buffers(12))
    tier = tiers[0]
    try:
        tier.gate.clear()
        for _ in range(2):  # the first starts the fill; the second finds it running
            start = time.monotonic()
            lease = dst.lookup(keys)
            assert time.monotonic() - start < timeout_s + 0.15
            assert lease.num_chunks == 0
        tier.gate.set()  # the hung fill finishes behind the lookups
        deadline = time.monotonic() + 10
        while (lease := dst.lookup(keys)).num_chunks < 3 and time.monotonic() < deadline:
            dst.release(lease)
            time.sleep(0.01)
        assert lease.num_chunks == 3
        dest = torch.arange(200, 200 + 3 * CHUNK)
        assert dst.load(lease, dest).chunks_loaded == 3
        dst.release(lease)
        assert torch.equal(kv_bytes(dst.buffers, dest), kv_bytes(make_buffers(11), torch.arange(3 * CHUNK)))
    finally:
        dst.close()
