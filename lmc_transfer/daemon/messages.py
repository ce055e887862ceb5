"""The typed body of every request and reply; the only place bodies become JSON and back.

lmc_transfer.daemon.protocol frames a message (header, key frame, array frame) and hands
over its body as a JSON object; each dataclass here is one body. ``decode`` is strict (unknown
or missing fields, wrong types and out-of-range values raise ``ProtocolError`` naming
``body.<field>``), so the daemon can decode untrusted requests with it and the client the
daemon's replies. A request class names its ``TYPE`` and the ``REPLY`` class that answers it;
the keys of LOOKUP and RESERVE travel in the key frame, outside the body.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, TypeVar

from lmc_transfer.daemon.auth import HEX_LEN
from lmc_transfer.daemon.protocol import (
    MAX_KEYS,
    ErrorCode,
    MsgType,
    ProtocolError,
    body_int,
    body_str,
)
from lmc_transfer.kernels.geometry import KVGeometry

_I63 = 2**63 - 1
_U64 = 2**64
_MAX_COUNTERS = 64

# -- field kinds: how one body field is checked on decode and written on encode ---------

Decode = Callable[[Mapping[str, Any], str], Any]


def _f(decode: Decode, encode: Callable[[Any], Any] = lambda v: v, **kw: Any) -> Any:
    return field(metadata={"decode": decode, "encode": encode}, **kw)


def _int(minimum: int = 0, maximum: int = _I63, **kw: Any) -> Any:
    return _f(lambda body, name: body_int(body, name, minimum=minimum, maximum=maximum), **kw)


def _str(max_len: int = 256) -> Any:
    return _f(lambda body, name: body_str(body, name, max_len=max_len))


def _optional_str(max_len: int = 256) -> Any:
    return _f(lambda body, name: body_str(body, name, max_len=max_len, optional=True))


def _hex(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or len(value) != HEX_LEN or value.strip("0123456789abcdef"):
        raise ProtocolError(f"body.{name} must be {HEX_LEN} lowercase hex characters, got {value!r:.80}")
    return value


def _number(body: Mapping[str, Any], name: str) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ProtocolError(f"body.{name} must be a number >= 0, got {value!r:.64}")
    return float(value)


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if not isinstance(value, bool):
        raise ProtocolError(f"body.{name} must be true or false, got {value!r:.64}")
    return value


def _u64s(body: Mapping[str, Any], name: str) -> tuple[int, ...]:
    value = body.get(name)
    # Whole-list checks run in C: a LOOKUP reply carries up to MAX_KEYS of them.
    if (
        not isinstance(value, list)
        or len(value) > MAX_KEYS
        or (value and (set(map(type, value)) != {int} or min(value) < 0 or max(value) >= _U64))
    ):
        raise ProtocolError(f"body.{name} must be a list of at most {MAX_KEYS} integers in [0, 2**64)")
    return tuple(value)


def _geometry(body: Mapping[str, Any], name: str) -> KVGeometry:
    value = body.get(name)
    try:
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        return KVGeometry.from_dict(value)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ProtocolError(f"HELLO geometry is invalid: {exc}", code=ErrorCode.GEOMETRY) from None


def _counter_map(body: Mapping[str, Any], name: str) -> dict[str, int | float | bool] | None:
    value = body.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > _MAX_COUNTERS
        or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, (int, float)) for k, v in value.items())
    ):
        raise ProtocolError(f"body.{name} must be null or an object of at most {_MAX_COUNTERS} named numbers")
    return value


B = TypeVar("B", bound="Body")


def _nested(cls: type[B], *, optional: bool = False) -> Any:
    def decode(body: Mapping[str, Any], name: str) -> B | None:
        value = body.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise ProtocolError(f"body.{name} must be a JSON object, got {value!r:.64}")
        return cls.decode(value)

    return _f(decode, lambda v: None if v is None else v.encode())


# -- bodies ------------------------------------------------------------------------------


class Body:
    """A message body; subclasses are dataclasses whose fields were made by the kinds above."""

    @classmethod
    def decode(cls: type[B], body: Mapping[str, Any]) -> B:
        fields = _body_fields(cls)
        extra = set(body) - {f.name for f in fields}
        if extra:
            raise ProtocolError(f"{cls.__name__} has unknown fields {sorted(extra)!r:.200}; allowed: {[f.name for f in fields]}")
        return cls(**{f.name: f.metadata["decode"](body, f.name) for f in fields})

    def encode(self) -> dict[str, Any]:
        return {f.name: f.metadata["encode"](getattr(self, f.name)) for f in _body_fields(type(self))}


def _body_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields that travel in the JSON body (a keyed request's ``keys`` travel apart)."""
    return tuple(f for f in dataclasses.fields(cls) if "decode" in f.metadata)


@dataclass(frozen=True)
class EmptyReply(Body):
    pass


class RequestBody(Body):
    TYPE: ClassVar[MsgType]
    REPLY: ClassVar[type[Body]]

    @property
    def frame_keys(self) -> tuple[bytes, ...]:
        """The keys of the key frame (LOOKUP, RESERVE); none for every other type."""
        return ()


@dataclass(frozen=True)
class ChallengeReply(Body):
    daemon_nonce: str = _f(_hex)
    proof: str = _f(_hex)


@dataclass(frozen=True)
class ChallengeRequest(RequestBody):
    TYPE = MsgType.CHALLENGE
    REPLY = ChallengeReply
    client_nonce: str = _f(_hex)


@dataclass(frozen=True)
class AuthRequest(RequestBody):
    TYPE = MsgType.AUTH
    REPLY = EmptyReply
    daemon_nonce: str = _f(_hex)
    proof: str = _f(_hex)


@dataclass(frozen=True)
class HelloReply(Body):
    epoch: str = _str(64)
    segment: str = _str(255)
    num_slabs: int = _int(1)
    slab_bytes: int = _int(1)
    chunk_size: int = _int(1)
    lease_ttl_s: float = _f(_number)


@dataclass(frozen=True)
class HelloRequest(RequestBody):
    TYPE = MsgType.HELLO
    REPLY = HelloReply
    geometry: KVGeometry = _f(_geometry, lambda g: g.to_dict())
    chunk_size: int = _int(1)
    client_id: str = _str(128)


@dataclass(frozen=True)
class LeaseReply(Body):
    lease_id: int = _int()
    slab_ids: tuple[int, ...] = _f(_u64s, list)
    generations: tuple[int, ...] = _f(_u64s, list)
    ttl_s: float = _f(_number)


@dataclass(frozen=True)
class PoolRequest(RequestBody):
    """A request that touches the pool: it names the daemon epoch its ids belong to."""

    epoch: str = _str(64)


@dataclass(frozen=True)
class KeyedRequest(PoolRequest):
    """A request about the pool's chunks: ``keys`` travel in the key frame."""

    keys: tuple[bytes, ...] = ()

    @property
    def frame_keys(self) -> tuple[bytes, ...]:
        return self.keys


@dataclass(frozen=True)
class LookupRequest(KeyedRequest):
    TYPE = MsgType.LOOKUP
    REPLY = LeaseReply


@dataclass(frozen=True)
class ReservationReply(Body):
    reservation_id: int = _int()
    chunk_indices: tuple[int, ...] = _f(_u64s, list)
    slab_ids: tuple[int, ...] = _f(_u64s, list)
    generations: tuple[int, ...] = _f(_u64s, list)
    no_room: int = _int()  # keys the pool had no slab for (counted as dropped, not dedup)
    ttl_s: float = _f(_number)


@dataclass(frozen=True)
class ReserveRequest(KeyedRequest):
    TYPE = MsgType.RESERVE
    REPLY = ReservationReply


@dataclass(frozen=True)
class CommitReply(Body):
    committed: int = _int()


@dataclass(frozen=True)
class ReservationRequest(PoolRequest):
    reservation_id: int = _int()


@dataclass(frozen=True)
class CommitRequest(ReservationRequest):
    TYPE = MsgType.COMMIT
    REPLY = CommitReply


@dataclass(frozen=True)
class AbortRequest(ReservationRequest):
    TYPE = MsgType.ABORT
    REPLY = EmptyReply


@dataclass(frozen=True)
class ReleaseRequest(PoolRequest):
    TYPE = MsgType.RELEASE
    REPLY = EmptyReply
    lease_id: int = _int()


@dataclass(frozen=True)
class PingReply(Body):
    pid: int = _int()
    epoch: str = _str(64)
    ready: bool = _f(_bool)


@dataclass(frozen=True)
class PingRequest(RequestBody):
    TYPE = MsgType.PING
    REPLY = PingReply


@dataclass
class DaemonCounters(Body):
    """The daemon's own request counters (the pool and the tiers count their own)."""

    requests: int = _int(default=0)
    errors: int = _int(default=0)
    lookups: int = _int(default=0)
    hit_chunks: int = _int(default=0)
    miss_chunks: int = _int(default=0)
    reserved_chunks: int = _int(default=0)
    committed_chunks: int = _int(default=0)
    committed_bytes: int = _int(default=0)
    disk_promotions: int = _int(default=0)
    remote_promotions: int = _int(default=0)


@dataclass(frozen=True)
class PoolCounters(Body):
    num_slabs: int = _int()
    used_slabs: int = _int()
    pinned_slabs: int = _int()
    committed_chunks: int = _int()
    evictions: int = _int()
    leases: int = _int()
    reservations: int = _int()
    quarantined_slabs: int = _int()
    slab_bytes: int = _int()
    committed_bytes: int = _int()


@dataclass(frozen=True)
class StatsReply(Body):
    """``disk`` and ``remote`` are the tiers' own stats dataclasses as name -> number maps: the
    tiers define their counters, and a client that shows them need not import the tiers."""

    pid: int = _int()
    epoch: str = _str(64)
    endpoint: str | None = _optional_str(512)
    counters: DaemonCounters = _nested(DaemonCounters)
    hit_rate: float = _f(_number)
    clients: int = _int()
    pool: PoolCounters | None = _nested(PoolCounters, optional=True)
    segment: str | None = _optional_str(255)
    disk: dict[str, int | float | bool] | None = _f(_counter_map)
    remote: dict[str, int | float | bool] | None = _f(_counter_map)


@dataclass(frozen=True)
class StatsRequest(RequestBody):
    TYPE = MsgType.STATS
    REPLY = StatsReply


@dataclass(frozen=True)
class ClearReply(Body):
    cleared: int = _int()


@dataclass(frozen=True)
class ClearRequest(RequestBody):
    TYPE = MsgType.CLEAR
    REPLY = ClearReply


#: The request body class of every message type.
REQUESTS: dict[MsgType, type[RequestBody]] = {
    cls.TYPE: cls
    for cls in (ChallengeRequest, AuthRequest, HelloRequest, LookupRequest, ReserveRequest, CommitRequest,
                AbortRequest, ReleaseRequest, PingRequest, StatsRequest, ClearRequest)
}
assert set(REQUESTS) == set(MsgType), "every message type needs a request body class"


def decode_request_body(msg_type: MsgType, body: Mapping[str, Any], keys: tuple[bytes, ...]) -> RequestBody:
    """The typed request of a decoded frame set (lmc_transfer.daemon.protocol.Request)."""
    cls = REQUESTS[msg_type]
    request = cls.decode(body)
    return dataclasses.replace(request, keys=keys) if isinstance(request, KeyedRequest) else request

