"""Wire format between MP clients and the cache daemon.

A message is one JSON header frame (UTF-8, at most ``MAX_HEADER_BYTES``) followed by
zero or more key frames, each exactly ``KEY_BYTES`` raw bytes. No pickle: the
daemon parses untrusted input with ``json`` and length checks only.

Request header: ``{"v": PROTOCOL_VERSION, "type": "LOOKUP", "id": 7, "token": "...",
"body": {...}}`` (``token`` only when the daemon has a shared secret).
Reply header: ``{"v": PROTOCOL_VERSION, "id": 7, "ok": true, "body": {...}}`` or
``{"v": ..., "id": 7, "ok": false, "code": "bad_request", "error": "..."}``.
Replies carry no key frames: slab ids and generations are small JSON lists.

Decoding is strict: unknown fields, wrong types, bad sizes and unknown types raise
``ProtocolError`` whose message names the problem; the daemon sends that message
back as an error reply.
"""

from __future__ import annotations

import enum
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

PROTOCOL_VERSION = 1
KEY_BYTES = 32
MAX_HEADER_BYTES = 64 * 1024
#: 4096 keys cover a 1M-token prompt at chunk_size 256.
MAX_KEYS = 4096
#: Request ids are JSON integers; keep them exactly representable everywhere.
MAX_REQUEST_ID = 2**53 - 1


class MsgType(str, enum.Enum):
    HELLO = "HELLO"
    LOOKUP = "LOOKUP"
    RESERVE = "RESERVE"
    COMMIT = "COMMIT"
    ABORT = "ABORT"
    RELEASE = "RELEASE"
    PING = "PING"
    STATS = "STATS"
    CLEAR = "CLEAR"


#: Request types that carry key frames; every other type must carry none.
KEYED_TYPES = frozenset({MsgType.LOOKUP, MsgType.RESERVE})


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
    token: str | None = None


@dataclass(frozen=True)
class Reply:
    request_id: int
    ok: bool
    body: dict[str, Any] = field(default_factory=dict)
    code: ErrorCode | None = None
    error: str | None = None


_REQUEST_FIELDS = {"v", "type", "id", "token", "body"}
_REPLY_FIELDS = {"v", "id", "ok", "body", "code", "error"}


def _dumps(header: dict[str, Any]) -> bytes:
    data = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(data)} bytes, the limit is {MAX_HEADER_BYTES}")
    return data


def _loads(frame: bytes, what: str) -> dict[str, Any]:
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{what} header frame is {len(frame)} bytes, the limit is {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(frame).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"{what} header frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{what} header must be a JSON object, got {type(header).__name__}")
    return header


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"header contains the non-JSON constant {name}")


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


def is_int(value: Any) -> bool:
    """JSON integers only: ``True`` is not 1 here."""
    return isinstance(value, int) and not isinstance(value, bool)


def encode_request(request: Request) -> list[bytes]:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": request.type.value, "id": request.request_id, "body": request.body}
    if request.token is not None:
        header["token"] = request.token
    for i, key in enumerate(request.keys):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"keys[{i}] must be {KEY_BYTES} bytes, got {key!r:.80}")
    if len(request.keys) > MAX_KEYS:
        raise ValueError(f"a request carries at most {MAX_KEYS} keys, got {len(request.keys)}")
    return [_dumps(header), *request.keys]


def decode_request(frames: Sequence[bytes]) -> Request:
    """Parse a request; ``frames`` excludes the ROUTER identity frame."""
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    if len(frames) - 1 > MAX_KEYS:
        raise ProtocolError(f"message has {len(frames) - 1} key frames, the limit is {MAX_KEYS}")
    header = _loads(frames[0], "request")
    extra = set(header) - _REQUEST_FIELDS
    if extra:
        raise ProtocolError(f"request header has unknown fields {sorted(extra)}")
    _check_version(header)
    request_id = _check_id(header)
    raw_type = header.get("type")
    try:
        msg_type = MsgType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {raw_type!r:.64}; expected one of {[t.value for t in MsgType]}") from None
    body = header.get("body", {})
    if not isinstance(body, dict):
        raise ProtocolError(f"body must be a JSON object, got {type(body).__name__}")
    token = header.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError(f"token must be a string, got {type(token).__name__}")
    keys = tuple(bytes(f) for f in frames[1:])
    if keys and msg_type not in KEYED_TYPES:
        raise ProtocolError(f"{msg_type.value} takes no key frames, got {len(keys)}")
    for i, key in enumerate(keys):
        if len(key) != KEY_BYTES:
            raise ProtocolError(f"key frame {i} is {len(key)} bytes, expected exactly {KEY_BYTES}")
    return Request(type=msg_type, request_id=request_id, body=body, keys=keys, token=token)


def encode_reply(reply: Reply) -> list[bytes]:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": reply.request_id, "ok": reply.ok}
    if reply.ok:
        header["body"] = reply.body
    else:
        header["code"] = (reply.code or ErrorCode.INTERNAL).value
        header["error"] = reply.error or ""
    return [_dumps(header)]


def decode_reply(frames: Sequence[bytes]) -> Reply:
    if len(frames) != 1:
        raise ProtocolError(f"a reply is exactly one header frame, got {len(frames)} frames")
    header = _loads(frames[0], "reply")
    extra = set(header) - _REPLY_FIELDS
    if extra:
        raise ProtocolError(f"reply header has unknown fields {sorted(extra)}")
    _check_version(header)
    request_id = _check_id(header)
    ok = header.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError(f"ok must be a boolean, got {ok!r}")
    if ok:
        body = header.get("body", {})
        if not isinstance(body, dict):
            raise ProtocolError(f"body must be a JSON object, got {type(body).__name__}")
        return Reply(request_id=request_id, ok=True, body=body)
    try:
        code = ErrorCode(header.get("code"))
    except ValueError:
        raise ProtocolError(f"unknown error code {header.get('code')!r:.64}") from None
    error = header.get("error")
    if not isinstance(error, str):
        raise ProtocolError(f"error must be a string, got {type(error).__name__}")
    return Reply(request_id=request_id, ok=False, code=code, error=error)


def check_token(expected: str | None, given: str | None) -> None:
    """Raise ``ProtocolError(UNAUTHORIZED)`` unless ``given`` matches; constant time."""
    if expected is None:
        return
    if given is None or not hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8")):
        raise ProtocolError("missing or wrong auth token", code=ErrorCode.UNAUTHORIZED)


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


def body_dict(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if not isinstance(value, dict):
        raise ProtocolError(f"body.{name} must be a JSON object, got {value!r:.64}")
    return value


def check_body_fields(body: dict[str, Any], allowed: Sequence[str], msg_type: MsgType) -> None:
    extra = set(body) - set(allowed)
    if extra:
        raise ProtocolError(f"{msg_type.value} body has unknown fields {sorted(extra)}; allowed: {sorted(allowed)}")
