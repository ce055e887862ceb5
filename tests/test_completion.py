"""What runs after a queued copy: the slot check and the completion thread (CPU, fake events)."""

from __future__ import annotations

import threading

import pytest
import torch

from lmc_transfer.kernels import SlotRangeError
from lmc_transfer.transfer.completion import CompletionThread, SlotCheck


class FakeEvent:
    """Completes when the test says so; synchronize() blocks until then."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def complete(self) -> None:
        self._done.set()

    def synchronize(self) -> None:
        assert self._done.wait(timeout=10), "a fake event was never completed"


def test_slot_check_names_the_first_bad_slot_and_lets_padding_through_loads() -> None:
    SlotCheck(torch.tensor([0, 5, 7]), 8, padding_ok=False).raise_if_bad()
    SlotCheck(torch.tensor([0, -1, 7]), 8, padding_ok=True).raise_if_bad()
    with pytest.raises(SlotRangeError, match=r"slots\[1\] = -1 is outside the KV buffers' \[0, 8\)"):
        SlotCheck(torch.tensor([0, -1, 7]), 8, padding_ok=False).raise_if_bad()
    with pytest.raises(SlotRangeError, match=r"slots\[2\] = 8 is past the end of the KV buffers \(8 slots\)"):
        SlotCheck(torch.tensor([0, -1, 8]), 8, padding_ok=True).raise_if_bad()
    assert SlotCheck(torch.tensor([], dtype=torch.int64), 8, padding_ok=False).ready()


def test_callbacks_run_in_order_after_their_events_and_a_failure_is_logged(caplog) -> None:
    thread = CompletionThread("test-commits")
    ran: list[int] = []
    events = [FakeEvent() for _ in range(3)]

    def fail() -> None:
        raise RuntimeError("commit refused")

    thread.put(events[0], lambda: ran.append(0))
    thread.put(events[1], fail)
    thread.put(events[2], lambda: ran.append(2))
    assert not thread.drain(0.05) and ran == [] and thread.pending() == 3
    events[2].complete()  # later events wait for earlier ones: order is the queue's
    assert not thread.drain(0.05) and ran == []
    events[0].complete()
    events[1].complete()
    assert thread.drain(5) and ran == [0, 2] and thread.pending() == 0
    assert "a callback after a copy failed" in caplog.text and "commit refused" in caplog.text
    assert thread.close(5)
    with pytest.raises(RuntimeError, match="test-commits: closed"):
        thread.put(FakeEvent(), lambda: None)
