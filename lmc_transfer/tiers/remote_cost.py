"""When a remote prefix is worth fetching: never when recomputing it would be faster.

A remote hit only helps if its chunks arrive before the engine could have recomputed them, so
every fill compares two estimates for the ``n`` chunks the remote holds:

    fetch(n)     = latency + n * value_bytes / bandwidth      (measured, ``ThroughputMeter``)
    recompute(n) = n * chunk_size * 2 * params / flops         (configured, ``RecomputeModel``)

and fetches the chunks only when ``fetch(k) < recompute(k)``, for ``k`` the chunks that fit
before the fill's deadline (``FetchPolicy.plan``). Both sides are linear in ``n``, so when the
remote's per-chunk transfer is no faster than a chunk's recompute no prefix can pay, and the fill
skips even the existence check (``FetchPolicy.worth_asking``): a skipped lookup costs no round
trip at all. ``2 * params`` FLOP per token is the dense forward pass without attention, so the
recompute estimate is a lower bound: the rule errs towards recomputing.

- Bandwidth and latency are exponentially weighted moving averages (``EWMA_ALPHA``) of what the
  tier observed: latency from every existence round trip, bandwidth from the bytes of every fetch
  (also one cut short by its deadline) over its duration less the latency.
- No bandwidth sample yet (the first fill): the fill probes, fetching the first
  ``probe_chunks`` chunks (one per connection) whatever they cost, and decides for the rest of its
  prefix with what the probe measured.
- While the rule says skip, one fill per ``probe_interval_s`` probes again, so the estimate
  follows the network instead of freezing on a bad moment.
- ``params`` is ``remote_model_params_b`` when set; otherwise ``estimate_params`` derives it from
  the KV geometry (a Llama-3-shaped dense model: see there), and ``flops`` is
  ``remote_recompute_tflops``, the effective prefill FLOP rate of the engine's GPU.

Nothing here talks to the network or imports redis or torch.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from lmc_transfer.kernels.geometry import KVGeometry

#: Weight of the newest sample in the moving averages: ~5 samples make up most of an estimate.
EWMA_ALPHA = 0.3
#: A fetch's transfer time is never taken as less than this share of its duration (latency noise).
_MIN_TRANSFER_SHARE = 0.5


@dataclass(frozen=True)
class Throughput:
    """What a tier delivers: ``bytes_per_s`` once a request is under way, after ``latency_s``."""

    bytes_per_s: float
    latency_s: float

    def fetch_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


class ThroughputMeter:
    """Moving averages of one tier's request latency and transfer bandwidth; thread-safe."""

    def __init__(self, alpha: float = EWMA_ALPHA) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha: expected a number in (0, 1], got {alpha!r}")
        self._alpha = alpha
        self._lock = threading.Lock()
        self._latency_s: float | None = None
        self._bytes_per_s: float | None = None

    def observe_round_trip(self, seconds: float) -> None:
        """A request whose reply carried (almost) no payload took ``seconds``."""
        with self._lock:
            self._latency_s = self._mix(self._latency_s, seconds)

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        """A fetch received ``nbytes`` in ``seconds`` (from its send to its last byte)."""
        if nbytes <= 0 or not seconds > 0:
            return
        with self._lock:
            latency = self._latency_s or 0.0
            transfer_s = max(seconds - latency, _MIN_TRANSFER_SHARE * seconds)
            self._bytes_per_s = self._mix(self._bytes_per_s, nbytes / transfer_s)

    def estimate(self) -> Throughput | None:
        """None until a fetch has been measured."""
        with self._lock:
            if self._bytes_per_s is None:
                return None
            return Throughput(self._bytes_per_s, self._latency_s or 0.0)

    def _mix(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self._alpha * (sample - old)


#: ``estimate_params``: hidden size = this many times the width of a token's K row (GQA ratio 4).
_HIDDEN_PER_KV_WIDTH = 4
#: ``estimate_params``: parameters per layer = this many times hidden size squared (attention 4h²,
#: MLP 8h²).
_PARAMS_PER_HIDDEN_SQUARED = 12


def estimate_params(geometry: KVGeometry) -> float:
    """Parameters of the model behind ``geometry``, for when none is configured.

    ``12 * num_layers * hidden**2`` with ``hidden = 4 * w``, ``w`` the elements of one token's
    first plane in one layer (K heads x head dim; the latent width for MLA): the shape of
    Llama-3-8B and Mistral-7B (8 KV heads x 128, hidden 4096: 6.4e9, the real models have 7-8e9).
    It under-estimates models with more query heads per KV head (Llama-3-70B: 1.6e10 for 7e10),
    MoE models' active parameters (DeepSeek-V3: 3.9e9 for 3.7e10) and tensor-parallel ranks,
    whose geometry holds only their share of the KV heads: the rule then recomputes more often
    than it must. It over-estimates models without grouped KV heads (Llama-2-7B: 1e11 for 7e9),
    which may then fetch a prefix that is slower than recomputing it: set
    ``remote_model_params_b`` for those.
    """
    width = math.prod(geometry.plane_shapes[0])
    hidden = _HIDDEN_PER_KV_WIDTH * width
    return float(_PARAMS_PER_HIDDEN_SQUARED * geometry.num_layers * hidden * hidden)


@dataclass(frozen=True)
class RecomputeModel:
    """How long the engine takes to recompute tokens instead of loading them."""

    seconds_per_token: float

    def __post_init__(self) -> None:
        if not (self.seconds_per_token > 0 and math.isfinite(self.seconds_per_token)):
            raise ValueError(f"seconds_per_token: expected a finite number > 0, got {self.seconds_per_token!r}")

    @classmethod
    def from_flops(cls, params: float, flops_per_s: float) -> RecomputeModel:
        """A forward pass costs ``2 * params`` FLOP per token (attention left out: a lower bound)."""
        return cls(2.0 * params / flops_per_s)


@dataclass(frozen=True)
class FetchPlan:
    """``chunks`` to fetch now (0: skip); ``probe`` when they are fetched to measure the tier."""

    chunks: int
    probe: bool = False


class FetchPolicy:
    """The rule of the module docstring for chunks of ``chunk_size`` tokens in values of
    ``value_bytes``. Stateful only in when it last fetched (for the probe interval); thread-safe."""

    def __init__(
        self,
        recompute: RecomputeModel,
        chunk_size: int,
        value_bytes: int,
        *,
        probe_chunks: int,
        probe_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("chunk_size", chunk_size), ("value_bytes", value_bytes), ("probe_chunks", probe_chunks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not probe_interval_s > 0:
            raise ValueError(f"probe_interval_s: expected > 0, got {probe_interval_s!r}")
        self.recompute = recompute
        self.chunk_recompute_s = chunk_size * recompute.seconds_per_token
        self._value_bytes = value_bytes
        self._probe_chunks = probe_chunks
        self._probe_interval_s = probe_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_fetch_at: float | None = None

    def worth_asking(self, estimate: Throughput | None) -> bool:
        """Whether a fill should ask the remote at all: some prefix could pay, or a probe is due."""
        if estimate is None or self._probe_due():
            return True
        return self._chunk_transfer_s(estimate) < self.chunk_recompute_s

    def plan(self, present: int, estimate: Throughput | None, time_left_s: float) -> FetchPlan:
        """What to fetch of the ``present`` leading chunks the remote holds, ``time_left_s``
        before the fill's deadline."""
        if present <= 0 or time_left_s <= 0:
            return FetchPlan(0)
        if estimate is None or (not self._pays(present, estimate, time_left_s) and self._probe_due()):
            self._fetched()
            return FetchPlan(min(present, self._probe_chunks), probe=True)
        if not self._pays(present, estimate, time_left_s):
            return FetchPlan(0)
        self._fetched()
        return FetchPlan(self._fitting(present, estimate, time_left_s))

    def _pays(self, present: int, estimate: Throughput, time_left_s: float) -> bool:
        k = self._fitting(present, estimate, time_left_s)
        return k >= 1 and estimate.fetch_s(k * self._value_bytes) < k * self.chunk_recompute_s

    def _fitting(self, present: int, estimate: Throughput, time_left_s: float) -> int:
        """How many of ``present`` chunks the estimate says arrive before the deadline."""
        fit = (time_left_s - estimate.latency_s) / self._chunk_transfer_s(estimate)
        return max(0, min(present, math.floor(fit)))

    def _chunk_transfer_s(self, estimate: Throughput) -> float:
        return self._value_bytes / estimate.bytes_per_s

    def _probe_due(self) -> bool:
        with self._lock:
            return self._last_fetch_at is None or self._clock() - self._last_fetch_at >= self._probe_interval_s

    def _fetched(self) -> None:
        with self._lock:
            self._last_fetch_at = self._clock()
