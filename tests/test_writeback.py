"""WriteBehind: order, bounded queue that never blocks, logging once per state change, ticks, close."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from lmc_transfer.tiers.writeback import WriteBehind, WriteBehindStats

LOGGER = "lmc_transfer.tiers.writeback"


class GatedWriter:
    """Records items; blocks on each until ``gate`` is set; raises for items in ``fail``."""

    def __init__(self, fail: set[int] = frozenset()) -> None:
        self.items: list[int] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        self.fail = set(fail)

    def __call__(self, item: int) -> None:
        self.started.set()
        assert self.gate.wait(10)
        if item in self.fail:
            raise OSError(28, "No space left on device")
        self.items.append(item)


@pytest.fixture
def writers():
    made: list[WriteBehind] = []
    yield made
    for w in made:
        w.close(5)


def make(writers: list, write, **kw) -> WriteBehind:
    kw.setdefault("max_items", 4)
    w = WriteBehind("test-tier", write, **kw)
    writers.append(w)
    return w


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_items_are_written_in_order_and_flush_waits_for_them(writers):
    writer = GatedWriter()
    writer.gate.set()
    w = make(writers, writer, max_items=100)
    assert all(w.submit(i) for i in range(50))
    assert w.flush(5)
    assert writer.items == list(range(50))
    assert w.stats() == WriteBehindStats(submitted=50, dropped=0, written=50, failed=0, pending=0)


def test_a_full_queue_drops_without_blocking_and_logs_once_per_state_change(writers, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    writer = GatedWriter()
    w = make(writers, writer, max_items=3)
    assert w.submit(0)
    assert writer.started.wait(5)  # item 0 is in flight: it still counts against the bound
    results = []
    for i in range(1, 10):
        start = time.monotonic()
        results.append(w.submit(i))
        assert time.monotonic() - start < 0.05
    assert results == [True, True] + [False] * 7
    assert warnings(caplog) == ["test-tier: write-behind queue full (3 items); dropping writes until it drains"]
    assert not w.flush(0.05), "flush is bounded"
    writer.gate.set()
    assert w.flush(5)
    assert w.submit(10) and w.flush(5)
    assert writer.items == [0, 1, 2, 10]
    assert warnings(caplog)[1:] == ["test-tier: write-behind queue accepts writes again (7 dropped while full)"]
    assert w.stats() == WriteBehindStats(submitted=4, dropped=7, written=4, failed=0, pending=0)


def test_failing_writes_are_counted_and_logged_once_per_state_change(writers, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    writer = GatedWriter(fail={1, 2, 3})
    writer.gate.set()
    w = make(writers, writer, max_items=10)
    for i in range(6):
        w.submit(i)
    assert w.flush(5)
    assert writer.items == [0, 4, 5]
    assert warnings(caplog) == [
        "test-tier: write failed (OSError: [Errno 28] No space left on device); further failures are counted, "
        "not logged, until one succeeds",
        "test-tier: writes succeed again (3 failed meanwhile)",
    ]
    assert w.stats() == WriteBehindStats(submitted=6, dropped=0, written=3, failed=3, pending=0)


def test_tick_runs_after_items_and_when_the_wait_it_asked_for_is_over(writers):
    ticks: list[float] = []
    due: list[float | None] = [None]

    def tick() -> float | None:
        ticks.append(time.monotonic())
        return due[0]

    w = make(writers, lambda item: None, tick=tick)
    w.submit(1)
    assert w.flush(5)
    deadline = time.monotonic() + 5
    while len(ticks) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(0.2)
    assert len(ticks) == 1, "a tick that asks for nothing waits for the next item"
    due[0] = 0.05
    w.submit(2)
    deadline = time.monotonic() + 5
    while len(ticks) < 4:  # after item 2, then every 50 ms while idle
        assert time.monotonic() < deadline, ticks
        time.sleep(0.005)
    assert all(b - a >= 0.04 for a, b in zip(ticks[2:], ticks[3:]))


def test_close_writes_what_is_queued_or_drops_it_counted(writers):
    writer = GatedWriter()
    writer.gate.set()
    keep = make(writers, writer, max_items=10)
    for i in range(5):
        keep.submit(i)
    assert keep.close(5) and writer.items == list(range(5))
    assert not keep.submit(9) and keep.stats().dropped == 1

    gated = GatedWriter()
    drop = make(writers, gated, max_items=10)
    for i in range(5):
        drop.submit(i)
    assert gated.started.wait(5)
    gated.gate.set()
    assert drop.close(5, drop_queued=True)
    assert gated.items == [0] and drop.stats() == WriteBehindStats(5, 4, 1, 0, 0)


def test_close_joins_a_stuck_writer_for_a_bounded_time(writers, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    writer = GatedWriter()
    w = make(writers, writer)
    w.submit(0)
    assert writer.started.wait(5)
    start = time.monotonic()
    assert not w.close(0.2)
    assert time.monotonic() - start < 1
    assert warnings(caplog) == ["test-tier: write-behind still busy after 0.2s at close; abandoning 1 pending writes"]
    writer.gate.set()
    assert w.close(5), "a later close joins the thread once it is done"


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="max_items: expected an int >= 1, got 0"):
        WriteBehind("x", lambda item: None, max_items=0)
