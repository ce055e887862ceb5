"""The stores' data path on a GPU: loads and saves never wait for the whole device, saves commit
from the completion thread, and what loads is byte for byte what was saved."""

from __future__ import annotations

import logging

import pytest
import torch

from lmc_transfer.config import GB, LMCTransferConfig
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.store.ip import IPStore
from lmc_transfer.store.mp_client import MPStore
from tests.conftest_mp import daemons, make_buffers, prompt_keys, start_daemon, tokens_for, workdir, write_config  # noqa: F401

pytestmark = pytest.mark.gpu

CHUNK = 16


def _cuda(buffers: KVBuffers) -> KVBuffers:
    return KVBuffers.token_slot([layer[0].cuda() for layer in buffers.planes], [layer[1].cuda() for layer in buffers.planes])


def _rows(buffers: KVBuffers, slots: torch.Tensor) -> list[torch.Tensor]:
    return [buffers.plane_rows(layer, plane)[slots].cpu() for layer in range(buffers.num_layers) for plane in range(2)]


def _busy_side_stream() -> torch.cuda.Event:
    """~0.5 s of GPU time on another stream; its event completes only then."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000_000)
        done = torch.cuda.Event()
        done.record(side)
    return done


def _round_trip_beside_busy_stream(store, keys: list[bytes], src: torch.Tensor, dst: torch.Tensor) -> None:
    """One round trip of other keys first: the first calls of a process load kernel modules and
    pin host buffers, which may wait for the device (measured on an H200); later calls must not."""
    warm_up = prompt_keys(store.buffers, tokens_for(99, len(keys)))
    assert store.save(store.reserve(warm_up), src) == len(keys) and store.flush_stores(10)
    lease = store.lookup(warm_up)
    assert store.load(lease, dst).chunks_loaded == len(keys)
    store.release(lease)
    busy = _busy_side_stream()
    assert store.save(store.reserve(keys), src) == len(keys)
    assert not busy.query(), "save waited for another stream's work (a device-wide sync)"
    assert store.flush_stores(10)
    lease = store.lookup(keys)
    assert lease.num_chunks == len(keys), "the queued save did not commit"
    busy = _busy_side_stream()
    assert store.load(lease, dst).chunks_loaded == len(keys)
    assert not busy.query(), "load waited for another stream's work (a device-wide sync)"
    store.release(lease)
    for got, want in zip(_rows(store.buffers, dst), _rows(store.buffers, src)):
        assert torch.equal(got, want)


def test_ip_store_saves_and_loads_without_device_syncs() -> None:
    buffers = _cuda(make_buffers(80))
    slab = buffers.geometry.slab_bytes(CHUNK)
    store = IPStore(LMCTransferConfig.from_dict({"chunk_size": CHUNK, "max_local_cpu_size": 8.5 * slab / GB}), buffers)
    try:
        keys = prompt_keys(buffers, tokens_for(80, 4))
        _round_trip_beside_busy_stream(store, keys, torch.arange(4 * CHUNK, device="cuda"),
                                       torch.arange(4 * CHUNK, device="cuda") + 200)
    finally:
        store.close()


def test_mp_store_saves_and_loads_without_device_syncs(workdir, daemons) -> None:
    d = start_daemon(daemons, write_config(workdir))
    store = MPStore(d.config, _cuda(make_buffers(81)))
    try:
        keys = prompt_keys(store.buffers, tokens_for(81, 3))
        _round_trip_beside_busy_stream(store, keys, torch.arange(3 * CHUNK, device="cuda"),
                                       torch.arange(3 * CHUNK, device="cuda") + 100)
    finally:
        store.close()


def test_a_queued_save_with_a_bad_slot_is_dropped_with_a_warning(caplog) -> None:
    buffers = _cuda(make_buffers(82))
    slab = buffers.geometry.slab_bytes(CHUNK)
    store = IPStore(LMCTransferConfig.from_dict({"chunk_size": CHUNK, "max_local_cpu_size": 4.5 * slab / GB}), buffers)
    try:
        keys = prompt_keys(buffers, tokens_for(82, 2))
        slots = torch.arange(2 * CHUNK, device="cuda")
        slots[CHUNK + 1] = -1
        with caplog.at_level(logging.WARNING):
            assert store.save(store.reserve(keys), slots) == 2  # queued: the check runs behind the copy
            assert store.flush_stores(10)
        assert store.lookup(keys).num_chunks == 0
        assert f"slots[{CHUNK + 1}] = -1 is outside" in caplog.text
        assert store.save(store.reserve(keys), torch.arange(2 * CHUNK, device="cuda")) == 2  # the keys are free again
        assert store.flush_stores(10) and store.lookup(keys).num_chunks == 2
    finally:
        store.close()
