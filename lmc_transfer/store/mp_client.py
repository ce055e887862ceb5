"""MP-mode client: a CacheStore whose pool lives in the cache daemon.

Only keys, slab ids and lease ids cross the socket. The KV bytes move between the
engine's GPU slots and the daemon's shared-memory slabs with the engine's own
kernels (the segment is registered with cudaHostRegister once per mapping).

Failure model: every request has a deadline (``lookup_timeout_ms`` for LOOKUP,
``request_timeout_ms`` for everything else). When the daemon is down, slow or
restarting, ``lookup`` returns an empty lease (a miss), ``reserve``/``commit``
drop the store and count it in ``StoreStats.dropped_chunks``, and ``release`` /
``abort`` give up quietly (the daemon's lease expiry cleans up). Nothing waits
past the deadline.

Reconnection is lazy: there is no background thread. After a failure the client
waits a backoff (50 ms doubling up to 2 s) during which calls fail fast; the next
call after it re-sends HELLO inside that call's own deadline. A daemon restart
shows up as a new epoch: the client re-maps the new segment, and leases and
reservations from the old daemon load nothing and commit nothing.

Lease and reservation ids handed to callers are local to this client and map to
(epoch, daemon id), so an id from a previous daemon can never be confused with
an id the new daemon reuses. One lock makes the store safe to share between threads.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import zmq

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.daemon.protocol import (
    MAX_KEYS,
    ErrorCode,
    MsgType,
    ProtocolError,
    Request,
    decode_reply,
    encode_request,
)
from lmc_transfer.keys import check_keys
from lmc_transfer.store.mapped_segment import MappedSegment
from lmc_transfer.store.base import (
    CacheStore,
    Lease,
    LoadResult,
    Reservation,
    StoreStats,
)
from lmc_transfer.transfer.paths import Transfer, TransferPath
from lmc_transfer.transfer.store_copies import StoreCopies

log = logging.getLogger(__name__)

_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0
#: A load or store starts only with this much lease time left (capped at a quarter of the TTL).
_MIN_TIME_LEFT_S = 1.0
#: How long ``close`` waits for queued saves' copies (their COMMITs get a request timeout more).
_CLOSE_COPIES_S = 10.0


class DaemonUnavailable(ConnectionError):
    """No reply before the deadline (daemon down, slow, or not reachable)."""


class DaemonError(RuntimeError):
    """The daemon answered with an error reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code


class DaemonConnection:
    """One DEALER socket to the daemon: request/reply with a deadline per call.

    Replies are matched by request id; a late reply to an earlier, timed-out
    request is discarded. After a timeout the socket is recreated, so nothing
    queued for a dead daemon is delivered to its successor.
    """

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self._token = token
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)  # 0 is the id of replies to unparseable requests

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Queue only on a live connection: a send to a dead daemon fails fast.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 20)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.connect(self.url)
            self._sock = sock
        return self._sock

    def reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request(
        self,
        msg_type: MsgType,
        body: dict[str, Any] | None = None,
        keys: Sequence[bytes] = (),
        *,
        deadline: float,
    ) -> dict[str, Any]:
        """Send one request and wait for its reply until ``deadline`` (time.monotonic)."""
        sock = self._socket()
        request_id = next(self._ids)
        frames = encode_request(Request(msg_type, request_id, body or {}, tuple(keys), self._token))
        # Blocking calls bounded by SNDTIMEO/RCVTIMEO rather than poll() + NOBLOCK:
        # one wake-up less per direction, a third of a small LOOKUP's round trip.
        # With IMMEDIATE set, a send to a daemon that is not connected times out.
        remaining = _remaining_ms(deadline)
        if remaining <= 0:
            raise DaemonUnavailable(f"{msg_type.value} to {self.url}: deadline already passed")
        sock.setsockopt(zmq.SNDTIMEO, remaining)
        try:
            sock.send_multipart(frames)
        except zmq.Again:
            self.reset()
            raise DaemonUnavailable(f"no connection to {self.url} before the deadline") from None
        while True:
            remaining = _remaining_ms(deadline)
            if remaining <= 0:
                self.reset()
                raise DaemonUnavailable(f"{msg_type.value} to {self.url} timed out")
            sock.setsockopt(zmq.RCVTIMEO, remaining)
            try:
                reply = decode_reply(sock.recv_multipart())
            except zmq.Again:
                self.reset()
                raise DaemonUnavailable(f"{msg_type.value} to {self.url} timed out") from None
            except ProtocolError:
                continue
            if reply.request_id != request_id:
                continue  # late reply to a request we gave up on
            if not reply.ok:
                raise DaemonError(reply.code or ErrorCode.INTERNAL, reply.error or "")
            return reply.body

    def close(self) -> None:
        self.reset()
        self._ctx.term()


def _remaining_ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))


@dataclass(frozen=True)
class _Session:
    """What one successful HELLO established."""

    epoch: str
    segment: MappedSegment
    lease_ttl_s: float


@dataclass(frozen=True)
class _Handle:
    epoch: str
    remote_id: int


def _int_list(body: dict[str, Any], name: str, limit: int, upper: int) -> list[int]:
    value = body.get(name)
    # Whole-list checks in C: this runs on every LOOKUP of up to MAX_KEYS ids.
    if (
        not isinstance(value, list)
        or len(value) > limit
        or (value and (set(map(type, value)) != {int} or min(value) < 0 or max(value) >= upper))
    ):
        raise DaemonError(ErrorCode.BAD_REQUEST, f"reply field {name} is not a list of at most {limit} ints in [0, {upper})")
    return value


class MPStore(CacheStore):
    """CacheStore backed by the cache daemon at ``config.mp_url``.

    The constructor tries one HELLO (within ``request_timeout_ms``); a daemon that is
    not up yet is not an error (every call is a miss until it is), but a daemon
    that refuses this engine's geometry or chunk size raises ValueError.
    """

    def __init__(self, config: LMCTransferConfig, buffers: KVBuffers, *, client_id: str | None = None) -> None:
        if not isinstance(buffers, KVBuffers):
            raise TypeError(f"buffers must be a KVBuffers, got {type(buffers).__name__}")
        self.config = config
        self.buffers = buffers
        self.chunk_size = config.chunk_size
        self.slab_bytes = buffers.geometry.slab_bytes(config.chunk_size)
        self.client_id = client_id or uuid.uuid4().hex
        self._conn = DaemonConnection(config.mp_url, config.mp_auth_token)
        self._transfer = Transfer(
            buffers,
            config.chunk_size,
            path=TransferPath(config.transfer_path),
            staging_bytes=config.staging_bytes,
            max_programs=config.max_programs,
        )
        self._copies = StoreCopies(self._transfer, "mp-store")
        self._lock = threading.RLock()
        self._session: _Session | None = None
        self._segment: MappedSegment | None = None  # stays mapped across a failed session
        self._backoff_s = 0.0
        self._next_attempt = 0.0
        self._local_ids = itertools.count(1)  # 0 is every empty lease/reservation
        self._leases: dict[int, _Handle] = {}
        self._reservations: dict[int, _Handle] = {}
        self._stats = StoreStats()
        self._reconnects = 0
        try:
            self._hello(time.monotonic() + config.request_timeout_ms / 1000)
        except DaemonUnavailable:
            self._fail()
        except DaemonError as exc:
            self.close()
            raise ValueError(f"cache daemon at {config.mp_url} refused this engine: {exc}") from None

    # -- session -------------------------------------------------------------

    def _hello(self, deadline: float) -> _Session:
        body = self._conn.request(
            MsgType.HELLO,
            {"geometry": self.buffers.geometry.to_dict(), "chunk_size": self.chunk_size, "client_id": self.client_id},
            deadline=deadline,
        )
        try:
            epoch, name = str(body["epoch"]), str(body["segment"])
            num_slabs, slab_bytes, ttl = int(body["num_slabs"]), int(body["slab_bytes"]), float(body["lease_ttl_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DaemonError(ErrorCode.BAD_REQUEST, f"malformed HELLO reply: {exc}") from None
        if slab_bytes != self.slab_bytes:
            raise DaemonError(ErrorCode.GEOMETRY, f"daemon slabs are {slab_bytes} bytes, this engine needs {self.slab_bytes}")
        if self._segment is None or self._segment.name != name:
            if self._segment is not None:
                # Copies queued by callers that drive the kernels themselves (LayerwiseStore)
                # may still target the old mapping: let them land before it is unregistered.
                if self.buffers.device.type == "cuda":
                    torch.cuda.synchronize(self.buffers.device)
                self._segment.close()
                self._segment = None
            self._segment = MappedSegment.open(name, num_slabs, slab_bytes)
        self._session = _Session(epoch, self._segment, ttl)
        self._backoff_s = 0.0
        self._reconnects += 1
        return self._session

    def _fail(self) -> None:
        self._session = None
        self._backoff_s = min(max(2 * self._backoff_s, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
        self._next_attempt = time.monotonic() + self._backoff_s

    def _call(self, msg_type: MsgType, body: dict[str, Any], keys: Sequence[bytes], deadline: float) -> tuple[_Session, dict[str, Any]]:
        """A pool request under the current session, (re)establishing it first if needed.

        Raises DaemonUnavailable (also while backing off) or DaemonError.
        """
        for attempt in range(2):
            session = self._session
            if session is None:
                if time.monotonic() < self._next_attempt:
                    raise DaemonUnavailable("daemon unavailable; backing off")
                try:
                    session = self._hello(deadline)
                except (DaemonUnavailable, DaemonError, OSError, ValueError):
                    self._fail()
                    raise DaemonUnavailable(f"HELLO to {self.config.mp_url} failed") from None
            try:
                return session, self._conn.request(msg_type, {**body, "epoch": session.epoch}, keys, deadline=deadline)
            except DaemonUnavailable:
                self._fail()
                raise
            except DaemonError as exc:
                if exc.code is not ErrorCode.HELLO_REQUIRED or attempt:
                    raise
                self._session = None  # the daemon restarted: HELLO again now, once
        raise AssertionError("unreachable")

    def _deadline(self, msg_type: MsgType) -> float:
        ms = self.config.lookup_timeout_ms if msg_type is MsgType.LOOKUP else self.config.request_timeout_ms
        return time.monotonic() + ms / 1000

    def _time_left_ok(self, deadline: float, session: _Session) -> bool:
        return deadline - time.monotonic() >= min(_MIN_TIME_LEFT_S, session.lease_ttl_s / 4)

    # -- loads ---------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> Lease:
        keys = check_keys(keys, limit=MAX_KEYS)
        with self._lock:
            start = time.monotonic()
            self._stats.lookups += 1
            empty = Lease(lease_id=0, keys=keys, slab_ids=(), generations=(), deadline=start)
            if not keys:
                return empty
            try:
                session, body = self._call(MsgType.LOOKUP, {}, keys, self._deadline(MsgType.LOOKUP))
                remote_id = int(body["lease_id"])
                slab_ids = _int_list(body, "slab_ids", len(keys), session.segment.num_slabs)
                gens = _int_list(body, "generations", len(keys), 2**64)
                if len(gens) != len(slab_ids):
                    raise DaemonError(ErrorCode.BAD_REQUEST, "LOOKUP reply: slab_ids and generations differ in length")
            except (DaemonUnavailable, DaemonError, KeyError, TypeError, ValueError) as exc:
                log.debug("lookup is a miss: %s", exc)
                self._stats.miss_chunks += len(keys)
                return empty
            self._stats.hit_chunks += len(slab_ids)
            self._stats.miss_chunks += len(keys) - len(slab_ids)
            if not slab_ids:
                return empty
            local_id = next(self._local_ids)
            self._leases[local_id] = _Handle(session.epoch, remote_id)
            return Lease(local_id, keys, tuple(slab_ids), tuple(gens), start + session.lease_ttl_s)

    def load(self, lease: Lease, slots: torch.Tensor, layers: range | None = None) -> LoadResult:
        n = lease.num_chunks
        if n == 0:
            return LoadResult(0, 0)
        self._check_slots(slots, n * self.chunk_size, "slots")
        with self._lock:
            session = self._session_for(self._leases.get(lease.lease_id))
            if session is None or not self._time_left_ok(lease.deadline, session):
                self._stats.generation_misses += n
                return LoadResult(0, 0)
            # Returns once this copy has landed (its own event), so the generations are checked after it.
            self._copies.load(slots, [session.segment.slab(s) for s in lease.slab_ids], layers)
            ok = self._verify_in(session, lease.slab_ids, lease.generations)
            self._stats.generation_misses += n - ok
            layer_count = self.buffers.num_layers if layers is None else len(layers)
            self._stats.loaded_bytes += ok * layer_count * self.buffers.geometry.layer_bytes(self.chunk_size)
            return LoadResult(ok, ok * self.chunk_size)

    def release(self, lease: Lease) -> None:
        with self._lock:
            handle = self._leases.pop(lease.lease_id, None)
            if handle is None or self._session_for(handle) is None:
                return
            try:
                self._call(MsgType.RELEASE, {"lease_id": handle.remote_id}, (), self._deadline(MsgType.RELEASE))
            except (DaemonUnavailable, DaemonError) as exc:
                log.debug("release not delivered (the lease will expire): %s", exc)

    def verify(self, lease: Lease) -> int:
        with self._lock:
            session = self._session_for(self._leases.get(lease.lease_id))
            if session is None:
                return 0
            return self._verify_in(session, lease.slab_ids, lease.generations)

    # -- stores --------------------------------------------------------------

    def reserve(self, keys: Sequence[bytes]) -> Reservation:
        keys = check_keys(keys, limit=MAX_KEYS)
        with self._lock:
            empty = Reservation(0, keys, (), (), (), time.monotonic())
            if not keys:
                return empty
            start = time.monotonic()
            try:
                session, body = self._call(MsgType.RESERVE, {}, keys, self._deadline(MsgType.RESERVE))
                remote_id = int(body["reservation_id"])
                indices = _int_list(body, "chunk_indices", len(keys), len(keys))
                slab_ids = _int_list(body, "slab_ids", len(keys), session.segment.num_slabs)
                gens = _int_list(body, "generations", len(keys), 2**64)
                if not len(indices) == len(slab_ids) == len(gens) or indices != sorted(set(indices)):
                    raise DaemonError(ErrorCode.BAD_REQUEST, "RESERVE reply: inconsistent chunk_indices/slab_ids/generations")
            except (DaemonUnavailable, DaemonError, KeyError, TypeError, ValueError) as exc:
                log.debug("store dropped: %s", exc)
                self._stats.dropped_chunks += len(keys)
                return empty
            # Keys not handed out are cached already, being written, or past a full pool.
            self._stats.dedup_chunks += len(keys) - len(slab_ids)
            if not slab_ids:
                return empty
            local_id = next(self._local_ids)
            self._reservations[local_id] = _Handle(session.epoch, remote_id)
            return Reservation(local_id, keys, tuple(indices), tuple(slab_ids), tuple(gens), start + session.lease_ttl_s)

    def save(self, reservation: Reservation, slots: torch.Tensor) -> int:
        n = reservation.num_chunks
        if n == 0:
            return 0
        cs = self.chunk_size
        self._check_slots(slots, len(reservation.keys) * cs, "slots")
        with self._lock:
            session = self._session_for(self._reservations.get(reservation.reservation_id))
            if session is None or not self._time_left_ok(reservation.deadline, session):
                self.abort(reservation)
                self._stats.dropped_chunks += n
                return 0
            chunk_slots = torch.cat([slots[i * cs : (i + 1) * cs] for i in reservation.chunk_indices])
            try:
                # On CUDA the commit follows on the completion thread once the gather has finished.
                return self._copies.save(chunk_slots, [session.segment.slab(s) for s in reservation.slab_ids],
                                         commit=lambda: self.commit(reservation),
                                         abort=lambda: self.abort(reservation), queued=n)
            except BaseException:
                self.abort(reservation)  # never leave the keys "being written" until the TTL
                raise

    def commit(self, reservation: Reservation) -> int:
        n = reservation.num_chunks
        if n == 0:
            return 0
        with self._lock:
            handle = self._reservations.pop(reservation.reservation_id, None)
            committed = 0
            # Past its deadline the reservation is gone in the daemon too (its slabs quarantined):
            # nothing to publish, whatever the copy did.
            if self._session_for(handle) is not None and time.monotonic() < reservation.deadline:
                try:
                    _, body = self._call(MsgType.COMMIT, {"reservation_id": handle.remote_id}, (), self._deadline(MsgType.COMMIT))
                    committed = min(int(body["committed"]), n)
                except (DaemonUnavailable, DaemonError, KeyError, TypeError, ValueError) as exc:
                    log.debug("commit failed, store dropped: %s", exc)
            self._stats.stored_chunks += committed
            self._stats.stored_bytes += committed * self.slab_bytes
            self._stats.dropped_chunks += n - committed
            return committed

    def abort(self, reservation: Reservation) -> None:
        with self._lock:
            handle = self._reservations.pop(reservation.reservation_id, None)
            if self._session_for(handle) is None:
                return
            try:
                self._call(MsgType.ABORT, {"reservation_id": handle.remote_id}, (), self._deadline(MsgType.ABORT))
            except (DaemonUnavailable, DaemonError) as exc:
                log.debug("abort not delivered (the reservation will expire): %s", exc)

    # -- primitives ----------------------------------------------------------

    def slab_views(self, slab_ids: Sequence[int]) -> list[torch.Tensor]:
        with self._lock:
            if self._session is None:
                raise RuntimeError(f"no session with the cache daemon at {self.config.mp_url}")
            segment = self._session.segment
            for s in slab_ids:
                if not isinstance(s, int) or not 0 <= s < segment.num_slabs:
                    raise ValueError(f"slab_ids must be ints in [0, {segment.num_slabs}), got {s!r}")
            return [segment.slab(s) for s in slab_ids]

    def stats(self) -> StoreStats:
        with self._lock:
            return dataclasses.replace(
                self._stats, extra={"connected": float(self._session is not None), "sessions": float(self._reconnects)}
            )

    def daemon_stats(self) -> dict[str, Any] | None:
        """The daemon's STATS reply, or None when it does not answer in time."""
        with self._lock:
            try:
                return self._conn.request(MsgType.STATS, deadline=self._deadline(MsgType.STATS))
            except (DaemonUnavailable, DaemonError):
                return None

    def clear(self) -> None:
        with self._lock:
            try:
                self._conn.request(MsgType.CLEAR, deadline=self._deadline(MsgType.CLEAR))
            except (DaemonUnavailable, DaemonError) as exc:
                log.warning("CLEAR not delivered: %s", exc)

    def flush_stores(self, timeout_s: float) -> bool:
        """Wait (bounded) until every queued ``save`` has committed; True when none is left."""
        return self._copies.drain(timeout_s)

    def close(self) -> None:
        # Before taking the lock: the commits still queued take it.
        self._copies.close(self.config.request_timeout_ms / 1000 + _CLOSE_COPIES_S)
        with self._lock:
            self._session = None
            if self._segment is not None:
                self._segment.close()
                self._segment = None
            self._conn.close()

    # -- internals -----------------------------------------------------------

    def _session_for(self, handle: _Handle | None) -> _Session | None:
        """The current session if ``handle`` belongs to it (same daemon epoch)."""
        session = self._session
        if handle is None or session is None or session.epoch != handle.epoch:
            return None
        return session

    @staticmethod
    def _verify_in(session: _Session, slab_ids: Sequence[int], generations: Sequence[int]) -> int:
        current = session.segment.generations[np.asarray(slab_ids, dtype=np.int64)]
        same = current == np.asarray(generations, dtype=np.uint64)
        return len(slab_ids) if bool(same.all()) else int(np.argmin(same))

    def _check_slots(self, slots: torch.Tensor, expected: int, name: str) -> None:
        if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype != torch.int64:
            got = f"{slots.dtype} tensor of shape {tuple(slots.shape)}" if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise TypeError(f"{name} must be a 1-D int64 tensor, got {got}")
        if slots.numel() != expected:
            raise ValueError(f"{name} must hold {expected} slot indices, got {slots.numel()}")
        if slots.device != self.buffers.device:
            raise ValueError(f"{name} must be on the KV buffers' device {self.buffers.device}, got {slots.device}")


