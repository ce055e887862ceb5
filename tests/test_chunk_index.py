"""The shared-memory chunk index: writer/reader semantics, segment checks, and real concurrent
processes (a churning writer, probing readers, a stopped reader, a writer killed mid-update)."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import _posixshmem
import pytest

from lmc_transfer.daemon import chunk_index
from lmc_transfer.daemon.chunk_index import (
    PROBE_ATTEMPTS,
    ChunkIndexError,
    ChunkIndexReader,
    ChunkIndexWriter,
    IndexHits,
    index_capacity,
)
from lmc_transfer.daemon.shm import segment_exists, unlink_segment
from tests.chunk_index_procs import EPOCH, STALL_KEY, STALL_KEYS, after_fence, slab_for, universe

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 30.0


@pytest.fixture
def writer() -> Iterator[ChunkIndexWriter]:
    w = ChunkIndexWriter.create(16, EPOCH, window=4)
    yield w
    w.close()


@pytest.fixture
def reader(writer: ChunkIndexWriter) -> Iterator[ChunkIndexReader]:
    r = ChunkIndexReader.open(writer.name, EPOCH)
    yield r
    r.close()


def key_with_home(home: int, capacity: int, i: int) -> bytes:
    """A 32-byte key whose home bucket is ``home``; ``i`` makes it distinct (in word 0 and the rest)."""
    rest = hashlib.blake2b(i.to_bytes(4, "little"), digest_size=24).digest()
    return (home + capacity * (i + 1)).to_bytes(8, "little") + rest


def hits(*pairs: tuple[int, int]) -> IndexHits:
    return IndexHits(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))


@contextmanager
def raw_segment(name: str) -> Iterator[mmap.mmap]:
    """The index segment mapped writable, to forge what a broken or hostile writer leaves."""
    fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
    try:
        mm = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    try:
        yield mm
    finally:
        mm.close()


def bucket_word(mm: mmap.mmap, bucket: int, word: int) -> int:
    return int.from_bytes(mm[64 + 64 * bucket + 8 * word : 64 + 64 * bucket + 8 * word + 8], "little")


def set_bucket_word(mm: mmap.mmap, bucket: int, word: int, value: int) -> None:
    mm[64 + 64 * bucket + 8 * word : 64 + 64 * bucket + 8 * word + 8] = value.to_bytes(8, "little")


# --- writer and reader semantics -------------------------------------------------------------


def test_put_probe_update_remove(writer: ChunkIndexWriter, reader: ChunkIndexReader) -> None:
    keys = universe(6)
    for i, key in enumerate(keys):
        assert writer.put(key, 10 + i, 100 + i)
    assert len(writer) == 6
    assert reader.probe_prefix(keys) == hits(*[(10 + i, 100 + i) for i in range(6)])
    assert writer.put(keys[2], 7, 2**64 - 1)
    assert len(writer) == 6
    assert reader.probe_prefix(keys[:3]) == hits((10, 100), (11, 101), (7, 2**64 - 1))
    assert writer.remove(keys[4])
    assert not writer.remove(keys[4])
    assert reader.probe_prefix(keys).num_chunks == 4
    assert reader.probe_prefix(keys[5:]) == hits((15, 105))
    assert writer.put(keys[4], 0, 0)
    assert reader.probe_prefix(keys[4:]) == hits((0, 0), (15, 105))
    assert reader.stats.retries == 0 and reader.stats.unstable_misses == 0


def test_prefix_stops_at_first_miss(writer: ChunkIndexWriter, reader: ChunkIndexReader) -> None:
    keys = universe(6)
    for i, key in enumerate(keys):
        if i != 2:
            writer.put(key, i, 1)
    assert reader.probe_prefix(keys) == hits((0, 1), (1, 1))
    assert reader.probe_prefix(keys[3:]) == hits((3, 1), (4, 1), (5, 1))
    assert reader.probe_prefix(keys[2:]) == hits()
    assert reader.probe_prefix([]) == hits()


def test_empty_buckets_never_match(writer: ChunkIndexWriter, reader: ChunkIndexReader) -> None:
    # An all-zero key has tag 0 and key words 0, like every empty bucket: only the state says "empty".
    assert reader.probe_prefix([bytes(32)]) == hits()
    writer.put(universe(1)[0], 3, 3)
    writer.remove(universe(1)[0])
    assert reader.probe_prefix([bytes(32), universe(1)[0]]) == hits()
    assert reader.stats.retries == 0


def test_clear_empties_every_bucket(writer: ChunkIndexWriter, reader: ChunkIndexReader) -> None:
    keys = universe(6)
    for i, key in enumerate(keys):
        writer.put(key, i, 1)
    writer.clear()
    assert len(writer) == 0
    assert all(reader.probe_prefix([key]) == hits() for key in keys)
    assert writer.put(keys[0], 9, 9)
    assert reader.probe_prefix(keys) == hits((9, 9))


def test_keys_sharing_a_home_bucket_fill_its_window() -> None:
    capacity, window = 8, 4
    home = capacity - 2  # the window runs past the last home bucket into the extra rows
    writer = ChunkIndexWriter.create(capacity, EPOCH, window=window)
    reader = ChunkIndexReader.open(writer.name, EPOCH)
    try:
        keys = [key_with_home(home, capacity, i) for i in range(window + 1)]
        assert all(writer.put(key, i, i + 1) for i, key in enumerate(keys[:window]))
        assert not writer.put(keys[window], 99, 99)
        assert writer.stats.not_indexed == 1 and len(writer) == window
        assert reader.probe_prefix(keys) == hits(*[(i, i + 1) for i in range(window)])
        # Keys homed at the next bucket share all but one of those buckets: one more fits.
        neighbours = [key_with_home(home + 1, capacity, 50 + i) for i in range(2)]
        assert writer.put(neighbours[0], 5, 5) and not writer.put(neighbours[1], 6, 6)
        assert writer.stats.not_indexed == 2
        assert reader.probe_prefix(neighbours) == hits((5, 5))
        # A delete in the middle of the window leaves no tombstone: the keys after it still hit.
        assert writer.remove(keys[1])
        assert reader.probe_prefix([keys[0], keys[2], keys[3]]) == hits((0, 1), (2, 3), (3, 4))
        assert writer.put(keys[window], 99, 99)
        assert reader.probe_prefix([keys[window], keys[3]]) == hits((99, 99), (3, 4))
        assert reader.probe_prefix([keys[1]]) == hits()
    finally:
        reader.close()
        writer.close()


def test_index_capacity_keeps_load_at_most_half() -> None:
    assert [index_capacity(n) for n in (1, 2, 3, 4, 5, 100, 4096)] == [2, 4, 8, 8, 16, 256, 8192]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_entries"):
            index_capacity(bad)


def test_writer_refuses_bad_arguments(writer: ChunkIndexWriter) -> None:
    key = universe(1)[0]
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        writer.put(key[:31], 0, 0)
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        writer.remove("x" * 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"slab_id must be an int in \[0, 2\*\*64\), got -1"):
        writer.put(key, -1, 0)
    with pytest.raises(ValueError, match="slab_id"):
        writer.put(key, True, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"generation must be an int in \[0, 2\*\*64\), got 18446744073709551616"):
        writer.put(key, 0, 2**64)
    assert len(writer) == 0
    for capacity, window, match in ((12, 4, "capacity must be a power of two"), (8, 0, "window"), (8, 65, "window")):
        with pytest.raises(ValueError, match=match):
            ChunkIndexWriter.create(capacity, EPOCH, window=window)
    with pytest.raises(ValueError, match="epoch"):
        ChunkIndexWriter.create(8, "e" * 33)


def test_probe_refuses_keys_of_another_length(reader: ChunkIndexReader) -> None:
    keys = universe(3)
    with pytest.raises(ValueError, match="3 keys of 32 bytes each, got 95 bytes"):
        reader.probe_prefix([keys[0], keys[1][:31], keys[2]])


def test_closed_writer_refuses_calls_and_unlinks(writer: ChunkIndexWriter) -> None:
    name = writer.name
    writer.close()
    writer.close()
    assert not segment_exists(name)
    with pytest.raises(RuntimeError, match="closed"):
        writer.put(universe(1)[0], 0, 0)


# --- the segment: permissions, format, shutdown ----------------------------------------------


def test_segment_is_private_whatever_the_umask() -> None:
    old = os.umask(0)
    try:
        w = ChunkIndexWriter.create(8, EPOCH)
    finally:
        os.umask(old)
    try:
        fd = _posixshmem.shm_open(w.name, os.O_RDONLY, mode=0o600)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.getuid())
    finally:
        w.close()


def test_reader_refuses_a_segment_others_can_read(writer: ChunkIndexWriter) -> None:
    fd = _posixshmem.shm_open(writer.name, os.O_RDWR, mode=0o600)
    try:
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    with pytest.raises(ChunkIndexError, match="with mode 0o600, got a regular object owned by uid .* with mode 0o644"):
        ChunkIndexReader.open(writer.name, EPOCH)


def test_reader_refuses_a_segment_of_another_owner(writer: ChunkIndexWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 1)
    with pytest.raises(ChunkIndexError, match=f"owned by uid {me + 1} with mode 0o600, got .* owned by uid {me} "):
        ChunkIndexReader.open(writer.name, EPOCH)


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (0, b"LMCTSHM1", "expected magic b'LMCTIDX1' version 1, got b'LMCTSHM1' version 1"),
        (8, (2).to_bytes(4, "little"), "expected magic b'LMCTIDX1' version 1, got b'LMCTIDX1' version 2"),
        (16, (12).to_bytes(8, "little"), "capacity must be a power of two"),
        (16, (32).to_bytes(8, "little"), "expected .* for capacity 32 and window 4"),
        (24, (0).to_bytes(4, "little"), "window must be an int"),
        (32, b"other-daemon".ljust(32, b"\0"), "belongs to daemon epoch b'other-daemon', expected b'chunk-index-test'"),
    ],
)
def test_reader_refuses_a_foreign_header(writer: ChunkIndexWriter, offset: int, value: bytes, match: str) -> None:
    with raw_segment(writer.name) as mm:
        mm[offset : offset + len(value)] = value
    with pytest.raises(ChunkIndexError, match=match):
        ChunkIndexReader.open(writer.name, EPOCH)


def test_reader_refuses_another_epoch_and_a_shut_down_index(writer: ChunkIndexWriter) -> None:
    with pytest.raises(ChunkIndexError, match=f"belongs to daemon epoch b'{EPOCH}', expected b'next-daemon'"):
        ChunkIndexReader.open(writer.name, "next-daemon")
    name = writer.name
    writer.close(unlink=False)
    try:
        with pytest.raises(ChunkIndexError, match="not valid: its daemon shut it down"):
            ChunkIndexReader.open(name, EPOCH)
    finally:
        assert unlink_segment(name)


def test_shutdown_turns_every_probe_into_a_miss(writer: ChunkIndexWriter, reader: ChunkIndexReader) -> None:
    key = universe(1)[0]
    writer.put(key, 1, 1)
    assert reader.probe_prefix([key]) == hits((1, 1)) and reader.valid
    writer.close()
    assert not reader.valid
    assert reader.probe_prefix([key]) == hits()


def test_reader_mapping_is_read_only(writer: ChunkIndexWriter, reader: ChunkIndexReader) -> None:
    table = reader._table
    assert table is not None
    with pytest.raises(ValueError, match="read-only"):
        table.buckets[0, 0] = 1
    with pytest.raises(TypeError):
        reader._mm[0:1] = b"x"


# --- the seqlock, driven step by step in one process ------------------------------------------


def test_counter_change_during_the_copy_discards_it(
    writer: ChunkIndexWriter, reader: ChunkIndexReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update that lands between the entry copy and the second counter read: the reader
    must throw the copy away and read again (the copy alone would report the old slab)."""
    key = universe(1)[0]
    writer.put(key, 1, 1)
    bucket = writer._bucket_of[key]

    def update_behind_the_copy() -> None:
        with raw_segment(writer.name) as mm:
            set_bucket_word(mm, bucket, 5, 77)  # slab
            set_bucket_word(mm, bucket, 0, bucket_word(mm, bucket, 0) + 2)

    # The reader's second fence: its copy is taken, its second counter read comes next.
    monkeypatch.setattr(chunk_index, "memory_fence", after_fence(2, update_behind_the_copy))
    assert reader.probe_prefix([key]) == hits((77, 1))
    assert reader.stats.retries == 1 and reader.stats.unstable_misses == 0


def test_odd_counter_reads_as_a_miss_after_bounded_retries(writer: ChunkIndexWriter, reader: ChunkIndexReader) -> None:
    keys = universe(3)
    for i, key in enumerate(keys):
        writer.put(key, i, 1)
    with raw_segment(writer.name) as mm:
        bucket = writer._bucket_of[keys[1]]
        set_bucket_word(mm, bucket, 0, bucket_word(mm, bucket, 0) + 1)
    start = time.monotonic()
    assert reader.probe_prefix(keys) == hits((0, 1))
    assert time.monotonic() - start < 1.0
    assert reader.stats.retries == PROBE_ATTEMPTS - 1 and reader.stats.unstable_misses == 1
    assert reader.probe_prefix(keys[2:]) == hits((2, 1))


def test_write_interrupted_mid_update_heals_on_the_next_write(
    writer: ChunkIndexWriter, reader: ChunkIndexReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = universe(1)[0]
    writer.put(key, 1, 1)
    real_fence = chunk_index.memory_fence

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(chunk_index, "memory_fence", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.put(key, 2, 2)
    monkeypatch.setattr(chunk_index, "memory_fence", real_fence)
    assert reader.probe_prefix([key]) == hits()
    # The next write of that bucket keeps the counter odd while it writes and leaves it even.
    assert writer.put(key, 3, 3)
    assert reader.probe_prefix([key]) == hits((3, 3))


# --- real processes ------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chunk_index_procs", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str], timeout_s: float = CHILD_TIMEOUT_S) -> dict:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        stop(proc)
        stderr = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"child {proc.args} printed nothing within {timeout_s}s: {stderr}")
    return json.loads(line)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    try:
        return proc.wait(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=CHILD_TIMEOUT_S)


@contextmanager
def churning_writer(capacity: int, window: int, num_keys: int) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = spawn("churn", "--capacity", str(capacity), "--window", str(window), "--keys", str(num_keys), "--seed", "1")
    name = None
    try:
        name = read_line(proc)["name"]
        yield proc, name
    finally:
        stop(proc)
        if name is not None:
            unlink_segment(name)


def probing_reader(name: str, num_keys: int, seed: int, seconds: float) -> subprocess.Popen[str]:
    return spawn("probe", "--name", name, "--keys", str(num_keys), "--seed", str(seed), "--seconds", str(seconds))


def assert_all_true(report: dict) -> None:
    assert report["num_wrong"] == 0, report["wrong"]
    assert report["triples"] > 100, report
    assert report["slowest_s"] < 5.0, report


CAPACITY, WINDOW, NUM_KEYS = 8, 4, 24  # 11 buckets for 24 keys: full windows, constant reuse


def test_readers_only_see_true_triples_while_the_writer_churns_then_dies() -> None:
    with churning_writer(CAPACITY, WINDOW, NUM_KEYS) as (writer, name):
        readers = [probing_reader(name, NUM_KEYS, seed, 1.5) for seed in (11, 12)]
        try:
            reports = [read_line(r) for r in readers]
        finally:
            for r in readers:
                stop(r)
        for report in reports:
            assert_all_true(report)
        assert sum(r["retries"] + r["unstable_misses"] for r in reports) > 0, reports
        # SIGKILL at an arbitrary point, maybe inside an update: what is left still reads as
        # true triples or misses, promptly.
        stop(writer)
        reader = ChunkIndexReader.open(name, EPOCH)
        try:
            for i, key in enumerate(universe(NUM_KEYS)):
                start = time.monotonic()
                found = reader.probe_prefix([key])
                assert time.monotonic() - start < 1.0
                assert all(slab_for(key, g) == s for s, g in zip(found.slab_ids, found.generations, strict=True)), i
        finally:
            reader.close()


def test_stopped_reader_resumes_with_true_triples() -> None:
    with churning_writer(CAPACITY, WINDOW, NUM_KEYS) as (writer, name):
        probe = probing_reader(name, NUM_KEYS, 21, 2.0)
        try:
            time.sleep(0.5)  # let it start probing
            for pause in (0.01, 0.05, 0.02, 0.1, 0.03, 0.07):
                os.kill(probe.pid, signal.SIGSTOP)
                time.sleep(pause)
                os.kill(probe.pid, signal.SIGCONT)
                time.sleep(pause / 2)
            report = read_line(probe)
        finally:
            stop(probe)
        assert_all_true(report)
        assert stop(writer, signal.SIGTERM) == 0
        final = read_line(writer)
        assert final["ops"] > 10_000 and final["not_indexed"] > 0, final
        assert not segment_exists(name)


@pytest.mark.parametrize(("op", "fence"), [("put", 1), ("put", 2), ("remove", 1)])
def test_writer_killed_mid_update_leaves_a_miss_not_garbage(op: str, fence: int) -> None:
    """Stopped after the ``fence``-th fence of an update (counter odd; old entry at fence 1, new
    one at fence 2), then SIGKILLed: that bucket reads as a miss forever, the others still hit."""
    proc = spawn("stall", "--capacity", "8", "--window", "8", "--op", op, "--fence", str(fence))
    name = None
    try:
        name = read_line(proc)["name"]
        stop(proc)
        reader = ChunkIndexReader.open(name, EPOCH)
        try:
            assert reader.valid  # killed, not shut down: only the odd counter tells
            keys = universe(STALL_KEYS)
            start = time.monotonic()
            assert reader.probe_prefix(keys) == hits(*[(slab_for(k, 1), 1) for k in keys[:STALL_KEY]])
            assert reader.probe_prefix([keys[STALL_KEY]]) == hits()
            assert time.monotonic() - start < 1.0
            assert reader.stats.unstable_misses == 2
            after = keys[STALL_KEY + 1 :]
            assert reader.probe_prefix(after) == hits(*[(slab_for(k, 1), 1) for k in after])
        finally:
            reader.close()
    finally:
        stop(proc)
        if name is not None:
            unlink_segment(name)
