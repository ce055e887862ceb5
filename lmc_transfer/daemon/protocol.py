"""Wire format between MP clients and the cache daemon.

A message is one JSON header frame (UTF-8, at most ``MAX_HEADER_BYTES``). Keyed
requests (LOOKUP, RESERVE) carry exactly one more frame: all their keys
concatenated, ``nkeys * KEY_BYTES`` raw bytes, where ``nkeys`` is a header field.
One frame instead of one per key because ZMQ's per-frame cost dominated a
128-key LOOKUP. No pickle: the daemon parses untrusted input with ``json`` and
length checks only.

Request header: ``{"v": PROTOCOL_VERSION, "type": "LOOKUP", "id": 7, "session": "...",
"nkeys": 128, "body": {...}}`` (``nkeys`` on keyed requests only, and required there).
A header with ``session`` (a daemon with a token, after the handshake of
lmc_transfer.daemon.auth) belongs to a sealed message: its last frame is the session's MAC
over the frames before it, checked and stripped before anything but the header's type and
session is read. Replies to sealed requests are sealed the same way.
The typed bodies of every message type are in lmc_transfer.daemon.messages.
Reply header: ``{"v": PROTOCOL_VERSION, "id": 7, "ok": true, "body": {...}}`` or
``{"v": ..., "id": 7, "ok": false, "code": "bad_request", "error": "..."}``.
Replies carry the integer lists of ``ARRAY_FIELDS`` (slab ids, generations, chunk
indices) outside the JSON: the header lists their names in ``"arrays"`` and their
common length in ``"alen"``, and one raw frame holds them back to back as
little-endian uint64. ``encode_reply`` moves those body fields there and
``decode_reply`` puts them back as lists of ints, so callers see plain bodies.

Decoding is strict: unknown fields, wrong types, bad sizes and unknown types raise
``ProtocolError`` whose message names the problem; the daemon sends that message
back as an error reply. JSON integers longer than ``MAX_INT_DIGITS`` and non-finite
numbers are refused while parsing (Python would otherwise spend time on, or refuse
with an unrelated error, integers of thousands of digits). ``decode_request`` asks
its ``authorize`` callback about the type and session before it parses anything else.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from lmc_transfer.daemon.auth import SessionKey, seal, unseal
from lmc_transfer.keys import KEY_BYTES, check_keys

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
#: 4096 keys cover a 1M-token prompt at chunk_size 256.
MAX_KEYS = 4096
#: Request ids are JSON integers; keep them exactly representable everywhere.
MAX_REQUEST_ID = 2**53 - 1
#: Every integer of the protocol fits in a uint64 (20 digits).
MAX_INT_DIGITS = 20


class MsgType(str, enum.Enum):
    CHALLENGE = "CHALLENGE"  # the two handshake steps (lmc_transfer.daemon.auth)
    AUTH = "AUTH"
    HELLO = "HELLO"
    LOOKUP = "LOOKUP"
    RESERVE = "RESERVE"
    COMMIT = "COMMIT"
    ABORT = "ABORT"
    RELEASE = "RELEASE"
    PING = "PING"
    STATS = "STATS"
    CLEAR = "CLEAR"


#: Request types that carry the key frame; every other type must carry none.
KEYED_TYPES = frozenset({MsgType.LOOKUP, MsgType.RESERVE})
#: The only requests a daemon with a token answers without a session.
HANDSHAKE_TYPES = frozenset({MsgType.CHALLENGE, MsgType.AUTH})


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    VERSION = "version"
    GEOMETRY = "geometry"
    HELLO_REQUIRED = "hello_required"  # no pool yet, or the client's epoch is not this daemon's
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message that does not follow this module's format; ``code`` says which kind."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Request:
    type: MsgType
    request_id: int
    body: dict[str, Any] = field(default_factory=dict)
    keys: tuple[bytes, ...] = ()
    auth: SessionKey | None = None  # the session that seals it (encoding) or sealed it (decoded)


@dataclass(frozen=True)
class Reply:
    request_id: int
    ok: bool
    body: dict[str, Any] = field(default_factory=dict)
    code: ErrorCode | None = None
    error: str | None = None
    auth: SessionKey | None = None  # as in Request: a decoded reply has it only if its MAC held


_REQUEST_FIELDS = {"v", "type", "id", "session", "nkeys", "body"}
_REPLY_FIELDS = {"v", "id", "ok", "session", "body", "code", "error", "arrays", "alen"}
#: Reply body fields that travel as the raw uint64 array frame; all have one length.
ARRAY_FIELDS = ("chunk_indices", "slab_ids", "generations")
_U64 = np.dtype("<u8")


def _dumps(header: dict[str, Any]) -> bytes:
    data = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(data)} bytes, the limit is {MAX_HEADER_BYTES}")
    return data


def _loads(frame: bytes, what: str) -> dict[str, Any]:
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{what} header frame is {len(frame)} bytes, the limit is {MAX_HEADER_BYTES}")
    try:
        header = json.loads(
            bytes(frame).decode("utf-8"), parse_constant=_reject_constant, parse_int=_bounded_int, parse_float=_finite_float
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"{what} header frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{what} header must be a JSON object, got {type(header).__name__}")
    return header


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"header contains the non-JSON constant {name}")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError(f"header contains an integer of {len(text)} characters; at most {MAX_INT_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"header contains the number {text:.32} that is not a finite float")
    return value


def _check_version(header: dict[str, Any]) -> None:
    version = header.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(
            f"protocol version must be {PROTOCOL_VERSION}, got {version!r}", code=ErrorCode.VERSION
        )


def _check_id(header: dict[str, Any]) -> int:
    request_id = header.get("id")
    if not is_int(request_id) or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ProtocolError(f"id must be an integer in [0, {MAX_REQUEST_ID}], got {request_id!r}")
    return request_id


def _check_fields(header: dict[str, Any], what: str, fields: set[str]) -> None:
    extra = set(header) - fields
    if extra:
        raise ProtocolError(f"{what} header has unknown fields {sorted(extra)!r:.200}")


def is_int(value: Any) -> bool:
    """JSON integers only: ``True`` is not 1 here."""
    return isinstance(value, int) and not isinstance(value, bool)


@functools.lru_cache(maxsize=64)
def _key_splitter(nkeys: int) -> struct.Struct:
    return struct.Struct(f"{KEY_BYTES}s" * nkeys)


def split_keys(blob: bytes, nkeys: int) -> tuple[bytes, ...]:
    """The ``nkeys`` keys of one key frame; ``ProtocolError`` unless its length matches."""
    if len(blob) != nkeys * KEY_BYTES:
        raise ProtocolError(
            f"key frame is {len(blob)} bytes, expected nkeys * {KEY_BYTES} = {nkeys * KEY_BYTES}"
            + ("" if len(blob) % KEY_BYTES else f" (it holds {len(blob) // KEY_BYTES} keys)")
        )
    return _key_splitter(nkeys).unpack(blob) if nkeys else ()


def _sealed(header: dict[str, Any], frames: list[bytes], auth: SessionKey | None) -> list[bytes]:
    """The header frame first, then ``frames``; sealed (and naming its session) under ``auth``."""
    if auth is None:
        return [_dumps(header), *frames]
    header["session"] = auth.session
    return seal([_dumps(header), *frames], auth)


def _unsealed(header: dict[str, Any], frames: Sequence[bytes], auth: SessionKey | None) -> Sequence[bytes]:
    """The frames of a message without its MAC frame; ``auth`` is the session its header names."""
    session = header.get("session")
    if session is None:
        return frames
    if auth is None or session != auth.session:
        raise ProtocolError(f"message of an unknown session {session!r:.40}", code=ErrorCode.UNAUTHORIZED)
    inner = unseal(frames, auth)
    if inner is None:
        raise ProtocolError("sealed message without a valid MAC frame", code=ErrorCode.UNAUTHORIZED)
    return inner


def encode_request(request: Request) -> list[bytes]:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": request.type.value, "id": request.request_id, "body": request.body}
    keys = check_keys(request.keys, ValueError, limit=MAX_KEYS)
    if request.type not in KEYED_TYPES:
        if keys:
            raise ValueError(f"keys: {request.type.value} takes no keys, got {len(keys)}")
        return _sealed(header, [], request.auth)
    header["nkeys"] = len(keys)
    return _sealed(header, [b"".join(keys)], request.auth)


#: ``authorize(type, session)``: the session's key, or None for a request that needs none;
#: raises ProtocolError(UNAUTHORIZED) for a request the peer may not make.
Authorize = Callable[[MsgType, "str | None"], "SessionKey | None"]


def request_id_of(frames: Sequence[bytes]) -> int:
    """The request id a rejected message's header names, else 0 (what its error reply carries)."""
    try:
        header = _loads(frames[0], "request")
        return _check_id(header)
    except (ProtocolError, IndexError):
        return 0


def decode_request(frames: Sequence[bytes], authorize: Authorize | None = None) -> Request:
    """Parse a request; ``frames`` excludes the ROUTER identity frame.

    ``authorize`` runs once the header is JSON of this version with a known type, before the
    MAC frame is checked and before the body, the keys or any other field is looked at; without
    it, only unsealed requests decode."""
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    if len(frames) > 3:
        raise ProtocolError(f"message has {len(frames)} frames, expected a header, at most one key frame and a MAC")
    header = _loads(frames[0], "request")
    _check_version(header)
    raw_type = header.get("type")
    try:
        msg_type = MsgType(raw_type)
    except (ValueError, TypeError):
        raise ProtocolError(f"unknown message type {raw_type!r:.64}; expected one of {[t.value for t in MsgType]}") from None
    session = header.get("session")
    if session is not None and not isinstance(session, str):
        raise ProtocolError(f"session must be a string, got {type(session).__name__}")
    auth = authorize(msg_type, session) if authorize is not None else None
    frames = _unsealed(header, frames, auth)
    if len(frames) > 2:
        raise ProtocolError(f"message has {len(frames)} frames, expected a header and at most one key frame")
    _check_fields(header, "request", _REQUEST_FIELDS)
    request_id = _check_id(header)
    body = header.get("body", {})
    if not isinstance(body, dict):
        raise ProtocolError(f"body must be a JSON object, got {type(body).__name__}")
    keys: tuple[bytes, ...] = ()
    if msg_type in KEYED_TYPES:
        nkeys = header.get("nkeys")
        if not is_int(nkeys) or not 0 <= nkeys <= MAX_KEYS:
            raise ProtocolError(f"nkeys must be an integer in [0, {MAX_KEYS}] (the limit is {MAX_KEYS}), got {nkeys!r:.64}")
        if len(frames) != 2:
            raise ProtocolError(f"{msg_type.value} needs exactly one key frame after the header, got {len(frames) - 1}")
        keys = split_keys(bytes(frames[1]), nkeys)
    elif len(frames) > 1 or "nkeys" in header:
        raise ProtocolError(f"{msg_type.value} takes no key frame and no nkeys field")
    return Request(type=msg_type, request_id=request_id, body=body, keys=keys, auth=auth if session is not None else None)


def encode_reply(reply: Reply) -> list[bytes]:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": reply.request_id, "ok": reply.ok}
    if not reply.ok:
        header["code"] = (reply.code or ErrorCode.INTERNAL).value
        header["error"] = reply.error or ""
        return _sealed(header, [], reply.auth)
    names = [name for name in ARRAY_FIELDS if name in reply.body]
    if not names:
        header["body"] = reply.body
        return _sealed(header, [], reply.auth)
    header["body"] = {k: v for k, v in reply.body.items() if k not in names}
    arrays = [np.asarray(reply.body[name], dtype=_U64) for name in names]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"reply arrays {names} must be 1-D and of one length, got shapes {[a.shape for a in arrays]}")
    header["arrays"] = names
    header["alen"] = len(arrays[0])
    return _sealed(header, [b"".join(a.tobytes() for a in arrays)], reply.auth)


def decode_reply(frames: Sequence[bytes], auth: SessionKey | None = None) -> Reply:
    """Parse a reply; a sealed one must be sealed by ``auth`` (the client's session)."""
    if not frames:
        raise ProtocolError("a reply is one header frame and at most one array frame, got 0 frames")
    header = _loads(frames[0], "reply")
    frames = _unsealed(header, frames, auth)
    sealed_by = auth if "session" in header else None
    if len(frames) not in (1, 2):
        raise ProtocolError(f"a reply is one header frame and at most one array frame, got {len(frames)} frames")
    _check_fields(header, "reply", _REPLY_FIELDS)
    _check_version(header)
    request_id = _check_id(header)
    ok = header.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError(f"ok must be a boolean, got {ok!r}")
    has_arrays = "arrays" in header or "alen" in header
    if has_arrays != (len(frames) == 2) or (has_arrays and not ok):
        raise ProtocolError("an array frame comes with arrays/alen header fields on an ok reply, and only then")
    if ok:
        body = header.get("body", {})
        if not isinstance(body, dict):
            raise ProtocolError(f"body must be a JSON object, got {type(body).__name__}")
        if has_arrays:
            body = {**body, **_decode_arrays(header, frames[1], body)}
        return Reply(request_id=request_id, ok=True, body=body, auth=sealed_by)
    try:
        code = ErrorCode(header.get("code"))
    except ValueError:
        raise ProtocolError(f"unknown error code {header.get('code')!r:.64}") from None
    error = header.get("error")
    if not isinstance(error, str):
        raise ProtocolError(f"error must be a string, got {type(error).__name__}")
    return Reply(request_id=request_id, ok=False, code=code, error=error, auth=sealed_by)


def _decode_arrays(header: dict[str, Any], frame: bytes, body: dict[str, Any]) -> dict[str, list[int]]:
    names, alen = header.get("arrays"), header.get("alen")
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
        or not set(names) <= set(ARRAY_FIELDS)
        or set(names) & set(body)
    ):
        raise ProtocolError(f"arrays must be distinct names from {list(ARRAY_FIELDS)} not also in the body, got {names!r:.128}")
    if not is_int(alen) or not 0 <= alen <= MAX_KEYS:
        raise ProtocolError(f"alen must be an integer in [0, {MAX_KEYS}], got {alen!r:.64}")
    expected = len(names) * alen * _U64.itemsize
    if len(frame) != expected:
        raise ProtocolError(f"array frame is {len(frame)} bytes, expected {len(names)} arrays * {alen} * 8 = {expected}")
    rows = np.frombuffer(frame, dtype=_U64).reshape(len(names), alen).tolist()
    return dict(zip(names, rows))


# -- typed access to request bodies (the server's view of untrusted JSON) ------------


def body_int(body: dict[str, Any], name: str, *, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    value = body.get(name)
    if not is_int(value) or not minimum <= value <= maximum:
        raise ProtocolError(f"body.{name} must be an integer in [{minimum}, {maximum}], got {value!r:.64}")
    return value


def body_str(body: dict[str, Any], name: str, *, max_len: int = 256, optional: bool = False) -> str | None:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"body.{name} must be a string of at most {max_len} characters, got {value!r:.64}")
    return value
