"""GPU-side counter waits (cuStreamWaitValue32 through ctypes)."""

from __future__ import annotations

import pytest
import torch

from lmc_transfer.kernels.stream_wait import stream_wait_supported, wait_counter


def test_cpu_has_no_stream_waits_and_cpu_counters_are_refused() -> None:
    assert stream_wait_supported(torch.device("cpu")) is False
    with pytest.raises(ValueError, match="counters: expected a contiguous torch.int32 CUDA tensor, got torch.int32 on cpu"):
        wait_counter(None, torch.zeros(2, dtype=torch.int32), 0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got torch.int64 on cpu"):
        wait_counter(None, torch.zeros(2, dtype=torch.int64), 0, 1)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_waiting_stream_runs_only_after_the_counter_is_reached() -> None:
    assert stream_wait_supported(torch.device("cuda"))
    counters = torch.zeros(2, dtype=torch.int32, device="cuda")
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    produced = torch.cuda.Event()
    with torch.cuda.stream(producer):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the counter moves
        counters[1:].fill_(3)
        produced.record(producer)
    marker = torch.zeros(1, dtype=torch.int32, device="cuda")
    wait_counter(consumer, counters, 1, 3)
    with torch.cuda.stream(consumer):
        marker.fill_(1)
    consumed = torch.cuda.Event()
    consumed.record(consumer)
    consumed.synchronize()
    assert produced.query(), "the consumer ran before the producer reached the counter"
    assert marker.item() == 1


@pytest.mark.gpu
def test_wait_argument_errors_on_gpu() -> None:
    counters = torch.zeros(2, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream()
    with pytest.raises(IndexError, match=r"index: expected an int in \[0, 2\), got 2"):
        wait_counter(stream, counters, 2, 1)
    with pytest.raises(ValueError, match=r"value: expected an int in \[0, 2\*\*31\), got -1"):
        wait_counter(stream, counters, 0, -1)
