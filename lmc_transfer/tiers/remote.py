"""A remote chunk tier on Redis / Valkey, shared by engines on many hosts.

Hosts that hold the same model (same key salt) reuse each other's prefixes
through one Redis deployment. The tier is a cache: every failure degrades to a
miss, never to an error for the caller and never to wrong bytes.

Values are slab values of lmc_transfer.tiers.format (the same bytes as a disk-tier
file): bound to their chunk key and geometry and checksummed, so a corrupt value, a
value of another format and a value copied under another key are all rejected,
deleted and counted, never served. The checksum does not protect against a writer
with Redis access (it could compute any checksum): Redis authentication does.

Writes are synchronous here (``put``); the write-behind that calls it from a thread
of its own is lmc_transfer.tiers.remote_sync's.

Redis key layout (``<ns>`` is the hex of the slab format's geometry digest)::

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
go first and the counter heals itself); the index and counter exist only while
a budget is set, so values written without one are never counted. For a hard memory cap use Redis ``maxmemory`` with an
``allkeys-lru`` policy as well.

Failures (refused, reset, timeout, cluster failover) trip a circuit breaker:
while it is open every call answers a miss (or a failed write) at once, counted;
a background thread pings the server with exponential backoff and closes the
breaker when it answers. Opening and closing are logged at WARNING, once each.
Each socket operation is bounded by ``timeout_s``, and the client never retries on
its own.

Fetches (``fetch_into``) read values straight into the caller's slabs
(lmc_transfer.tiers.remote_read), over ``connections`` pooled connections in parallel: the keys
are cut into contiguous runs, one per connection (in cluster mode first grouped by the shard
that owns them, each shard's keys cut the same way). A connection that fails or stalls ends
its run there, the runs before it still count, and the fetch ends by its deadline; the failure
trips the breaker like any other. An error reply is a failure too: in cluster mode a MOVED after
a resharding rebuilds the client, and so its slot map, on the next call.

Every round trip and fetch is measured (lmc_transfer.tiers.remote_cost.ThroughputMeter), so
callers can estimate what fetching a prefix will cost before they ask for it (``throughput``).

URLs: ``redis://[user:pass@]host:port/db``, ``rediss://`` for TLS,
``unix:///path.sock``; ``redis+cluster://host:port`` (or ``rediss+cluster://``)
selects Redis Cluster / Valkey cluster through redis-py's ``RedisCluster``,
given any one node as a seed. All commands are single-key so they route to
their slot in cluster mode.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from lmc_transfer.keys import check_keys
from lmc_transfer.tiers.format import SlabFormat
from lmc_transfer.tiers.remote_cost import Throughput, ThroughputMeter
from lmc_transfer.tiers.remote_read import Reply, SocketReader

log = logging.getLogger(__name__)

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
    put_errors: int  # writes lost to a remote failure or an open breaker
    gets: int  # keys asked of fetch_into()
    hits: int  # valid payloads fetch_into() delivered (the leading run it returned)
    fetched_bytes: int  # payload bytes of those hits
    corrupt_dropped: int  # invalid values found, deleted and not returned
    errors: int  # lookups/fetches that failed remotely and answered a miss
    skipped: int  # lookups/fetches answered a miss at once because the breaker was open
    evicted: int  # values deleted to keep the namespace under its byte budget
    breaker_open: bool
    # Moving averages of what the tier delivered; 0.0 until a fetch was measured (STATS carries numbers only).
    est_bytes_per_s: float
    est_latency_s: float


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

    def trip(self) -> bool:
        """Open (again, with a longer backoff); True if it was closed."""
        with self._lock:
            was_open = self._open
            if was_open:
                self._backoff_s = min(self._backoff_s * 2, self._max_s)
            self._open = True
            self._probe_at = self._clock() + self._backoff_s
        return not was_open

    def reset(self) -> bool:
        """Close; True if it was open."""
        with self._lock:
            was_open = self._open
            self._open = False
            self._backoff_s = self._initial_s
        return was_open

    def seconds_to_probe(self) -> float | None:
        """None while closed; otherwise how long until the next probe is due (<= 0: now)."""
        with self._lock:
            return self._probe_at - self._clock() if self._open else None


class RemoteTier:
    """Slab values of one format (``slab_format``) in one Redis namespace: put, prefix lookup, fetch.

    The namespace is the format's geometry digest, so daemons of different geometries never
    see each other's values.
    """

    def __init__(
        self,
        url: str,
        slab_format: SlabFormat,
        *,
        timeout_s: float = 0.2,
        ttl_s: float | None = None,
        max_namespace_bytes: int | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: TLSOptions | None = None,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
        connections: int = 4,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url: expected str, got {type(url).__name__}")
        if not isinstance(slab_format, SlabFormat):
            raise TypeError(f"slab_format: expected SlabFormat, got {type(slab_format).__name__}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s: expected None or > 0, got {ttl_s!r}")
        if max_namespace_bytes is not None and max_namespace_bytes < 1:
            raise ValueError(f"max_namespace_bytes: expected None or >= 1, got {max_namespace_bytes!r}")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(
                f"backoff_initial_s/backoff_max_s: expected 0 < initial <= max, got {backoff_initial_s!r}/{backoff_max_s!r}"
            )
        if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections: expected an int >= 1, got {connections!r}")
        if tls is not None and not url.startswith(("rediss://", "rediss+cluster://")):
            # Never the URL itself: it may carry a password.
            raise ValueError(f"tls: needs a rediss:// or rediss+cluster:// url, got one with scheme {url.partition('://')[0]!r}")
        self.format = slab_format
        self.connections = connections
        self._url = url
        self._timeout_s = timeout_s
        self._client_kwargs = _client_kwargs(timeout_s, username, password, tls)
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._budget = max_namespace_bytes
        self._namespace = slab_format.geometry.hex()[:16]  # for log lines
        prefix = b"lmc:" + slab_format.geometry.hex().encode() + b":"
        self._chunk_prefix = prefix + b"c:"
        self._index_key = prefix + b"m:index"
        self._bytes_key = prefix + b"m:bytes"

        self._lock = threading.Lock()  # counters, client creation
        self._counts = dict.fromkeys(
            ("puts", "put_errors", "gets", "hits", "fetched_bytes", "corrupt_dropped", "errors", "skipped", "evicted"), 0
        )
        self._breaker = _CircuitBreaker(backoff_initial_s, backoff_max_s, time.monotonic)
        self._meter = ThroughputMeter()
        # The calling thread reads one run of keys itself; these threads read the others.
        self._readers = (
            ThreadPoolExecutor(connections - 1, thread_name_prefix="lmct-remote-fetch") if connections > 1 else None
        )
        self._client: redis.Redis | RedisCluster | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._monitor = threading.Thread(target=self._monitor_loop, name="lmc-remote-monitor", daemon=True)
        self._monitor.start()

    # ----------------------------------------------------------------- public

    def put(self, key: bytes, value: bytes) -> bool:
        """Store ``value`` (``slab_format.encode(key, payload)``) under ``key``; False (counted)
        when the remote failed or the breaker is open. Blocks for at most a few ``timeout_s``."""
        check_keys((key,))
        if not isinstance(value, bytes) or len(value) != self.format.value_bytes:
            raise ValueError(f"value: expected {self.format.value_bytes} bytes from slab_format.encode, got {value!r:.40}")
        if self._breaker.is_open or self._closed.is_set():
            self._count("put_errors", 1)
            return False
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
        except _REMOTE_ERRORS as exc:
            self._count("put_errors", 1)
            self._fail(exc)
            return False
        self._count("puts", 1)
        return True

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the remote holds (one pipelined round trip)."""
        keys = check_keys(keys)
        if not keys:
            return 0
        start = time.monotonic()
        # execute_command rather than pipe.exists: ~0.6 us less per key, 15% of a 128-key lookup.
        replies = self._round_trip(lambda pipe: [pipe.execute_command("EXISTS", self._chunk_key(k)) for k in keys])
        if replies is None:
            return 0
        self._meter.observe_round_trip(time.monotonic() - start)
        count = 0
        for present in replies:
            if not present:
                break
            count += 1
        return count

    def fetch_into(self, keys: Sequence[bytes], destinations: Sequence[object], deadline: float) -> int:
        """Read the values of ``keys`` into ``destinations`` (one writable, C-contiguous buffer of
        ``slab_format.payload_bytes`` per key); returns how many leading keys arrived valid.

        Only ``destinations[:returned]`` hold their key's payload; the others may hold anything
        (parts of a value, a value that failed its checksum) and must not be used. Invalid values
        (corrupt, of another format, or written for another key) are deleted and counted. Ends by
        ``deadline`` (``time.monotonic()``): what has not arrived by then is a miss.
        """
        keys = check_keys(keys)
        views = [self._destination(i, d) for i, d in enumerate(destinations)]
        if len(views) != len(keys):
            raise ValueError(f"destinations: expected one per key ({len(keys)}), got {len(views)}")
        if not keys:
            return 0
        self._count("gets", len(keys))
        if self._breaker.is_open or self._closed.is_set():
            self._count("skipped", 1)
            return 0
        names = [self._chunk_key(k) for k in keys]
        run = _FetchRun(len(keys))
        start = time.monotonic()
        try:
            jobs = self._fetch_jobs(self._get_client(), names)
        except _REMOTE_ERRORS as exc:
            run.fail(0, exc)
            jobs = []
        if self._readers is None:
            for job in jobs:
                self._read_run(*job, names, keys, views, deadline, run)
        elif jobs:
            others = [self._readers.submit(self._read_run, *job, names, keys, views, deadline, run) for job in jobs[1:]]
            try:
                self._read_run(*jobs[0], names, keys, views, deadline, run)
            finally:
                wait(others)  # no reader may still write into a destination once this returns
            for future in others:
                future.result()
        now = time.monotonic()
        # A fetch that stopped early at a missing key moved too little to say anything about bandwidth;
        # one that ran out of time did: it is how slow the tier is.
        if run.received >= self.format.value_bytes or now >= deadline:
            self._meter.observe_transfer(run.received, now - start)
        if run.invalid:
            self._count("corrupt_dropped", len(run.invalid))
            if run.error is None:  # else the next fetch that finds them deletes them
                self._round_trip(lambda pipe: [pipe.delete(names[i]) for i in run.invalid])
        if run.error is not None:
            self._count("errors", 1)
            self._fail(run.error)
        self._count("hits", run.first_bad)
        self._count("fetched_bytes", run.first_bad * self.format.payload_bytes)
        return run.first_bad

    def throughput(self) -> Throughput | None:
        """What the tier delivered lately (moving averages); None before its first fetch."""
        return self._meter.estimate()

    def stats(self) -> RemoteTierStats:
        estimate = self._meter.estimate()
        with self._lock:
            return RemoteTierStats(
                **self._counts,
                breaker_open=self._breaker.is_open,
                est_bytes_per_s=0.0 if estimate is None else estimate.bytes_per_s,
                est_latency_s=0.0 if estimate is None else estimate.latency_s,
            )

    def close(self) -> None:
        """Stop the monitor thread and drop the connections; idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._monitor.join()
        if self._readers is not None:
            self._readers.shutdown(wait=True)  # every read ends by its fetch's deadline
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

    def _destination(self, index: int, buffer: object) -> memoryview:
        view = memoryview(buffer)  # type: ignore[arg-type]
        if view.readonly or not view.c_contiguous or view.nbytes != self.format.payload_bytes:
            raise ValueError(
                f"destinations[{index}]: expected a writable C-contiguous buffer of {self.format.payload_bytes} bytes, "
                f"got {'a read-only' if view.readonly else 'a writable'} buffer of {view.nbytes} bytes"
                f"{'' if view.c_contiguous else ' (not contiguous)'}"
            )
        return view.cast("B")

    def _fetch_jobs(self, client: redis.Redis | RedisCluster, names: list[bytes]) -> list[tuple[object, list[int]]]:
        """(connection pool, positions of ``names``) per connection: contiguous runs of the keys
        (cluster: of each shard's keys), at most ``connections`` in all unless shards outnumber them."""
        if isinstance(client, RedisCluster):
            shards: dict[str, tuple[object, list[int]]] = {}
            for i, name in enumerate(names):
                node = client.get_node_from_key(name)
                shards.setdefault(node.name, (client.get_redis_connection(node).connection_pool, []))[1].append(i)
            groups = list(shards.values())
        else:
            groups = [(client.connection_pool, list(range(len(names))))]
        per_group = max(1, self.connections // len(groups))
        return [(pool, run) for pool, positions in groups for run in _split(positions, per_group)]

    def _read_run(
        self,
        pool: redis.ConnectionPool,
        positions: list[int],
        names: list[bytes],
        keys: list[bytes],
        views: list[memoryview],
        deadline: float,
        run: _FetchRun,
    ) -> None:
        """GET ``positions`` over one pooled connection and read the replies into their views,
        stopping at the first that is not a valid value or lies past another run's failure."""
        read = 0
        reader: SocketReader | None = None
        try:
            conn = pool.get_connection()
        except _REMOTE_ERRORS as exc:
            run.fail(positions[0], exc)
            return
        sock = None
        try:
            conn.send_packed_command(conn.pack_commands([("GET", names[i]) for i in positions]))
            sock = conn._sock
            reader = SocketReader(sock, deadline, self._timeout_s)
            for i in positions:
                if run.past_failure(i):
                    break
                reply = reader.value_into(keys[i], self.format, views[i])
                if reply is not Reply.VALUE:
                    run.stop(i, invalid=reply is Reply.INVALID)
                    break
                read += 1
        except _REMOTE_ERRORS as exc:
            run.fail(positions[read], exc)
        finally:
            if reader is not None:
                run.add_received(reader.received)
            if reader is None or read < len(positions) or not reader.in_sync or conn._sock is not sock:
                conn.disconnect()  # replies left unread (or closed under us): never hand it back dirty
            else:
                sock.settimeout(conn.socket_timeout)
            pool.release(conn)

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
        except _REMOTE_ERRORS as exc:
            self._count("errors", 1)
            self._fail(exc)
            return None

    def _fail(self, exc: BaseException) -> None:
        if self._breaker.trip():
            # The exception's type only: redis-py messages may quote connection details.
            log.warning("remote tier (namespace %s) unavailable (%s): lookups miss and writes are dropped "
                        "until it answers again", self._namespace, type(exc).__name__)
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
            except _REMOTE_ERRORS as exc:
                self._fail(exc)
            else:
                if self._breaker.reset():
                    log.warning("remote tier (namespace %s) answers again", self._namespace)


class _FetchRun:
    """What the parallel reads of one fetch found: ``first_bad`` is the position of the first key
    that did not arrive valid (the number of keys when all did)."""

    def __init__(self, num_keys: int) -> None:
        self._lock = threading.Lock()
        self.first_bad = num_keys
        self.invalid: list[int] = []
        self.received = 0
        self.error: BaseException | None = None

    def past_failure(self, position: int) -> bool:
        with self._lock:
            return position > self.first_bad

    def stop(self, position: int, *, invalid: bool) -> None:
        with self._lock:
            self.first_bad = min(self.first_bad, position)
            if invalid:
                self.invalid.append(position)

    def fail(self, position: int, exc: BaseException) -> None:
        with self._lock:
            self.first_bad = min(self.first_bad, position)
            if self.error is None:
                self.error = exc

    def add_received(self, nbytes: int) -> None:
        with self._lock:
            self.received += nbytes


def _split(positions: list[int], parts: int) -> list[list[int]]:
    """``positions`` cut into at most ``parts`` contiguous, non-empty runs of near-equal length."""
    parts = min(parts, len(positions))
    size, extra = divmod(len(positions), parts)
    runs, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        runs.append(positions[start:end])
        start = end
    return runs


def _client_kwargs(timeout_s: float, username: str | None, password: str | None, tls: TLSOptions | None) -> dict:
    # No client-side retries: the breaker decides when to try again, and a retry
    # would multiply the time a caller waits on a dead server.
    kwargs: dict = {
        "protocol": 2,  # remote_read parses RESP2 replies itself
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
