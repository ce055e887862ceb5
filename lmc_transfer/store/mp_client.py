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

Trust: over ipc the client connects only through a private socket directory (this uid's, not
writable by others); with a token (``mp_auth_token``, or over TCP the token file the daemon
writes) it sends nothing but a nonce until the peer has proved it knows the token, and it
accepts only replies sealed with the session key (lmc_transfer.daemon.auth). The segment a
HELLO names is mapped only if it is this uid's, mode 0600. A peer that fails any check is an
``UntrustedDaemon``: treated like a daemon that is down, and logged.

Logging: the link to the daemon is logged at WARNING when it changes (unreachable, untrusted,
reachable again), never once per request.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import zmq

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.daemon import auth
from lmc_transfer.daemon.auth import SessionKey
from lmc_transfer.daemon.instance import read_token, token_path
from lmc_transfer.private_paths import check_private_dir
from lmc_transfer.daemon.messages import (
    AbortRequest,
    AuthRequest,
    Body,
    ChallengeReply,
    ChallengeRequest,
    ClearRequest,
    CommitRequest,
    HelloRequest,
    LookupRequest,
    ReleaseRequest,
    RequestBody,
    ReserveRequest,
    StatsReply,
    StatsRequest,
)
from lmc_transfer.daemon.protocol import (
    MAX_KEYS,
    ErrorCode,
    MsgType,
    ProtocolError,
    Request,
    decode_reply,
    encode_request,
)
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.keys import check_keys
from lmc_transfer.store.mapped_segment import MappedSegment
from lmc_transfer.store.base import (
    CacheStore,
    Lease,
    LoadResult,
    Reservation,
    StoreStats,
)
from lmc_transfer.store.slots import chunk_slots, lease_slots
from lmc_transfer.transfer.paths import Transfer
from lmc_transfer.transfer.store_copies import StoreCopies

log = logging.getLogger(__name__)

_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0
#: How long ``close`` waits for queued saves' copies (their COMMITs get a request timeout more).
_CLOSE_COPIES_S = 10.0
#: How long past a lease TTL a restarted daemon's old segment stays mapped for copies in flight.
_RETIRED_SEGMENT_MARGIN_S = 10.0


class DaemonUnavailable(ConnectionError):
    """No reply before the deadline (daemon down, slow, or not reachable)."""


class UntrustedDaemon(DaemonUnavailable):
    """The peer at the endpoint failed a check (private socket directory, token proof, segment
    owner and mode): nothing more is sent to it and its segment is not used."""


class DaemonError(RuntimeError):
    """The daemon answered with an error reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code


class StoreClosed(RuntimeError):
    """A call on an MPStore after its ``close()``."""


class _SessionLost(Exception):
    """The daemon does not know our session (it restarted, or forgot an idle session)."""


class DaemonConnection:
    """One DEALER socket to the daemon: request/reply with a deadline per call.

    Replies are matched by request id; a late reply to an earlier, timed-out
    request is discarded. After a timeout the socket is recreated, so nothing
    queued for a dead daemon is delivered to its successor. With a token (``token``,
    or read from ``token_file`` at each handshake) the first request authenticates
    (lmc_transfer.daemon.auth) and every later one is sealed with the session.
    """

    def __init__(self, url: str, token: str | None = None, *, token_file: Path | None = None) -> None:
        self.url = url
        self._token = token
        self._token_file = token_file
        self._auth: SessionKey | None = None
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)  # 0 is the id of replies to unparseable requests

    @classmethod
    def for_config(cls, config: LMCTransferConfig) -> "DaemonConnection":
        """The connection ``config`` describes: its token, or over TCP without one the daemon's token file."""
        auto = config.uses_tcp and config.mp_auth_token is None
        return cls(config.mp_url, config.mp_auth_token, token_file=token_path(config) if auto else None)

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            if self.url.startswith("ipc://"):
                self._check_ipc_directory()
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Queue only on a live connection: a send to a dead daemon fails fast.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            if self._needs_auth:
                # A session belongs to one connection: ZMQ must not reconnect this socket on its
                # own (to whoever holds the port by then); reset() opens a new one, which
                # authenticates before it sends anything else.
                sock.setsockopt(zmq.RECONNECT_IVL, -1)
            else:
                sock.setsockopt(zmq.RECONNECT_IVL, 20)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.connect(self.url)
            self._sock = sock
        return self._sock

    def _check_ipc_directory(self) -> None:
        # ZMQ reconnects to the path by itself: only a directory nobody else can write keeps
        # another user's socket from taking the place of the daemon's.
        directory = Path(self.url.removeprefix("ipc://")).parent
        try:
            check_private_dir(directory)
        except FileNotFoundError:
            raise DaemonUnavailable(f"no connection to {self.url}: {directory} does not exist") from None
        except PermissionError as exc:
            raise UntrustedDaemon(f"not connecting to {self.url}: {exc}") from None

    def reset(self) -> None:
        """Drop the socket (and with it the session): the next request starts afresh."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._auth = None

    def call(self, message: RequestBody, *, deadline: float) -> Body:
        """Send one typed request; its typed reply (``message.REPLY``)."""
        body = self.request(message.TYPE, message.encode(), message.frame_keys, deadline=deadline)
        try:
            return message.REPLY.decode(body)
        except ProtocolError as exc:
            raise DaemonError(ErrorCode.BAD_REQUEST, f"malformed {message.TYPE.value} reply: {exc}") from None

    def request(
        self,
        msg_type: MsgType,
        body: dict[str, Any] | None = None,
        keys: Sequence[bytes] = (),
        *,
        deadline: float,
    ) -> dict[str, Any]:
        """Send one request and wait for its reply until ``deadline`` (time.monotonic); the
        wire-level form of ``call`` (any body), authenticating first when there is a token."""
        body = body or {}
        if self._needs_auth and self._auth is None:
            self._handshake(deadline)
        try:
            return self._exchange(msg_type, body, keys, deadline, self._auth, self._auth)
        except _SessionLost:
            self._auth = None
        self._handshake(deadline)
        try:
            return self._exchange(msg_type, body, keys, deadline, self._auth, self._auth)
        except _SessionLost:
            self._auth = None
            raise DaemonError(ErrorCode.UNAUTHORIZED, "the daemon refused a session it had just opened") from None

    @property
    def _needs_auth(self) -> bool:
        return self._token is not None or self._token_file is not None

    def _handshake(self, deadline: float) -> None:
        token = self._read_token()
        client_nonce = auth.new_nonce()
        reply = self._exchange(MsgType.CHALLENGE, ChallengeRequest(client_nonce).encode(), (), deadline, None, None)
        try:
            challenge = ChallengeReply.decode(reply)
        except ProtocolError as exc:
            raise DaemonError(ErrorCode.BAD_REQUEST, f"malformed CHALLENGE reply: {exc}") from None
        if not auth.same(auth.daemon_proof(token, client_nonce, challenge.daemon_nonce), challenge.proof):
            self.reset()
            raise UntrustedDaemon(f"the peer at {self.url} did not prove it knows the token; nothing else was sent to it")
        session = auth.derive_session(token, client_nonce, challenge.daemon_nonce)
        proof = auth.client_proof(token, client_nonce, challenge.daemon_nonce)
        self._exchange(MsgType.AUTH, AuthRequest(challenge.daemon_nonce, proof).encode(), (), deadline, None, session)
        self._auth = session

    def _read_token(self) -> str:
        if self._token is not None:
            return self._token
        assert self._token_file is not None
        try:
            return read_token(self._token_file)
        except FileNotFoundError:
            raise DaemonUnavailable(
                f"no connection to {self.url}: no token file {self._token_file} (is the daemon running, "
                "with the same XDG_RUNTIME_DIR/TMPDIR?)"
            ) from None
        except PermissionError as exc:
            raise UntrustedDaemon(f"not connecting to {self.url}: {exc}") from None

    def _exchange(self, msg_type: MsgType, body: dict[str, Any], keys: Sequence[bytes], deadline: float,
                  send_auth: SessionKey | None, reply_auth: SessionKey | None) -> dict[str, Any]:
        """One round trip: the request sealed with ``send_auth``, the reply required sealed with
        ``reply_auth`` (other replies are not the daemon's and are ignored)."""
        sock = self._socket()
        request_id = next(self._ids)
        frames = encode_request(Request(msg_type, request_id, body, tuple(keys), send_auth))
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
                reply = decode_reply(sock.recv_multipart(), reply_auth)
            except zmq.Again:
                self.reset()
                raise DaemonUnavailable(f"{msg_type.value} to {self.url} timed out") from None
            except ProtocolError:
                continue
            if reply.request_id != request_id:
                continue  # late reply to a request we gave up on
            if reply_auth is not None and reply.auth is None:
                # Unsealed where a sealed reply is due: only "unauthorized" means anything.
                if reply.ok or reply.code is not ErrorCode.UNAUTHORIZED:
                    continue
                if send_auth is not None:
                    raise _SessionLost()
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


def _check_ids(values: tuple[int, ...], name: str, limit: int, upper: int) -> tuple[int, ...]:
    """``values`` after checking a reply holds at most ``limit`` of them, each below ``upper``."""
    if len(values) > limit or (values and max(values) >= upper):
        raise DaemonError(ErrorCode.BAD_REQUEST, f"reply field {name} is not a list of at most {limit} ints in [0, {upper})")
    return values


class _Link(enum.Enum):
    """What the store last knew about the daemon (logged when it changes)."""

    UP = "reachable"
    DOWN = "unreachable"
    UNTRUSTED = "untrusted"


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
        self._conn = DaemonConnection.for_config(config)
        self._transfer = Transfer.for_config(buffers, config)
        self._copies = StoreCopies(self._transfer, "mp-store")
        self._lock = threading.RLock()
        self._session: _Session | None = None
        self._segment: MappedSegment | None = None  # stays mapped across a failed session
        # Segments of an earlier daemon, with when they may be unmapped (see _retire_segment).
        self._retired: list[tuple[float, MappedSegment]] = []
        self._backoff_s = 0.0
        self._next_attempt = 0.0
        self._local_ids = itertools.count(1)  # 0 is every empty lease/reservation
        self._leases: dict[int, _Handle] = {}
        self._reservations: dict[int, _Handle] = {}
        self._stats = StoreStats()
        self._reconnects = 0
        self._link: _Link | None = None
        self._error_codes_seen: set[ErrorCode] = set()
        self._closed = False
        try:
            self._hello(time.monotonic() + config.request_timeout_ms / 1000)
        except DaemonUnavailable as exc:
            self._fail(exc)
        except DaemonError as exc:
            self.close()
            raise ValueError(f"cache daemon at {config.mp_url} refused this engine: {exc}") from None

    # -- session -------------------------------------------------------------

    def _hello(self, deadline: float) -> _Session:
        reply = self._conn.call(HelloRequest(self.buffers.geometry, self.chunk_size, self.client_id), deadline=deadline)
        if reply.slab_bytes != self.slab_bytes:
            raise DaemonError(ErrorCode.GEOMETRY, f"daemon slabs are {reply.slab_bytes} bytes, this engine needs {self.slab_bytes}")
        self._close_retired(time.monotonic())
        if self._segment is None or self._segment.name != reply.segment:
            if self._segment is not None:
                self._retire_segment(self._segment)
                self._segment = None
            self._segment = self._open_segment(reply.segment, reply.num_slabs, reply.slab_bytes)
        self._session = _Session(reply.epoch, self._segment, reply.lease_ttl_s)
        self._backoff_s = 0.0
        self._reconnects += 1
        self._set_link(_Link.UP, f"epoch {reply.epoch}, segment {reply.segment}")
        return self._session

    def _retire_segment(self, segment: MappedSegment) -> None:
        """Keep a restarted daemon's old segment mapped for a while instead of unmapping it now.

        Copies queued by callers that drive the kernels themselves (LayerwiseStore) may still
        target the old mapping. Waiting for them would take a device-wide synchronize, which
        also waits for the engine's forward pass; instead the mapping stays registered for a
        lease TTL (no copy may start later than that on an old lease or reservation) plus a
        margin for copies in flight, and is unmapped at the next HELLO after that or at close.
        """
        ttl = self._session.lease_ttl_s if self._session is not None else self.config.lease_ttl_s
        self._retired.append((time.monotonic() + ttl + _RETIRED_SEGMENT_MARGIN_S, segment))

    def _close_retired(self, now: float) -> None:
        keep = []
        for until, segment in self._retired:
            if until <= now:
                segment.close()
            else:
                keep.append((until, segment))
        self._retired = keep

    def _open_segment(self, name: str, num_slabs: int, slab_bytes: int) -> MappedSegment:
        if not name.startswith("/lmct-"):
            raise UntrustedDaemon(f"HELLO from {self.config.mp_url} names segment {name!r:.80}, not one of lmc-transfer's")
        try:
            return MappedSegment.open(name, num_slabs, slab_bytes)
        except PermissionError as exc:
            raise UntrustedDaemon(f"not mapping the segment the daemon at {self.config.mp_url} named: {exc}") from None
        except (OSError, ValueError) as exc:
            raise DaemonUnavailable(f"segment {name} of the daemon at {self.config.mp_url}: {exc}") from None

    def _fail(self, exc: DaemonUnavailable) -> None:
        self._session = None
        self._backoff_s = min(max(2 * self._backoff_s, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
        self._next_attempt = time.monotonic() + self._backoff_s
        self._set_link(_Link.UNTRUSTED if isinstance(exc, UntrustedDaemon) else _Link.DOWN, str(exc))

    def _set_link(self, link: _Link, detail: str) -> None:
        """Log a change of what the store knows about the daemon, once per change."""
        previous, self._link = self._link, link
        if link is previous:
            return
        if link is _Link.UP:
            if previous is None:
                log.info("cache daemon at %s: connected (%s)", self.config.mp_url, detail)
            else:
                log.warning("cache daemon at %s: reachable again (%s)", self.config.mp_url, detail)
            return
        log.warning("cache daemon at %s %s: %s; lookups miss and stores are dropped until it answers",
                    self.config.mp_url, link.value, detail)

    def _note_error(self, exc: DaemonError) -> None:
        """An error reply: the daemon is up but refused a request; logged once per error code."""
        if exc.code not in self._error_codes_seen:
            self._error_codes_seen.add(exc.code)
            log.warning("cache daemon at %s refused a request: %s (further %s errors are counted, not logged)",
                        self.config.mp_url, exc, exc.code.value)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"this MPStore (cache daemon at {self.config.mp_url}) is closed")

    def _call(self, message: Callable[[str], RequestBody], deadline: float) -> tuple[_Session, Any]:
        """A pool request under the current session (``message(epoch)``), (re)establishing it
        first if needed; its typed reply.

        Raises DaemonUnavailable (also while backing off) or DaemonError.
        """
        self._check_open()
        for attempt in range(2):
            session = self._session
            if session is None:
                if time.monotonic() < self._next_attempt:
                    raise DaemonUnavailable("daemon unavailable; backing off")
                try:
                    session = self._hello(deadline)
                except DaemonUnavailable as exc:
                    self._fail(exc)
                    raise
                except DaemonError as exc:
                    self._fail(DaemonUnavailable(f"HELLO to {self.config.mp_url} refused: {exc}"))
                    raise DaemonUnavailable(f"HELLO to {self.config.mp_url} failed") from None
            try:
                return session, self._conn.call(message(session.epoch), deadline=deadline)
            except DaemonUnavailable as exc:
                self._fail(exc)
                raise
            except DaemonError as exc:
                if exc.code is not ErrorCode.HELLO_REQUIRED or attempt:
                    self._note_error(exc)
                    raise
                self._session = None  # the daemon restarted: HELLO again now, once
        raise AssertionError("unreachable")

    def _deadline(self, msg_type: MsgType) -> float:
        ms = self.config.lookup_timeout_ms if msg_type is MsgType.LOOKUP else self.config.request_timeout_ms
        return time.monotonic() + ms / 1000

    @property
    def lease_ttl_s(self) -> float:
        """The daemon's lease TTL (its HELLO reply), the config's before the first session."""
        session = self._session
        return session.lease_ttl_s if session is not None else self.config.lease_ttl_s

    # -- loads ---------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> Lease:
        keys = check_keys(keys, limit=MAX_KEYS)
        with self._lock:
            self._check_open()
            start = time.monotonic()
            empty = Lease(lease_id=0, keys=keys, slab_ids=(), generations=(), deadline=start)
            if not keys:
                self._stats.count_lookup(empty)
                return empty
            try:
                session, reply = self._call(lambda epoch: LookupRequest(epoch, keys), self._deadline(MsgType.LOOKUP))
                slab_ids = _check_ids(reply.slab_ids, "slab_ids", len(keys), session.segment.num_slabs)
                gens = reply.generations
                if len(gens) != len(slab_ids):
                    raise DaemonError(ErrorCode.BAD_REQUEST, "LOOKUP reply: slab_ids and generations differ in length")
            except (DaemonUnavailable, DaemonError):  # logged when the link changes (_call)
                self._stats.count_lookup(empty)
                return empty
            lease = empty
            if slab_ids:
                local_id = next(self._local_ids)
                self._leases[local_id] = _Handle(session.epoch, reply.lease_id)
                lease = Lease(local_id, keys, slab_ids, gens, start + session.lease_ttl_s)
            self._stats.count_lookup(lease)
            return lease

    def load(self, lease: Lease, slots: torch.Tensor, layers: range | None = None) -> LoadResult:
        slots = lease_slots(lease, slots, self.chunk_size, self.buffers.device)
        n = lease.num_chunks
        if n == 0:
            return LoadResult(0, 0)
        layer_count = self.buffers.num_layers if layers is None else len(layers)
        bytes_per_chunk = layer_count * self.buffers.geometry.layer_bytes(self.chunk_size)
        with self._lock:
            session = self._session_for(self._leases.get(lease.lease_id))
            ok = 0
            if session is not None and self.has_time_for_copy(lease.deadline):
                # Returns once this copy has landed (its own event), so the generations are checked after it.
                self._copies.load(slots, [session.segment.slab(s) for s in lease.slab_ids], layers)
                ok = self._verify_in(session, lease.slab_ids, lease.generations)
            self._stats.count_load(lease, ok, bytes_per_chunk)
            return LoadResult(ok, ok * self.chunk_size)

    def release(self, lease: Lease) -> None:
        with self._lock:
            handle = self._leases.pop(lease.lease_id, None)
            if handle is None or self._session_for(handle) is None:
                return
            try:
                self._call(lambda epoch: ReleaseRequest(epoch, handle.remote_id), self._deadline(MsgType.RELEASE))
            except (DaemonUnavailable, DaemonError):
                pass  # not delivered: the lease expires (logged when the link changes)

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
            self._check_open()
            empty = Reservation(0, keys, (), (), (), time.monotonic())
            if not keys:
                return empty
            start = time.monotonic()
            try:
                session, reply = self._call(lambda epoch: ReserveRequest(epoch, keys), self._deadline(MsgType.RESERVE))
                indices = _check_ids(reply.chunk_indices, "chunk_indices", len(keys), len(keys))
                slab_ids = _check_ids(reply.slab_ids, "slab_ids", len(keys), session.segment.num_slabs)
                gens = reply.generations
                if not len(indices) == len(slab_ids) == len(gens) or list(indices) != sorted(set(indices)):
                    raise DaemonError(ErrorCode.BAD_REQUEST, "RESERVE reply: inconsistent chunk_indices/slab_ids/generations")
                no_room = reply.no_room
                if not 0 <= no_room <= len(keys) - len(slab_ids):
                    raise DaemonError(ErrorCode.BAD_REQUEST, f"RESERVE reply: no_room must be in [0, {len(keys) - len(slab_ids)}], got {no_room}")
            except (DaemonUnavailable, DaemonError):  # logged when the link changes (_call)
                self._stats.dropped_chunks += len(keys)
                return empty
            res = dataclasses.replace(empty, no_room=no_room)
            if slab_ids:
                local_id = next(self._local_ids)
                self._reservations[local_id] = _Handle(session.epoch, reply.reservation_id)
                res = Reservation(local_id, keys, indices, slab_ids, gens, start + session.lease_ttl_s, no_room)
            self._stats.count_reserve(res)
            return res

    def save(self, reservation: Reservation, slots: torch.Tensor) -> int:
        with self._aborting_on_error(reservation):
            selected = chunk_slots(reservation, slots, self.chunk_size, self.buffers.device)
        if reservation.num_chunks == 0:
            return 0
        with self._lock:
            session = self._session_for(self._reservations.get(reservation.reservation_id))
            if session is None or not self.has_time_for_copy(reservation.deadline):
                self.abort(reservation)
                self._stats.count_commit(reservation, 0, self.slab_bytes)
                return 0
            with self._aborting_on_error(reservation):
                # On CUDA the commit follows on the completion thread once the gather has finished.
                return self._copies.save(selected, [session.segment.slab(s) for s in reservation.slab_ids],
                                         commit=lambda: self.commit(reservation),
                                         abort=lambda: self.abort(reservation), queued=reservation.num_chunks)

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
                    _, reply = self._call(lambda epoch: CommitRequest(epoch, handle.remote_id), self._deadline(MsgType.COMMIT))
                    committed = min(reply.committed, n)
                except (DaemonUnavailable, DaemonError):
                    pass  # the store is dropped and counted (logged when the link changes)
            self._stats.count_commit(reservation, committed, self.slab_bytes)
            return committed

    def abort(self, reservation: Reservation) -> None:
        with self._lock:
            handle = self._reservations.pop(reservation.reservation_id, None)
            if self._session_for(handle) is None:
                return
            try:
                self._call(lambda epoch: AbortRequest(epoch, handle.remote_id), self._deadline(MsgType.ABORT))
            except (DaemonUnavailable, DaemonError):
                pass  # not delivered: the reservation expires (logged when the link changes)

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

    def daemon_stats(self) -> StatsReply | None:
        """The daemon's STATS reply, or None when it does not answer in time."""
        with self._lock:
            self._check_open()
            try:
                return self._conn.call(StatsRequest(), deadline=self._deadline(MsgType.STATS))
            except (DaemonUnavailable, DaemonError):
                return None

    def clear(self) -> None:
        with self._lock:
            self._check_open()
            try:
                self._conn.call(ClearRequest(), deadline=self._deadline(MsgType.CLEAR))
            except (DaemonUnavailable, DaemonError) as exc:
                log.warning("CLEAR not delivered: %s", exc)

    def flush_stores(self, timeout_s: float) -> bool:
        """Wait (bounded) until every queued ``save`` has committed; True when none is left."""
        return self._copies.drain(timeout_s)

    def close(self) -> None:
        """Unmap the segment and close the socket; later lookups and stores raise StoreClosed
        (release and abort of what is left do nothing). Idempotent."""
        # Before taking the lock: the commits still queued take it.
        self._copies.close(self.config.request_timeout_ms / 1000 + _CLOSE_COPIES_S)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._session = None
            if self._segment is not None:
                self._segment.close()
                self._segment = None
            self._close_retired(float("inf"))
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


