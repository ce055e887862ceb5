"""DiskTier on its own: LRU budget, reopen, fsync, the value format, private directories and
files, stray entries (the daemon-level tests are in tests/test_mp_tiers.py)."""

from __future__ import annotations

import os
import stat
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lmc_transfer.tiers.disk import DiskTier, tier_directory
from lmc_transfer.tiers.format import HEADER_BYTES, SlabFormat, geometry_digest
from tests.conftest_mp import CHUNK, make_buffers

SLAB = 256
DIGEST = geometry_digest(make_buffers(1).geometry, CHUNK)
FORMAT = SlabFormat(DIGEST, SLAB)
FILE_BYTES = HEADER_BYTES + SLAB
OTHER_UID = 54321  # a uid nobody on the test machine has


def slabs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n * SLAB, dtype=np.uint8)


def key(i: int) -> bytes:
    return bytes([i + 1]) * 32


def open_tier(root: Path, data: np.ndarray, gens: np.ndarray, max_files: int = 10, **kw) -> DiskTier:
    return DiskTier(root, max_files * FILE_BYTES, FORMAT, data, gens, **kw)


def test_budget_is_lru_and_survives_reopen(tmp_path):
    data = slabs(4, seed=2)
    gens = np.ones(4, dtype=np.uint64)
    tier = open_tier(tmp_path, data, gens, max_files=3)
    keys = [key(i) for i in range(4)]
    for i in range(3):
        tier.submit(keys[i], i)
    assert tier.flush(10)
    dest = np.zeros(SLAB, dtype=np.uint8)
    assert tier.load_into(keys[0], dest) and np.array_equal(dest, data[:SLAB])  # keys[0] now most recent
    tier.submit(keys[3], 3)
    assert tier.flush(10)
    assert [tier.contains(k) for k in keys] == [True, False, True, True]
    assert sorted(f.stat().st_size for f in tier.directory.iterdir()) == [FILE_BYTES] * 3
    # The writer re-checks the generation after writing: a slab handed out again
    # between commit and write is not kept (driven directly: the race is timing-bound).
    gens[2] += np.uint64(1)
    tier._write((key(9), 2, int(gens[2]) - 1))
    assert not tier.contains(key(9)) and not list(tier.directory.glob(".*"))
    stats = tier.stats()
    assert (stats.files, stats.bytes, stats.written, stats.dropped, stats.loads) == (3, 3 * FILE_BYTES, 4, 1, 1)
    tier.close()
    reopened = open_tier(tmp_path, data, gens, max_files=3)
    try:
        assert [reopened.contains(k) for k in keys] == [True, False, True, True]
        dest[:] = 0
        assert reopened.load_into(keys[3], dest) and np.array_equal(dest, data[3 * SLAB :])
        other = DiskTier(tmp_path, 3 * FILE_BYTES, SlabFormat(bytes(32), SLAB), data, gens)  # another geometry
        assert not other.contains(keys[3])
        other.close()
    finally:
        reopened.close()


def test_fsyncs_within_the_interval_and_on_close(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    data = slabs(2, seed=3)
    tier = open_tier(tmp_path, data, np.ones(2, dtype=np.uint64), sync_interval_s=0.1)
    keys = [key(6), key(7)]
    first, second = (str(tier.directory / (k.hex() + ".kv")) for k in keys)
    try:
        tier.submit(keys[0], 0)
        assert tier.flush(10)
        deadline = time.monotonic() + 5
        while tier.stats().synced < 1:  # the writer is idle: the interval's timeout syncs
            assert time.monotonic() < deadline, "a written chunk was never fsynced"
            time.sleep(0.01)
        assert synced == [first, str(tier.directory)]  # the file, then the directory (its rename)
        tier.submit(keys[1], 1)
    finally:
        tier.close()  # syncs what is still pending
    assert tier.stats().synced == 2 and synced[2:] == [second, str(tier.directory)]
    with pytest.raises(ValueError, match="sync_interval_s must be > 0, got 0"):
        open_tier(tmp_path, data, np.ones(2, dtype=np.uint64), sync_interval_s=0)


def test_a_file_is_one_slab_value_bound_to_its_key(tmp_path):
    data = slabs(2, seed=4)
    tier = open_tier(tmp_path, data, np.ones(2, dtype=np.uint64))
    tier.submit(key(0), 0)
    tier.submit(key(1), 1)
    assert tier.flush(10)
    tier.close()
    first, second = (tier.directory / (key(i).hex() + ".kv") for i in range(2))
    assert first.read_bytes() == FORMAT.encode(key(0), data[:SLAB]), "disk and Redis hold the same bytes"
    first.write_bytes(second.read_bytes())  # a valid value, under another key's name
    reopened = open_tier(tmp_path, data, np.ones(2, dtype=np.uint64))
    try:
        dest = np.zeros(SLAB, dtype=np.uint8)
        assert not reopened.contains(key(0)) and not first.exists()
        assert reopened.load_into(key(1), dest) and np.array_equal(dest, data[SLAB:])
        assert reopened.stats().corrupt == 1
    finally:
        reopened.close()


def _old_format_file(k: bytes, payload: bytes) -> bytes:
    """A chunk file as the previous release wrote it (magic LMCTKV01, blake2b checksum)."""
    import hashlib

    header = struct.Struct("<8sIIQ32s32s32s").pack(
        b"LMCTKV01", 1, 0, len(payload), DIGEST, k, hashlib.blake2b(payload, digest_size=32).digest()
    )
    return header + payload


def test_files_of_the_older_format_are_dropped_and_counted_never_served(tmp_path, caplog):
    directory = tier_directory(tmp_path, DIGEST)
    directory.mkdir(parents=True, mode=0o700)
    payload = bytes(range(256))
    old = directory / (key(0).hex() + ".kv")
    old.write_bytes(_old_format_file(key(0), payload))
    # Cut to this format's file size, so only the header can tell.
    cut = directory / (key(1).hex() + ".kv")
    cut.write_bytes(_old_format_file(key(1), payload)[:FILE_BYTES])
    tier = open_tier(tmp_path, slabs(1, seed=5), np.ones(1, dtype=np.uint64))
    try:
        assert not tier.contains(key(0)) and not tier.contains(key(1))
        assert not old.exists() and not cut.exists()
        assert tier.stats().corrupt == 2
        assert "deleted 2 invalid chunk files (2 of an older format)" in caplog.text
    finally:
        tier.close()


def test_bit_rot_is_caught_on_load_and_the_file_deleted(tmp_path):
    data = slabs(1, seed=6)
    tier = open_tier(tmp_path, data, np.ones(1, dtype=np.uint64))
    try:
        tier.submit(key(0), 0)
        assert tier.flush(10)
        path = tier.directory / (key(0).hex() + ".kv")
        blob = bytearray(path.read_bytes())
        blob[HEADER_BYTES + 100] ^= 0x01
        path.write_bytes(bytes(blob))
        dest = np.full(SLAB, 7, dtype=np.uint8)
        assert not tier.load_into(key(0), dest)
        assert not path.exists() and not tier.contains(key(0)) and tier.stats().corrupt == 1
    finally:
        tier.close()


def test_directories_and_files_are_private_whatever_the_umask(tmp_path):
    root = tmp_path / "a" / "disk"
    old_umask = os.umask(0)
    try:
        tier = open_tier(root, slabs(1, seed=7), np.ones(1, dtype=np.uint64))
        try:
            tier.submit(key(0), 0)
            assert tier.flush(10)
        finally:
            tier.close()
    finally:
        os.umask(old_umask)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a", root, tier.directory)}
    assert modes == {p: 0o700 for p in modes}
    (chunk,) = tier.directory.iterdir()
    assert stat.S_IMODE(chunk.stat().st_mode) == 0o600


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
@pytest.mark.parametrize("which", ["root", "digest directory"])
def test_a_directory_of_another_user_is_refused(tmp_path, which):
    root = tmp_path / "disk"
    target = root if which == "root" else tier_directory(root, DIGEST)
    target.mkdir(parents=True, mode=0o700)
    os.chown(target, OTHER_UID, OTHER_UID)
    with pytest.raises(PermissionError, match=f"disk tier directory {target} must be owned by uid {os.getuid()}.*"
                                              f"owner uid {OTHER_UID}"):
        open_tier(root, slabs(1, seed=8), np.ones(1, dtype=np.uint64))


def test_a_directory_others_can_write_is_refused(tmp_path):
    root = tmp_path / "disk"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(PermissionError, match="not group/other-writable, got a directory with .* mode 0o777"):
        open_tier(root, slabs(1, seed=9), np.ones(1, dtype=np.uint64))


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_a_planted_file_of_another_user_is_never_read(tmp_path):
    data = slabs(1, seed=10)
    directory = tier_directory(tmp_path, DIGEST)
    directory.mkdir(parents=True, mode=0o700)
    planted = directory / (key(0).hex() + ".kv")
    planted.write_bytes(FORMAT.encode(key(0), data))  # a valid value: only its owner gives it away
    os.chown(planted, OTHER_UID, OTHER_UID)
    tier = open_tier(tmp_path, data, np.ones(1, dtype=np.uint64))
    try:
        assert not tier.contains(key(0)) and planted.exists()
        assert tier.stats().skipped == 1
    finally:
        tier.close()


def test_stray_entries_are_skipped_and_counted_and_never_block(tmp_path):
    data = slabs(1, seed=11)
    directory = tier_directory(tmp_path, DIGEST)
    directory.mkdir(parents=True, mode=0o700)
    (directory / (key(0).hex() + ".kv")).mkdir()  # a directory with a chunk file's name
    os.mkfifo(directory / (key(1).hex() + ".kv"))  # opening it for reading would block
    (directory / "stray-dir").mkdir()
    target = directory.parent / "elsewhere.kv"
    target.write_bytes(FORMAT.encode(key(2), data))
    os.symlink(target, directory / (key(2).hex() + ".kv"))
    good = directory / (key(3).hex() + ".kv")
    good.write_bytes(FORMAT.encode(key(3), data))
    opened: list[DiskTier] = []
    worker = threading.Thread(target=lambda: opened.append(open_tier(tmp_path, data, np.ones(1, dtype=np.uint64))))
    worker.start()
    worker.join(10)
    assert opened, "opening the tier blocked on a stray entry"
    tier = opened[0]
    try:
        assert [tier.contains(key(i)) for i in range(4)] == [False, False, False, True]
        assert tier.stats().skipped == 4 and tier.stats().corrupt == 0
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            [key(0).hex() + ".kv", key(1).hex() + ".kv", key(2).hex() + ".kv", key(3).hex() + ".kv", "stray-dir"]
        ), "stray entries are left alone"
        # An entry that turns into a FIFO after the index was built: a miss, not a hang.
        good.unlink()
        os.mkfifo(good)
        dest = np.zeros(SLAB, dtype=np.uint8)
        loaded: list[bool] = []
        worker = threading.Thread(target=lambda: loaded.append(tier.load_into(key(3), dest)))
        worker.start()
        worker.join(10)
        assert loaded == [False] and tier.stats().skipped == 5
    finally:
        tier.close()
