"""The MP-mode cache daemon: one slab pool in shared memory, served over ZMQ.

    python -m lmc_transfer.daemon --config configs/example_config_mp.yaml
    lmc-transfer server --config configs/example_config_mp.yaml

Endpoint: ``config.mp_url`` (rules in lmc_transfer.config): an ipc socket by
default (the socket file gets mode 0600, its directory is created 0700; the
default directory must be private to this user), or ``tcp://<mp_host>:<mp_port>``
when those are set, which must be a loopback address unless ``allow_remote_tcp``
is true. One daemon per endpoint: a second one refuses to start, and a daemon
killed with -9 has its shared-memory segment unlinked by the next one
(lmc_transfer.daemon.instance).

Who may talk to it: over ipc, whoever can open the socket (only this uid: the socket is 0600
in a private directory). With a token (``mp_auth_token``, or over TCP without one a random
token per start, written 0600 beside the lock file for same-uid clients), only peers that
complete the handshake of lmc_transfer.daemon.auth; everything else they send is answered
``unauthorized`` and nothing about the pool.

The pool does not exist until the first HELLO: its geometry (and so the slab size)
comes from the engine. The segment then holds ``max_local_cpu_size // slab_bytes``
slabs; a later HELLO with another geometry or chunk size is refused. Every HELLO
reply carries the daemon's ``epoch`` (random per start); requests that touch the
pool must echo it, so a client of a previous daemon is told to HELLO again
instead of using lease or slab ids that mean something else now.

The loop is single-threaded: requests are handled one at a time (each is a few
dictionary operations). A LOOKUP that must bring chunks up from the disk or the
remote tier is handed to one promotion thread (lmc_transfer.daemon.promoter) and answered
when it is done, so slow tier I/O never delays other clients; a promotion stops
after half of ``lookup_timeout_ms`` and answers with what it has. Leases and
reservations expire (``lease_ttl_s``), so a dead engine pins nothing for long.
Any request that fails to parse or validate gets an error reply; the daemon
never dies on input, and logs unexpected errors at a bounded rate.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import zmq

from lmc_transfer.config import ConfigError, LMCTransferConfig, is_loopback, load_config, redact_url
from lmc_transfer.daemon.auth import SessionKey
from lmc_transfer.daemon.instance import AlreadyRunning, DaemonInstance, runtime_stem
from lmc_transfer.daemon.log_limit import RateLimitedLog
from lmc_transfer.daemon.messages import (
    AbortRequest,
    AuthRequest,
    Body,
    ChallengeRequest,
    ClearReply,
    ClearRequest,
    CommitReply,
    CommitRequest,
    DaemonCounters,
    EmptyReply,
    HelloReply,
    HelloRequest,
    LeaseReply,
    LookupRequest,
    PingReply,
    PingRequest,
    PoolCounters,
    PoolRequest,
    ReleaseRequest,
    ReservationReply,
    ReserveRequest,
    StatsReply,
    StatsRequest,
    decode_request_body,
)
from lmc_transfer.daemon.promoter import Deferred, Promoter
from lmc_transfer.daemon.protocol import ErrorCode, MsgType, ProtocolError, Reply, decode_request, encode_reply, request_id_of
from lmc_transfer.daemon.sessions import RecentTable, Sessions
from lmc_transfer.daemon.shm import SharedSegment, check_shm_space
from lmc_transfer.kernels.geometry import KVGeometry
from lmc_transfer.private_paths import ensure_private_dir
from lmc_transfer.store.base import Lease
from lmc_transfer.store.pool import SlabPool
from lmc_transfer.tiers.disk import DiskTier, check_root
from lmc_transfer.tiers.format import SlabFormat, geometry_digest
from lmc_transfer.tiers.remote_sync import RemoteSync, build_remote_sync

log = logging.getLogger("lmc_transfer.daemon.server")

#: Frames above this size make ZMQ drop the connection before we see them (memory
#: guard); anything smaller that breaks the protocol gets an error reply.
MAX_FRAME_BYTES = 1 << 20
_POLL_MS = 100
_CLIENT_IDLE_S = 600.0
_MAX_CLIENTS = 4096
#: On shutdown, how long queued remote writes may take before they are dropped.
_REMOTE_FLUSH_S = 5.0
#: While promotions run, the loop wakes this often to send their replies.
_PROMOTION_POLL_MS = 1
#: On shutdown, how long the promotion in progress may take (each step is bounded by timeouts).
_PROMOTER_JOIN_S = 30.0


@dataclass
class _Pool:
    """Everything that exists once the first HELLO has fixed the geometry."""

    geometry: KVGeometry
    digest: bytes
    segment: SharedSegment
    pool: SlabPool
    disk: DiskTier | None
    remote: RemoteSync | None


@dataclass(frozen=True)
class _Pending:
    """A request whose reply waits for the promotion thread."""

    request_id: int
    auth: SessionKey | None
    deferred: Deferred


def check_bind_address(config: LMCTransferConfig) -> str:
    """The endpoint to bind; refuses a non-loopback TCP host unless allowed."""
    url = config.mp_url
    if config.uses_tcp and not config.allow_remote_tcp and not is_loopback(config.tcp_host):
        raise ValueError(f"mp_host must be a loopback address unless allow_remote_tcp is true, got {config.tcp_host!r}")
    return url


class CacheDaemon:
    """Request handling plus the socket loop."""

    def __init__(self, config: LMCTransferConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.epoch = secrets.token_hex(8)
        self.counters = DaemonCounters()
        self._clock = clock
        self._state: _Pool | None = None
        self._clients: RecentTable[None] = RecentTable(_MAX_CLIENTS, _CLIENT_IDLE_S, clock)
        self._sessions = Sessions(config.mp_auth_token, clock)  # bind() adds a TCP token
        self._errors = RateLimitedLog(log, clock=clock)
        self._handlers: dict[MsgType, Callable[[Any], Body | Deferred]] = {
            MsgType.HELLO: self._hello,
            MsgType.LOOKUP: self._lookup,
            MsgType.RESERVE: self._reserve,
            MsgType.COMMIT: self._commit,
            MsgType.ABORT: self._abort,
            MsgType.RELEASE: self._release,
            MsgType.PING: self._ping,
            MsgType.STATS: self._stats,
            MsgType.CLEAR: self._clear,
        }
        self._ctx: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._ipc_path: Path | None = None
        self._instance: DaemonInstance | None = None
        self._promoter: Promoter | None = None
        self._promotion_stuck = False  # a promotion outlived shutdown: it may still write the segment
        self.endpoint: str | None = None

    # -- socket --------------------------------------------------------------

    def bind(self) -> str:
        """Take the endpoint (AlreadyRunning if a live daemon holds it) and listen on it."""
        url = check_bind_address(self.config)
        # Fail now, not at the first HELLO: the pool must fit in shared memory, the disk tier's root be private.
        check_shm_space(self.config.max_local_cpu_bytes)
        if self._disk_enabled:
            check_root(self.config.local_disk)
        stem = runtime_stem(self.config)
        ensure_private_dir(stem.parent)
        instance = DaemonInstance(stem)
        instance.acquire()
        try:
            instance.record_segment(None)
            auto_token = self.config.uses_tcp and self.config.mp_auth_token is None
            if auto_token:  # TCP is open to every local user: never without a token
                self._sessions = Sessions(instance.new_token(), self._clock)
            self._bind_socket(url)
        except BaseException:
            instance.release()
            raise
        self._instance = instance
        if auto_token:
            log.info("tcp without mp_auth_token: clients of uid %d read this start's token from %s",
                     os.getuid(), instance.token_path)
        log.info("lmc-transfer daemon listening on %s (pid %d, epoch %s)", self.endpoint, os.getpid(), self.epoch)
        return self.endpoint

    def _bind_socket(self, url: str) -> None:
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        # Replies to a peer that stopped reading are dropped, never block the loop.
        sock.setsockopt(zmq.SNDHWM, 10000)
        self._socket = sock
        if url.startswith("ipc://"):
            path = Path(url.removeprefix("ipc://"))
            old_umask = os.umask(0o177)  # the socket file is created 0600, no window
            try:
                sock.bind(url)  # replaces a dead daemon's socket file; the lock says none is alive
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            self._ipc_path = path
        else:
            try:
                sock.bind(url)
            except zmq.ZMQError as exc:  # e.g. another user's process holds the port
                raise OSError(f"cannot listen on {url}: {os.strerror(exc.errno)}") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve_forever(self, stop: threading.Event) -> None:
        assert self._socket is not None, "bind() first"
        sock = self._socket
        # A blocking recv bounded by RCVTIMEO wakes up faster than poll() + NOBLOCK
        # (one thread hand-off less per request); the timeout keeps expiry running.
        sock.setsockopt(zmq.RCVTIMEO, _POLL_MS)
        promoter = self._promoter = Promoter()
        polling_fast = False
        next_expire = 0.0
        try:
            while not stop.is_set():
                if polling_fast != (promoter.pending > 0):
                    polling_fast = not polling_fast
                    sock.setsockopt(zmq.RCVTIMEO, _PROMOTION_POLL_MS if polling_fast else _POLL_MS)
                try:
                    frames = sock.recv_multipart()
                except zmq.Again:
                    frames = None
                if frames is not None and len(frames) >= 2:  # else no identity + payload: nothing to reply to
                    outcome = self._begin(frames[1:])
                    if isinstance(outcome, list):
                        _send(sock, frames[0], outcome)
                    else:
                        promoter.submit((frames[0], frames[1:], outcome), outcome.deferred)
                for job in promoter.drain():
                    identity, request_frames, pending = job.ticket
                    _send(sock, identity, self._end(request_frames, pending, job.result, job.error))
                now = self._clock()
                if now >= next_expire:
                    next_expire = now + _POLL_MS / 1000
                    if self._state is not None:
                        self._state.pool.expire()
        finally:
            # No promotion may still write into the segment that close() unlinks.
            if not promoter.close(_PROMOTER_JOIN_S):
                log.error("a promotion still runs after %.0fs: the segment stays for the next daemon to reap",
                          _PROMOTER_JOIN_S)
                self._promotion_stuck = True
            self._promoter = None

    def close(self) -> None:
        """Flush the disk tier, unlink the segment and the ipc socket; idempotent."""
        if self._state is not None and not self._promotion_stuck:
            if self._state.remote is not None:
                if not self._state.remote.flush(_REMOTE_FLUSH_S):
                    log.warning("remote tier: writes still queued after %.1fs are dropped", _REMOTE_FLUSH_S)
                self._state.remote.close()
            if self._state.disk is not None:
                self._state.disk.close()
            self._state.segment.close()
            log.info("unlinked segment %s", self._state.segment.name)
            self._state = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._ipc_path is not None:
            self._ipc_path.unlink(missing_ok=True)
            self._ipc_path = None
        if self._instance is not None:
            self._instance.release()
            self._instance = None

    # -- requests ------------------------------------------------------------

    def _begin(self, frames: list[bytes]) -> list[bytes] | _Pending:
        """Reply frames, or the slow part of the reply for the promotion thread."""
        self.counters.requests += 1
        sealed_by: list[SessionKey] = []  # the request's session, once authorize() found it

        def authorize(msg_type: MsgType, session: str | None) -> SessionKey | None:
            key = self._sessions.authorize(msg_type, session)
            if key is not None:
                sealed_by.append(key)
            return key

        try:
            request = decode_request(frames, authorize)
            message = decode_request_body(request.type, request.body, request.keys)
            if isinstance(message, ChallengeRequest):
                return self._reply(request.request_id, None, self._sessions.challenge(message))
            if isinstance(message, AuthRequest):
                return self._reply(request.request_id, self._sessions.open(message), EmptyReply())
            body = self._handlers[request.type](message)
            if isinstance(body, Deferred):
                return _Pending(request.request_id, request.auth, body)
            return self._reply(request.request_id, request.auth, body)
        except Exception as exc:  # never die on a request
            return self._error_reply(frames, sealed_by[0] if sealed_by else None, exc)

    def _end(self, frames: list[bytes], pending: _Pending, result: Any, error: BaseException | None) -> list[bytes]:
        """The reply to a deferred request once its slow part returned ``result`` or raised ``error``."""
        if error is not None:
            return self._error_reply(frames, pending.auth, error)
        try:
            return self._reply(pending.request_id, pending.auth, pending.deferred.finish(result))
        except Exception as exc:
            return self._error_reply(frames, pending.auth, exc)

    @staticmethod
    def _reply(request_id: int, auth: SessionKey | None, body: Body) -> list[bytes]:
        return encode_reply(Reply(request_id=request_id, ok=True, body=body.encode(), auth=auth))

    def _error_reply(self, frames: list[bytes], auth: SessionKey | None, exc: BaseException) -> list[bytes]:
        self.counters.errors += 1
        if isinstance(exc, ProtocolError):
            code, error = exc.code, str(exc)
        else:
            self._errors.error("internal error while handling a request", exc_info=exc)
            code, error = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        return encode_reply(Reply(request_id=request_id_of(frames), ok=False, code=code, error=error, auth=auth))

    def _require_pool(self, message: PoolRequest) -> _Pool:
        epoch = message.epoch
        if self._state is None or epoch != self.epoch:
            raise ProtocolError(
                f"{message.TYPE.value} needs a HELLO to this daemon first (epoch {epoch!r:.64} is not the current one)",
                code=ErrorCode.HELLO_REQUIRED,
            )
        return self._state

    def _hello(self, message: HelloRequest) -> HelloReply:
        geometry, chunk_size = message.geometry, message.chunk_size
        try:
            slab_bytes = geometry.slab_bytes(chunk_size)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ProtocolError(f"HELLO geometry is invalid: {exc}", code=ErrorCode.GEOMETRY) from None
        if chunk_size != self.config.chunk_size:
            raise ProtocolError(
                f"chunk_size must be the daemon's {self.config.chunk_size}, got {chunk_size}", code=ErrorCode.GEOMETRY
            )
        digest = geometry_digest(geometry, chunk_size)
        if self._state is None:
            self._state = self._create_pool(geometry, digest, slab_bytes)
        elif digest != self._state.digest:
            raise ProtocolError(
                f"geometry {geometry.to_dict()} differs from the pool's {self._state.geometry.to_dict()}",
                code=ErrorCode.GEOMETRY,
            )
        self._clients.put(message.client_id, None)
        segment = self._state.segment
        return HelloReply(self.epoch, segment.name, segment.num_slabs, segment.slab_bytes, chunk_size,
                          self.config.lease_ttl_s)

    def _create_pool(self, geometry: KVGeometry, digest: bytes, slab_bytes: int) -> _Pool:
        num_slabs = self.config.max_local_cpu_bytes // slab_bytes
        if num_slabs < 1:
            raise ProtocolError(
                f"max_local_cpu_size ({self.config.max_local_cpu_bytes} bytes) cannot hold one slab of {slab_bytes} bytes",
                code=ErrorCode.GEOMETRY,
            )
        segment = SharedSegment.create(num_slabs, slab_bytes)
        disk = remote = None
        try:
            if self._instance is not None:
                self._instance.record_segment(segment.name)
            slab_format = SlabFormat(digest, slab_bytes)
            if self._disk_enabled:
                disk = DiskTier(
                    self.config.local_disk,
                    self.config.max_local_disk_bytes,
                    slab_format,
                    segment.data,
                    segment.generations,
                    sync_interval_s=self.config.disk_flush_interval_s,
                )
            if self.config.remote_url is not None:
                remote = build_remote_sync(self.config, geometry, slab_format, segment.data, segment.generations)
            hooks = []
            if disk is not None:
                hooks.append(disk.submit)
            if remote is not None:
                hooks.append(remote.on_commit)
            pool = SlabPool(
                segment.data,
                segment.generations,
                slab_bytes,
                clock=self._clock,
                on_commit=_fan_out(hooks),
            )
        except BaseException:
            if remote is not None:
                remote.close()
            if disk is not None:
                disk.close()
            segment.close()
            raise
        log.info(
            "pool: %d slabs x %d bytes (%.2f GB) in segment %s; geometry %s; disk tier %s",
            num_slabs,
            slab_bytes,
            num_slabs * slab_bytes / 1024**3,
            segment.name,
            geometry.to_dict(),
            disk.directory if disk is not None else "off",
        )
        if remote is not None:
            log.info("remote tier: %s (namespace %s)", redact_url(self.config.remote_url), digest.hex()[:16])
        return _Pool(geometry, digest, segment, pool, disk, remote)

    @property
    def _disk_enabled(self) -> bool:
        return self.config.local_disk is not None and self.config.max_local_disk_bytes > 0

    def _ping(self, message: PingRequest) -> PingReply:
        return PingReply(os.getpid(), self.epoch, self._state is not None)

    def _clear(self, message: ClearRequest) -> ClearReply:
        return ClearReply(self._state.pool.clear() if self._state is not None else 0)

    def _lookup(self, message: LookupRequest) -> LeaseReply | Deferred:
        state = self._require_pool(message)
        keys = list(message.keys)
        lease = state.pool.lookup(keys, self.config.lease_ttl_s)
        if lease.num_chunks < len(keys) and (state.disk is not None or state.remote is not None):
            now = time.monotonic()
            # Half the client's deadline for tier I/O leaves the rest for the reply and its copy.
            promote_by = now + self.config.lookup_timeout_ms / 2000
            # The client's clock started before the send: past 90% of its timeout, count it gone
            # (a miss where it might just have made it, rather than a lease nobody releases).
            client_gone_at = now + 0.9 * self.config.lookup_timeout_ms / 1000
            return Deferred(work=lambda: self._promoted_lease(state, keys, lease, promote_by),
                            finish=lambda found: self._late_lookup_reply(state, keys, found, client_gone_at))
        return self._lookup_reply(keys, lease)

    def _promoted_lease(self, state: _Pool, keys: list[bytes], lease: Lease, deadline: float) -> Lease:
        """(Promotion thread.) The lease over the keys' L1 prefix once those past ``lease`` were
        promoted, by this job or by one queued before it; a failed promotion answers with what L1 has."""
        try:
            self._promote(state, keys, lease.num_chunks, deadline)
        except Exception as exc:
            self._errors.error("promotion failed; answering with the L1 prefix", exc_info=exc)
        longer = state.pool.lookup(keys, self.config.lease_ttl_s)
        state.pool.release(lease.lease_id)
        return longer

    def _late_lookup_reply(self, state: _Pool, keys: list[bytes], lease: Lease, client_gone_at: float) -> LeaseReply:
        """A promoted lookup's reply; past the client's deadline nobody reads it, so its lease goes now."""
        if time.monotonic() > client_gone_at and lease.num_chunks:
            state.pool.release(lease.lease_id)
            lease = Lease(lease_id=0, keys=lease.keys, slab_ids=(), generations=(), deadline=lease.deadline)
        return self._lookup_reply(keys, lease)

    def _lookup_reply(self, keys: list[bytes], lease: Lease) -> LeaseReply:
        self.counters.lookups += 1
        self.counters.hit_chunks += lease.num_chunks
        self.counters.miss_chunks += len(keys) - lease.num_chunks
        return LeaseReply(lease.lease_id, lease.slab_ids, lease.generations, self.config.lease_ttl_s)

    def _promote(self, state: _Pool, keys: list[bytes], start: int, deadline: float) -> bool:
        """Bring the run of keys after the L1 prefix into L1: from disk while it has
        them, then from the remote tier; True if any chunk came in. Only the promotion
        thread changes the promotion counters."""
        promoted = 0
        stop = start
        if state.disk is not None:
            stop, promoted = self._promote_from_disk(state, keys, start, deadline)
            self.counters.disk_promotions += promoted
        if state.remote is not None and stop < len(keys) and not self._promotion_over(deadline):
            remote = state.remote.fill(state.pool, keys[stop:], self.config.lease_ttl_s, deadline=deadline)
            self.counters.remote_promotions += remote
            promoted += remote
        return promoted > 0

    def _promotion_over(self, deadline: float) -> bool:
        return time.monotonic() >= deadline or (self._promoter is not None and self._promoter.stopping.is_set())

    def _promote_from_disk(self, state: _Pool, keys: list[bytes], start: int, deadline: float) -> tuple[int, int]:
        """(index of the first key neither in L1 nor promoted from disk, chunks promoted)."""
        assert state.disk is not None
        promoted = 0
        for i in range(start, len(keys)):
            key = keys[i]
            if state.pool.contains(key):
                continue
            if self._promotion_over(deadline):
                return i, promoted
            if not state.disk.contains(key):
                return i, promoted
            res = state.pool.reserve([key], self.config.lease_ttl_s)
            if res.num_chunks == 0:
                return i, promoted
            try:
                loaded = state.disk.load_into(key, state.pool.slab(res.slab_ids[0]))
            except BaseException:
                state.pool.abort(res.reservation_id)
                raise
            if not loaded:
                state.pool.abort(res.reservation_id)
                return i, promoted
            state.pool.commit(res.reservation_id)
            promoted += 1
        return len(keys), promoted

    def _reserve(self, message: ReserveRequest) -> ReservationReply:
        state = self._require_pool(message)
        res = state.pool.reserve(list(message.keys), self.config.lease_ttl_s)
        self.counters.reserved_chunks += res.num_chunks
        return ReservationReply(reservation_id=res.reservation_id, chunk_indices=res.chunk_indices, slab_ids=res.slab_ids,
                                generations=res.generations, no_room=res.no_room, ttl_s=self.config.lease_ttl_s)

    def _commit(self, message: CommitRequest) -> CommitReply:
        state = self._require_pool(message)
        committed = state.pool.commit(message.reservation_id)
        self.counters.committed_chunks += committed
        self.counters.committed_bytes += committed * state.segment.slab_bytes
        return CommitReply(committed)

    def _abort(self, message: AbortRequest) -> EmptyReply:
        self._require_pool(message).pool.abort(message.reservation_id)
        return EmptyReply()

    def _release(self, message: ReleaseRequest) -> EmptyReply:
        self._require_pool(message).pool.release(message.lease_id)
        return EmptyReply()

    def _stats(self, message: StatsRequest) -> StatsReply:
        looked_up = self.counters.hit_chunks + self.counters.miss_chunks
        state = self._state
        pool = disk = remote = None
        if state is not None:
            p, slab_bytes = state.pool.stats(), state.segment.slab_bytes
            pool = PoolCounters(p.num_slabs, p.used_slabs, p.pinned_slabs, p.committed_chunks, p.evictions, p.leases,
                                p.reservations, p.quarantined_slabs, slab_bytes, p.committed_chunks * slab_bytes)
            if state.disk is not None:
                disk = asdict(state.disk.stats())
            if state.remote is not None:
                remote = {**asdict(state.remote.tier.stats()), **asdict(state.remote.stats())}
        return StatsReply(
            pid=os.getpid(),
            epoch=self.epoch,
            endpoint=self.endpoint,
            counters=replace(self.counters),
            hit_rate=self.counters.hit_chunks / looked_up if looked_up else 0.0,
            clients=self._clients.live(),
            pool=pool,
            segment=state.segment.name if state is not None else None,
            disk=disk,
            remote=remote,
        )


def _fan_out(hooks: list[Callable[[bytes, int], None]]) -> Callable[[bytes, int], None] | None:
    """One pool commit hook calling each of ``hooks``; None when there are none."""
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def call_all(key: bytes, slab_id: int) -> None:
        for hook in hooks:
            hook(key, slab_id)

    return call_all


def _send(sock: zmq.Socket, identity: bytes, reply: list[bytes]) -> None:
    try:
        sock.send_multipart([identity, *reply], zmq.NOBLOCK)
    except zmq.ZMQError:
        pass  # the peer is gone or not reading; it will time out


def serve(config: LMCTransferConfig, *, stop: threading.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``stop`` is set), then clean up."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
    daemon = CacheDaemon(config)
    try:
        daemon.bind()
        daemon.serve_forever(stop)
        log.info("shutting down")
    finally:
        daemon.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmc_transfer.daemon", description="Run the lmc-transfer MP cache daemon.")
    parser.add_argument("--config", required=True, help="YAML config file (see configs/example_config_mp.yaml)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(load_config(args.config))
    except ConfigError as exc:
        print(f"python -m lmc_transfer.daemon: {exc}", file=sys.stderr)
        return 2
    except (AlreadyRunning, OSError) as exc:  # taken endpoint, unsafe directory, no /dev/shm room, port in use
        log.error("%s", exc)
        return 1
    return 0

