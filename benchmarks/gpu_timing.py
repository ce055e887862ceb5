"""Shared GPU timing helpers for the benchmarks: CUDA-event medians and a result table."""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Callable

import torch


def cuda_median_ms(fn: Callable[[], object], *, iters: int = 10, warmup: int = 2,
                   stream: torch.cuda.Stream | None = None) -> float:
    """Median device time of ``fn`` (events recorded on ``stream``, default current)."""
    stream = stream or torch.cuda.current_stream()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def memcpy_ms(nbytes: int, *, to_device: bool, iters: int = 10) -> float:
    """Contiguous pinned host <-> device copy of ``nbytes``: the physical limit of a transfer."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    if to_device:
        return cuda_median_ms(lambda: dev.copy_(host, non_blocking=True), iters=iters)
    return cuda_median_ms(lambda: host.copy_(dev, non_blocking=True), iters=iters)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def run_header() -> str:
    """Card, date, commit and torch version of this run (the tables' heading)."""
    commit = os.environ.get("LMC_BENCH_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"### {card}, {datetime.date.today().isoformat()}, commit {commit}, torch {torch.__version__}"


@dataclass
class ResultTable:
    """Rows collected during a benchmark session, as markdown tables.

    With LMC_BENCH_REPORT set, the file is rewritten after every row, so a run stopped at its
    time limit still leaves every row measured so far.
    """

    rows: list[dict[str, object]] = field(default_factory=list)
    header: str | None = None

    def add(self, **row: object) -> None:
        self.rows.append(row)
        path = os.environ.get("LMC_BENCH_REPORT")
        if path:
            with open(path, "w") as f:
                f.write(self.heading() + "\n\n" + self.markdown() + "\n")

    def heading(self) -> str:
        if self.header is None:
            self.header = run_header()
        return self.header

    def markdown(self) -> str:
        if not self.rows:
            return ""
        groups: dict[tuple[str, ...], list[dict[str, object]]] = {}
        for row in self.rows:
            groups.setdefault(tuple(row), []).append(row)
        out = []
        for columns, rows in groups.items():
            out.append("| " + " | ".join(columns) + " |")
            out.append("|" + "---|" * len(columns))
            for row in rows:
                cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        return "\n".join(out)


RESULTS = ResultTable()
