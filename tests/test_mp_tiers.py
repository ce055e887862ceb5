"""The daemon's pool and disk tier under faults, as real subprocesses: a writer stalled past its
TTL, a disk tier directory others own or can write, stray entries in it, a pool larger than
/dev/shm; and the daemon importing no torch."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmc_transfer.daemon.shm import shm_free_bytes
from lmc_transfer.store.mp_client import MPStore
from lmc_transfer.tiers.disk import tier_directory
from lmc_transfer.tiers.format import geometry_digest
from tests.conftest_mp import (  # noqa: F401  (fixtures)
    CHUNK,
    LAYERS,
    LOAD_SHIFT,
    REPO,
    daemon_env,
    daemons,
    engine_load,
    engine_store,
    expected_after_load,
    make_buffers,
    prompt_keys,
    start_daemon,
    tokens_for,
    workdir,
    write_config,
)

pytestmark = pytest.mark.timeout(120)

OTHER_UID = 54321  # a uid nobody on the test machine has


def _run_daemon(config: Path, workdir: Path, timeout_s: float = 30) -> subprocess.CompletedProcess:
    """A daemon that is expected to refuse to start: its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "lmc_transfer.daemon", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=daemon_env(workdir),
    )


def _error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


def _wrong_chunks(kv: bytes, expected: bytes, chunks: int) -> int:
    """How many of a loaded prompt's chunks differ from what was stored (all layers and planes)."""
    got, want = torch.frombuffer(bytearray(kv), dtype=torch.uint8), torch.frombuffer(bytearray(expected), dtype=torch.uint8)
    planes = got.view(LAYERS * 2, -1), want.view(LAYERS * 2, -1)
    row = planes[0].shape[1] // 512  # bytes per slot of one plane (conftest_mp.NUM_SLOTS = 512)
    wrong = 0
    for c in range(chunks):
        lo, hi = (LOAD_SHIFT + c * CHUNK) * row, (LOAD_SHIFT + (c + 1) * CHUNK) * row
        wrong += not torch.equal(planes[0][:, lo:hi], planes[1][:, lo:hi])
    return wrong


# -- issue item 5: a writer stalled past lease_ttl_s ------------------------------------


def test_stalled_writer_resuming_after_expiry_tears_no_other_clients_chunks(workdir, daemons):
    """Writer A reserves 8 chunks and stalls past the TTL; client B stores 8 chunks of its own;
    A's copy then resumes into the slabs it was given and A commits. B's prompt, loaded by a
    third client, must be byte-exact: 0 wrong chunks (8 of 8 were wrong before the quarantine)."""
    ttl_s = 1.0
    d = start_daemon(daemons, write_config(workdir, lease_ttl_s=ttl_s))
    writer = MPStore(d.config, make_buffers(40))
    victim = MPStore(d.config, make_buffers(41))
    try:
        stalled = writer.reserve(prompt_keys(writer.buffers, tokens_for(40, 8)))
        assert stalled.num_chunks == 8
        time.sleep(ttl_s + 0.3)  # A is stopped (SIGSTOP, swapped out, ...) past its TTL
        victim_keys = prompt_keys(victim.buffers, tokens_for(41, 8))
        assert victim.save(victim.reserve(victim_keys), torch.arange(8 * CHUNK)) == 8
        for slab in writer.slab_views(stalled.slab_ids):  # A's copy resumes where it stopped
            slab.fill_(0xEE)
        requests = d.stats()["counters"]["requests"]
        assert writer.commit(stalled) == 0
        assert d.stats()["counters"]["requests"] == requests + 1, "past its deadline A sends no COMMIT"
    finally:
        writer.close()
        victim.close()
    result, kv = engine_load(d.config, 41, 8)
    assert result == {"hit": 8, "loaded": 8}
    assert _wrong_chunks(kv, expected_after_load(41, 8), 8) == 0
    pool = d.stats()["pool"]
    assert (pool["quarantined_slabs"], pool["committed_chunks"]) == (8, 8)
    assert d.stop() == 0 and d.leftovers() == []


# -- issue item 3: the disk tier's directory and files -----------------------------------


def _disk_config(workdir: Path, root: Path) -> Path:
    return write_config(workdir, local_disk=str(root), max_local_disk_size=1.0, disk_flush_interval_s=0.1)


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_disk_tier_directory_of_another_user_stops_the_daemon_at_start(workdir):
    root = workdir / "disk"
    root.mkdir(mode=0o700)
    os.chown(root, OTHER_UID, OTHER_UID)
    out = _run_daemon(_disk_config(workdir, root), workdir)
    assert out.returncode == 1
    lines = _error_lines(out)
    assert len(lines) == 1, lines
    assert f"disk tier directory {root} must be owned by uid {os.getuid()}" in lines[0]
    assert f"owner uid {OTHER_UID}" in lines[0]


def test_disk_tier_directory_others_can_write_stops_the_daemon_at_start(workdir):
    root = workdir / "disk"
    root.mkdir()
    os.chmod(root, 0o777)
    out = _run_daemon(_disk_config(workdir, root), workdir)
    assert out.returncode == 1
    lines = _error_lines(out)
    assert len(lines) == 1 and "not group/other-writable" in lines[0] and "mode 0o777" in lines[0], lines


def test_disk_tier_is_private_under_umask_000(workdir, daemons):
    root = workdir / "new" / "disk"
    old_umask = os.umask(0)  # inherited by the daemon
    try:
        d = start_daemon(daemons, _disk_config(workdir, root))
    finally:
        os.umask(old_umask)
    assert engine_store(d.config, 42, 2) == {"committed": 2}
    assert d.stop() == 0
    directory = tier_directory(root, geometry_digest(make_buffers(1).geometry, CHUNK))
    modes = {str(p.relative_to(workdir)): stat.S_IMODE(p.stat().st_mode) for p in (workdir / "new", root, directory)}
    assert modes == {p: 0o700 for p in modes}
    files = sorted(directory.iterdir())
    assert len(files) == 2 and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}


# -- issue item 7: stray entries in the tier directory -----------------------------------


def test_stray_directory_fifo_and_symlink_in_the_tier_dir_break_nothing(workdir, daemons):
    root = workdir / "disk"
    directory = tier_directory(root, geometry_digest(make_buffers(1).geometry, CHUNK))
    directory.mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o700)
    (directory / ("ab" * 32 + ".kv")).mkdir()  # made every HELLO fail
    os.mkfifo(directory / ("cd" * 32 + ".kv"))  # blocked the daemon loop in open()
    os.symlink(workdir, directory / ("ef" * 32 + ".kv"))
    (directory / "not-a-chunk").mkdir()
    d = start_daemon(daemons, _disk_config(workdir, root))
    assert engine_store(d.config, 43, 3) == {"committed": 3}
    result, kv = engine_load(d.config, 43, 3)
    assert result == {"hit": 3, "loaded": 3} and kv == expected_after_load(43, 3)
    stats = d.stats()
    assert stats["disk"]["skipped"] == 4 and stats["disk"]["corrupt"] == 0
    start = time.monotonic()
    assert d.stop() == 0 and d.leftovers() == []
    assert time.monotonic() - start < 10, "SIGTERM must stop the daemon promptly"
    assert len(list(directory.glob("*.kv"))) == 3 + 3, "3 chunk files written, the 3 stray entries left alone"


# -- issue item 6: a pool larger than /dev/shm -------------------------------------------


def test_pool_larger_than_dev_shm_fails_at_start_with_one_line(workdir):
    free = shm_free_bytes()
    wanted = free + max(free // 2, 1 << 30)  # margin: other processes may free memory meanwhile
    out = _run_daemon(write_config(workdir, max_local_cpu_size=wanted / 1024**3), workdir)
    assert out.returncode == 1
    lines = _error_lines(out)
    assert len(lines) == 1, lines
    assert f"needs {int(wanted / 1024**3 * 1024**3)} bytes" in lines[0]
    assert "/dev/shm has only" in lines[0] and "--shm-size" in lines[0] and "max_local_cpu_size" in lines[0]


# -- issue 13: the daemon imports no torch ----------------------------------------------


def test_the_daemon_imports_no_torch_triton_or_redis():
    code = (
        "import sys, lmc_transfer.daemon.server\n"
        "print(sorted(m for m in ('torch', 'triton', 'redis') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
