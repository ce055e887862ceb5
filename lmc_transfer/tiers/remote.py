"""A remote chunk tier on Redis / Valkey, shared by engines on many hosts.

Hosts that hold the same model (same key salt) reuse each other's prefixes
through one Redis deployment. The tier is a cache: every failure degrades to a
miss, never to an error for the caller and never to wrong bytes.

Values are ``header + payload`` where the header (``_HEADER``) holds a magic, a
format version, a 16-byte digest of the KV geometry, the payload length and a
CRC-32 of the payload. CRC-32 (zlib) is used rather than a cryptographic hash
because it guards against accidental corruption at ~4x the speed of blake2b;
it offers no protection against a writer with Redis access, and neither would
blake2b, since such a writer can compute any checksum itself.

Redis key layout (``<ns>`` is the hex of the namespace digest)::

    lmc:<ns>:c:<chunk key bytes>   chunk values
    lmc:<ns>:m:index               sorted set: member = 8-byte value size + chunk key,
                                   score = last write time (ms)
    lmc:<ns>:m:bytes               counter: bytes accounted to the namespace

Size budget (``max_namespace_bytes``): a write that adds a new index member
increments the counter by the value size; when the counter exceeds the budget
the writer pops the oldest index members (ZPOPMIN, atomic, so concurrent hosts
never decrement twice for one member), deletes their values and decrements the
counter. Limits, stated honestly: eviction is by write time, not by access
time (a chunk fetched into L1 and written back refreshes its score); the
counter is not updated atomically with the value, so a writer that dies between
its two round trips leaves the counter a value too low, and values that expired
through the TTL stay counted until they are popped (they are the oldest, so they
go first and the counter heals itself); a rewrite of one key with another size
is counted twice; the index and counter exist only while a budget is set, so
values written without one are never counted. For a hard memory cap use Redis ``maxmemory`` with an
``allkeys-lru`` policy as well.

Failures (refused, reset, timeout, cluster failover) trip a circuit breaker:
while it is open every call answers a miss at once and queued writes are
dropped and counted; a background thread pings the server with exponential
backoff and closes the breaker when it answers. Each socket operation is
bounded by ``timeout_s``, and the client never retries on its own.

URLs: ``redis://[user:pass@]host:port/db``, ``rediss://`` for TLS,
``unix:///path.sock``; ``redis+cluster://host:port`` (or ``rediss+cluster://``)
selects Redis Cluster / Valkey cluster through redis-py's ``RedisCluster``,
given any one node as a seed. All commands are single-key so they route to
their slot in cluster mode.
"""

from __future__ import annotations

import hashlib
import queue
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

MAGIC = b"LMCR"
FORMAT_VERSION = 1
# magic, format version, reserved, geometry digest, payload length, payload CRC-32
_HEADER = struct.Struct("<4sHH16sQI")
HEADER_BYTES = _HEADER.size
_SIZE = struct.Struct("<Q")
_CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}
# Exceptions that mean "the remote is unavailable", as opposed to a caller bug.
_REMOTE_ERRORS = (redis.exceptions.RedisError, OSError)


@dataclass(frozen=True)
class TLSOptions:
    """Passed through to redis-py's SSL connection (used with ``rediss://``)."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True


@dataclass(frozen=True)
class RemoteTierStats:
    puts: int  # values written
    put_drops: int  # writes dropped because the queue was full or the tier closed
    put_errors: int  # writes lost to a remote failure or an open breaker
    gets: int  # keys asked of fetch()
    hits: int  # valid payloads returned by fetch()
    corrupt_dropped: int  # invalid values found, deleted and not returned
    errors: int  # lookups/fetches that failed remotely and answered a miss
    skipped: int  # lookups/fetches answered a miss at once because the breaker was open
    evicted: int  # values deleted to keep the namespace under its byte budget
    breaker_open: bool


def geometry_tag(geometry_digest: bytes) -> bytes:
    """The fixed 16-byte geometry field of the header, for digests of any length."""
    return hashlib.blake2b(geometry_digest, digest_size=16).digest()


def encode_value(payload: bytes | memoryview, geometry_digest: bytes) -> bytes:
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, geometry_tag(geometry_digest), len(payload), zlib.crc32(payload))
    return header + payload


def decode_value(value: bytes, geometry_tag16: bytes) -> memoryview | None:
    """The payload of a valid value (a view, no copy), or None when anything mismatches."""
    if len(value) < HEADER_BYTES:
        return None
    magic, version, _reserved, geom, length, crc = _HEADER.unpack_from(value)
    if magic != MAGIC or version != FORMAT_VERSION or geom != geometry_tag16:
        return None
    if length != len(value) - HEADER_BYTES:
        return None
    payload = memoryview(value)[HEADER_BYTES:]
    if zlib.crc32(payload) != crc:
        return None
    return payload


class _CircuitBreaker:
    """Closed until a failure; then open, with a probe due after an exponential backoff."""

    def __init__(self, initial_s: float, max_s: float, clock: Callable[[], float]) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._backoff_s = initial_s
        self._probe_at = 0.0

    @property
    def is_open(self) -> bool:
        return self._open

    def trip(self) -> None:
        with self._lock:
            if self._open:
                self._backoff_s = min(self._backoff_s * 2, self._max_s)
            self._open = True
            self._probe_at = self._clock() + self._backoff_s

    def reset(self) -> None:
        with self._lock:
            self._open = False
            self._backoff_s = self._initial_s

    def seconds_to_probe(self) -> float | None:
        """None while closed; otherwise how long until the next probe is due (<= 0: now)."""
        with self._lock:
            return self._probe_at - self._clock() if self._open else None


class RemoteTier:
    """Write-behind and prefix fetch of chunk values in one Redis namespace."""

    def __init__(
        self,
        url: str,
        *,
        namespace: bytes,
        timeout_s: float = 0.2,
        ttl_s: float | None = None,
        max_queue: int = 64,
        max_queue_bytes: int = 512 << 20,
        max_namespace_bytes: int | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: TLSOptions | None = None,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url: expected str, got {type(url).__name__}")
        if not isinstance(namespace, bytes):
            raise TypeError(f"namespace: expected bytes, got {type(namespace).__name__}")
        if not 0 < len(namespace) <= 64:
            raise ValueError(f"namespace: expected 1..64 bytes, got {namespace!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s: expected None or > 0, got {ttl_s!r}")
        if max_queue < 1:
            raise ValueError(f"max_queue: expected >= 1, got {max_queue!r}")
        if max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes: expected >= 1, got {max_queue_bytes!r}")
        if max_namespace_bytes is not None and max_namespace_bytes < 1:
            raise ValueError(f"max_namespace_bytes: expected None or >= 1, got {max_namespace_bytes!r}")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(
                f"backoff_initial_s/backoff_max_s: expected 0 < initial <= max, got {backoff_initial_s!r}/{backoff_max_s!r}"
            )
        if tls is not None and not url.startswith(("rediss://", "rediss+cluster://")):
            raise ValueError(f"tls: needs a rediss:// or rediss+cluster:// url, got {url!r}")
        self._url = url
        self._client_kwargs = _client_kwargs(timeout_s, username, password, tls)
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._max_queue_bytes = max_queue_bytes
        self._budget = max_namespace_bytes
        prefix = b"lmc:" + namespace.hex().encode() + b":"
        self._chunk_prefix = prefix + b"c:"
        self._index_key = prefix + b"m:index"
        self._bytes_key = prefix + b"m:bytes"

        self._lock = threading.Lock()  # counters, queued bytes, client creation
        self._counts = dict.fromkeys(
            ("puts", "put_drops", "put_errors", "gets", "hits", "corrupt_dropped", "errors", "skipped", "evicted"), 0
        )
        self._queued_bytes = 0
        self._pending = 0  # enqueued and not yet finished by the writer
        self._idle = threading.Condition(self._lock)
        self._queue: queue.Queue[tuple[bytes, bytes, bytes]] = queue.Queue(maxsize=max_queue)
        self._breaker = _CircuitBreaker(backoff_initial_s, backoff_max_s, time.monotonic)
        self._client: redis.Redis | RedisCluster | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="lmc-remote-writer", daemon=True)
        self._monitor = threading.Thread(target=self._monitor_loop, name="lmc-remote-monitor", daemon=True)
        self._writer.start()
        self._monitor.start()

    # ----------------------------------------------------------------- public

    def put_async(self, key: bytes, payload: bytes | memoryview, geometry_digest: bytes) -> bool:
        """Queue one chunk for the background writer; False (counted) when it was dropped.

        ``bytes`` payloads are kept as they are; any other buffer is copied
        here, because the caller's slab may be reused before the write happens.
        """
        _check_key(key, "key")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload: expected bytes or memoryview, got {type(payload).__name__}")
        _check_geometry(geometry_digest)
        data = payload if isinstance(payload, bytes) else bytes(payload)
        with self._lock:
            if self._closed.is_set() or self._queued_bytes + len(data) > self._max_queue_bytes:
                self._counts["put_drops"] += 1
                return False
            try:
                self._queue.put_nowait((key, data, geometry_digest))
            except queue.Full:
                self._counts["put_drops"] += 1
                return False
            self._queued_bytes += len(data)
            self._pending += 1
        return True

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the remote holds (one pipelined round trip)."""
        for i, key in enumerate(keys):
            _check_key(key, f"keys[{i}]")
        if not keys:
            return 0
        replies = self._round_trip(lambda pipe: [pipe.exists(self._chunk_key(k)) for k in keys])
        if replies is None:
            return 0
        count = 0
        for present in replies:
            if not present:
                break
            count += 1
        return count

    def fetch(self, keys: Sequence[bytes], geometry_digest: bytes) -> list[memoryview]:
        """The valid payloads of the leading ``keys`` (one pipelined round trip).

        Stops at the first missing or invalid value; invalid values are deleted
        and counted. Payloads are read-only views into the received values.
        """
        for i, key in enumerate(keys):
            _check_key(key, f"keys[{i}]")
        _check_geometry(geometry_digest)
        if not keys:
            return []
        self._count("gets", len(keys))
        values = self._round_trip(lambda pipe: [pipe.get(self._chunk_key(k)) for k in keys])
        if values is None:
            return []
        tag = geometry_tag(geometry_digest)
        payloads: list[memoryview] = []
        for key, value in zip(keys, values):
            if value is None:
                break
            payload = decode_value(value, tag)
            if payload is None:
                self._count("corrupt_dropped", 1)
                self._round_trip(lambda pipe: [pipe.delete(self._chunk_key(key))])
                break
            payloads.append(payload)
        self._count("hits", len(payloads))
        return payloads

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write has finished (written, failed or dropped)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stats(self) -> RemoteTierStats:
        with self._lock:
            return RemoteTierStats(**self._counts, breaker_open=self._breaker.is_open)

    def close(self) -> None:
        """Stop the threads; writes still queued are dropped and counted (call flush first to keep them)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._writer.join()
        self._monitor.join()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> RemoteTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- internal

    def _chunk_key(self, key: bytes) -> bytes:
        return self._chunk_prefix + key

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self._counts[name] += n

    def _get_client(self) -> redis.Redis | RedisCluster:
        with self._lock:
            if self._client is None:
                # RedisCluster contacts its seed node here, so creation can fail like any command.
                for scheme, plain in _CLUSTER_SCHEMES.items():
                    if self._url.startswith(scheme):
                        self._client = RedisCluster.from_url(plain + self._url[len(scheme) :], **self._client_kwargs)
                        break
                else:
                    self._client = redis.Redis.from_url(self._url, **self._client_kwargs)
            return self._client

    def _round_trip(self, queue_commands: Callable[[object], object]) -> list | None:
        """Run the commands in one pipeline; None (counted, breaker tripped) on any remote failure."""
        if self._breaker.is_open:
            self._count("skipped", 1)
            return None
        try:
            pipe = self._get_client().pipeline(transaction=False)
            queue_commands(pipe)
            return pipe.execute()
        except _REMOTE_ERRORS:
            self._count("errors", 1)
            self._fail()
            return None

    def _fail(self) -> None:
        self._breaker.trip()
        # Connections pooled before the failure may point at a dead server process.
        with self._lock:
            client = self._client
        if client is not None:
            try:
                client.close() if isinstance(client, RedisCluster) else client.connection_pool.disconnect()
            except _REMOTE_ERRORS:
                pass
            if isinstance(client, RedisCluster):
                with self._lock:
                    self._client = None
        self._wake.set()

    def _write_loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                # put_async enqueues under the lock after checking _closed, so nothing can follow this.
                with self._lock:
                    if self._closed.is_set() and self._queue.empty():
                        return
                continue
            key, data, geometry_digest = item
            outcome = "put_drops" if self._closed.is_set() else self._write(key, data, geometry_digest)
            with self._idle:
                self._counts[outcome] += 1
                self._queued_bytes -= len(data)
                self._pending -= 1
                self._idle.notify_all()

    def _write(self, key: bytes, data: bytes, geometry_digest: bytes) -> str:
        """Write one value and account for it; the name of the counter that records the outcome."""
        if self._breaker.is_open:
            return "put_errors"
        value = encode_value(data, geometry_digest)
        try:
            client = self._get_client()
            pipe = client.pipeline(transaction=False)
            pipe.set(self._chunk_key(key), value, px=self._ttl_ms)
            if self._budget is not None:
                pipe.zadd(self._index_key, {_SIZE.pack(len(value)) + key: time.time() * 1000})
                if self._ttl_ms is not None:
                    pipe.pexpire(self._index_key, self._ttl_ms)
            replies = pipe.execute()
            if self._budget is not None and replies[1]:  # a new index member: count its bytes
                self._account(client, len(value))
        except _REMOTE_ERRORS:
            self._fail()
            return "put_errors"
        return "puts"

    def _account(self, client: redis.Redis | RedisCluster, value_bytes: int) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.incrby(self._bytes_key, value_bytes)
        if self._ttl_ms is not None:
            pipe.pexpire(self._bytes_key, self._ttl_ms)
        total = pipe.execute()[0]
        while total > self._budget:
            # Pop enough of the oldest entries to cover the excess, assuming equal sizes; loop if not.
            count = max(1, -(-(total - self._budget) // value_bytes))
            popped = client.zpopmin(self._index_key, count)
            if not popped:
                return
            pipe = client.pipeline(transaction=False)
            freed = 0
            for member, _score in popped:
                freed += _SIZE.unpack_from(member)[0]
                pipe.delete(self._chunk_key(member[_SIZE.size :]))
            pipe.decrby(self._bytes_key, freed)
            total = pipe.execute()[-1]
            self._count("evicted", len(popped))

    def _monitor_loop(self) -> None:
        while not self._closed.is_set():
            wait_s = self._breaker.seconds_to_probe()
            if wait_s is None or wait_s > 0:
                self._wake.wait(timeout=1.0 if wait_s is None else wait_s)
                self._wake.clear()
                continue
            try:
                self._get_client().ping()
            except _REMOTE_ERRORS:
                self._fail()
            else:
                self._breaker.reset()


def _client_kwargs(timeout_s: float, username: str | None, password: str | None, tls: TLSOptions | None) -> dict:
    # No client-side retries: the breaker decides when to try again, and a retry
    # would multiply the time a caller waits on a dead server.
    kwargs: dict = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
    }
    if username is not None:
        kwargs["username"] = username
    if password is not None:
        kwargs["password"] = password
    if tls is not None:
        kwargs.update(
            ssl_ca_certs=tls.ca_certs,
            ssl_certfile=tls.certfile,
            ssl_keyfile=tls.keyfile,
            ssl_cert_reqs="required" if tls.verify else "none",
        )
    return kwargs


def _check_key(key: object, name: str) -> None:
    if not isinstance(key, bytes) or not key:
        raise TypeError(f"{name}: expected non-empty bytes, got {key!r:.80}")


def _check_geometry(geometry_digest: object) -> None:
    if not isinstance(geometry_digest, bytes) or not geometry_digest:
        raise TypeError(f"geometry_digest: expected non-empty bytes, got {geometry_digest!r:.80}")
