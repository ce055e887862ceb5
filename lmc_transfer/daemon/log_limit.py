"""Error logging that a flood of bad requests cannot turn into a full disk."""

from __future__ import annotations

import logging
import time
from typing import Callable


class RateLimitedLog:
    """At most ``burst`` records per ``period_s`` through ``logger``; the ones held back are
    counted, and the next record let through says how many there were."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, period_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or not period_s > 0:
            raise ValueError(f"burst must be >= 1 and period_s > 0, got {burst} and {period_s}")
        self._logger = logger
        self._burst = burst
        self._period_s = period_s
        self._clock = clock
        self._window_start = -float("inf")
        self._in_window = 0
        self.suppressed = 0  # held back since the last record let through

    def error(self, message: str, *, exc_info: BaseException | None = None) -> None:
        now = self._clock()
        if now - self._window_start >= self._period_s:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self._burst:
            self.suppressed += 1
            return
        self._in_window += 1
        if self.suppressed:
            message = f"{message} ({self.suppressed} similar errors not logged before this one)"
            self.suppressed = 0
        self._logger.error("%s", message, exc_info=exc_info)
