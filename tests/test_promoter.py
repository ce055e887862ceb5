"""The daemon's promotion thread: slow tier I/O for one LOOKUP never delays other clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from lmc_transfer.config import load_config
from lmc_transfer.store.mp_client import MPStore
from lmc_transfer.daemon.promoter import Deferred, Promoter
from lmc_transfer.daemon.server import CacheDaemon
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


def _serving(workdir, lookup_timeout_ms: int) -> Iterator[CacheDaemon]:
    daemon = CacheDaemon(load_config(write_config(workdir, lookup_timeout_ms=lookup_timeout_ms, request_timeout_ms=5000)))
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


@pytest.fixture
def running_daemon(workdir) -> Iterator[CacheDaemon]:
    """A daemon serving on its own thread in this process (tests reach into its state)."""
    yield from _serving(workdir, 5000)


@pytest.fixture
def impatient_daemon(workdir) -> Iterator[CacheDaemon]:
    """The same with clients that give up on a lookup after 300 ms."""
    yield from _serving(workdir, 300)


class _StuckRemote:
    """A remote tier whose fill blocks until released (a slow Redis)."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def fill(self, pool, keys, ttl_s, *, deadline=None) -> int:
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
    def fill(self, pool, keys, ttl_s, *, deadline=None) -> int:
        raise RuntimeError("remote tier exploded")


class _GatedRemote(_StuckRemote):
    """The first fill waits for ``release``; every fill commits the keys L1 lacks (like RemoteSync)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def fill(self, pool, keys, ttl_s, *, deadline=None) -> int:
        self.calls += 1
        if self.calls == 1:
            super().fill(pool, keys, ttl_s)
        filled = 0
        for key in keys:
            if pool.contains(key):
                continue
            res = pool.reserve([key], ttl_s)
            if res.num_chunks == 0:
                break
            filled += pool.commit(res.reservation_id)
        return filled


def _stored_prefix(store: MPStore, seed: int, chunks: int) -> tuple[list[bytes], list[bytes]]:
    """Saves ``chunks`` chunks; returns their keys and the keys of a prompt one chunk longer."""
    stored = prompt_keys(store.buffers, tokens_for(seed, chunks))
    assert store.save(store.reserve(stored), torch.arange(chunks * CHUNK)) == chunks
    longer = prompt_keys(store.buffers, tokens_for(seed, chunks + 1))
    assert longer[:chunks] == stored
    return stored, longer


def test_a_promotion_that_raises_answers_with_the_l1_prefix_and_pins_nothing_more(running_daemon) -> None:
    daemon, config = running_daemon, running_daemon.config
    store = MPStore(config, make_buffers(1))
    try:
        _, longer = _stored_prefix(store, 1, 2)
        daemon._state.remote = _BrokenRemote()
        lease = store.lookup(longer)
        assert lease.num_chunks == 2
        store.release(lease)
        assert daemon._state.pool.stats().leases == 0
    finally:
        store.close()


def test_a_lookup_queued_behind_a_promotion_of_its_keys_gets_them(running_daemon) -> None:
    daemon, config = running_daemon, running_daemon.config
    first, second = MPStore(config, make_buffers(1)), MPStore(config, make_buffers(1))
    try:
        keys = prompt_keys(first.buffers, tokens_for(3, 2))
        assert second.lookup(keys).num_chunks == 0  # both clients hold a session before the remote goes in
        daemon._state.remote = remote = _GatedRemote()
        got: dict[str, int] = {}
        a = threading.Thread(target=lambda: got.__setitem__("first", first.lookup(keys).num_chunks))
        a.start()
        assert remote.entered.wait(5)
        b = threading.Thread(target=lambda: got.__setitem__("second", second.lookup(keys).num_chunks))
        b.start()
        deadline = time.monotonic() + 5
        while daemon._promoter is None or daemon._promoter.pending < 2:  # the second LOOKUP is queued
            assert time.monotonic() < deadline
            time.sleep(0.005)
        remote.release.set()
        a.join(5)
        b.join(5)
        assert got == {"first": 2, "second": 2}
    finally:
        remote.release.set()
        first.close()
        second.close()


def test_a_reply_past_the_clients_deadline_releases_its_lease(impatient_daemon) -> None:
    daemon, config = impatient_daemon, impatient_daemon.config
    store = MPStore(config, make_buffers(1))
    try:
        _, longer = _stored_prefix(store, 1, 2)
        daemon._state.remote = remote = _StuckRemote()
        assert store.lookup(longer).num_chunks == 0  # the client gave up after 300 ms
        remote.release.set()
        deadline = time.monotonic() + 5
        while daemon._promoter is None or daemon._promoter.pending:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.05)  # the loop answers within a millisecond of the drain
        assert daemon._state.pool.stats().leases == 0, "nobody can release the lease of a reply nobody read"
    finally:
        remote.release.set()
        store.close()
