"""The daemon's promotion thread: slow tier I/O for one LOOKUP never delays other clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from lmc_transfer.config import load_config
from lmc_transfer.mp_store import MPStore
from lmc_transfer.promoter import Deferred, Promoter
from lmc_transfer.server import CacheDaemon
from tests.conftest_mp import (  # noqa: F401  (fixtures)
    CHUNK,
    make_buffers,
    prompt_keys,
    tokens_for,
    workdir,
    write_config,
)


def _drain_until(promoter: Promoter, count: int, timeout_s: float = 5.0) -> list:
    deadline = time.monotonic() + timeout_s
    done: list = []
    while len(done) < count:
        assert time.monotonic() < deadline, f"only {len(done)} of {count} jobs finished"
        done += promoter.drain()
        time.sleep(0.005)
    return done


def test_jobs_come_back_in_order_with_results_and_errors() -> None:
    promoter = Promoter()
    try:
        promoter.submit("a", Deferred(work=lambda: 41, finish=lambda r: {"n": r + 1}))
        promoter.submit("b", Deferred(work=lambda: 1 / 0, finish=lambda r: {}))
        assert promoter.pending == 2
        a, b = _drain_until(promoter, 2)
        assert promoter.pending == 0
        assert (a.ticket, a.result, a.error, a.deferred.finish(a.result)) == ("a", 41, None, {"n": 42})
        assert b.ticket == "b" and isinstance(b.error, ZeroDivisionError)
    finally:
        assert promoter.close(5)


def test_close_stops_after_the_running_job_and_drops_the_queued_ones() -> None:
    promoter = Promoter()
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def slow() -> str:
        started.set()
        release.wait(5)
        while not promoter.stopping.is_set():  # a long job sees close() and returns early
            time.sleep(0.001)
        ran.append("slow")
        return "slow"

    promoter.submit(1, Deferred(work=slow, finish=lambda r: {}))
    promoter.submit(2, Deferred(work=lambda: ran.append("queued"), finish=lambda r: {}))
    assert started.wait(5)
    release.set()
    assert promoter.close(5)
    assert ran == ["slow"]
    with pytest.raises(RuntimeError, match="submit: the promoter is closed"):
        promoter.submit(3, Deferred(work=lambda: None, finish=lambda r: {}))


@pytest.fixture
def running_daemon(workdir) -> Iterator[CacheDaemon]:
    """A daemon serving on its own thread in this process (tests reach into its state)."""
    daemon = CacheDaemon(load_config(write_config(workdir, lookup_timeout_ms=5000, request_timeout_ms=5000)))
    daemon.bind()
    stop = threading.Event()
    loop = threading.Thread(target=daemon.serve_forever, args=(stop,), daemon=True)
    loop.start()
    try:
        yield daemon
    finally:
        stop.set()
        loop.join(10)
        daemon.close()
    assert not loop.is_alive()


class _StuckRemote:
    """A remote tier whose fill blocks until released (a slow Redis)."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def fill(self, pool, keys, ttl_s) -> int:
        self.entered.set()
        assert self.release.wait(10)
        return 0

    def flush(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        pass


def test_a_lookup_waiting_on_the_remote_tier_does_not_delay_other_clients(running_daemon) -> None:
    daemon, config = running_daemon, running_daemon.config
    buffers = make_buffers(1)
    local = MPStore(config, buffers)
    other = MPStore(config, make_buffers(1))
    remote = _StuckRemote()
    waiting: threading.Thread | None = None
    try:
        stored = prompt_keys(buffers, tokens_for(1, 2))
        assert local.save(local.reserve(stored), torch.arange(2 * CHUNK)) == 2
        daemon._state.remote = remote  # the pool exists since the first HELLO
        missing = prompt_keys(buffers, tokens_for(2, 2))
        replies: list[int] = []
        waiting = threading.Thread(target=lambda: replies.append(other.lookup(missing).num_chunks))
        waiting.start()
        assert remote.entered.wait(5), "the lookup of missing keys never asked the remote tier"
        t0 = time.monotonic()
        lease = local.lookup(stored)
        elapsed = time.monotonic() - t0
        assert lease.num_chunks == 2
        assert elapsed < 1.0, f"a local hit waited {elapsed:.2f}s behind another client's remote fill"
        assert waiting.is_alive() and not replies, "the remote-bound lookup was answered before its fill ended"
        local.release(lease)
        remote.release.set()
        waiting.join(5)
        assert replies == [0]
    finally:
        remote.release.set()
        if waiting is not None:
            waiting.join(5)
        local.close()
        other.close()


class _BrokenRemote(_StuckRemote):
    def fill(self, pool, keys, ttl_s) -> int:
        raise RuntimeError("remote tier exploded")


def test_a_promotion_that_raises_is_an_error_reply_and_the_daemon_keeps_serving(running_daemon) -> None:
    daemon, config = running_daemon, running_daemon.config
    buffers = make_buffers(1)
    store = MPStore(config, buffers)
    try:
        stored = prompt_keys(buffers, tokens_for(1, 2))
        assert store.save(store.reserve(stored), torch.arange(2 * CHUNK)) == 2
        daemon._state.remote = _BrokenRemote()
        errors = daemon.counters.errors
        assert store.lookup(prompt_keys(buffers, tokens_for(2, 2))).num_chunks == 0  # an error reply is a miss
        assert daemon.counters.errors == errors + 1
        lease = store.lookup(stored)
        assert lease.num_chunks == 2
        store.release(lease)
    finally:
        store.close()
