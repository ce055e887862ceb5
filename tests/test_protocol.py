"""Wire protocol (strict decoding) and the shared-memory segment; no daemon needed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lmc_transfer.daemon.protocol import (
    KEY_BYTES,
    MAX_HEADER_BYTES,
    MAX_KEYS,
    PROTOCOL_VERSION,
    ErrorCode,
    MsgType,
    ProtocolError,
    Reply,
    Request,
    body_int,
    body_str,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from lmc_transfer.daemon.auth import SessionKey
from lmc_transfer.daemon.shm import SLAB_ALIGN, SharedSegment, segment_bytes, segment_exists

KEYS = tuple(bytes([i]) * KEY_BYTES for i in range(3))


def header(**fields) -> bytes:
    base = {"v": PROTOCOL_VERSION, "type": "PING", "id": 1}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


SESSION = SessionKey("0" * 32, bytes(range(32)))


def test_request_round_trip_keeps_every_field():
    req = Request(MsgType.LOOKUP, 42, {"epoch": "abc"}, KEYS, auth=SESSION)
    frames = encode_request(req)
    assert len(frames) == 3 and frames[1] == b"".join(KEYS) and len(frames[2]) == 32  # header, keys, MAC
    assert json.loads(frames[0])["nkeys"] == 3 and json.loads(frames[0])["session"] == SESSION.session
    assert decode_request(frames, lambda msg_type, session: SESSION) == req
    unsealed = Request(MsgType.LOOKUP, 42, {"epoch": "abc"}, KEYS)
    assert len(encode_request(unsealed)) == 2 and decode_request(encode_request(unsealed)) == unsealed
    ping = encode_request(Request(MsgType.PING, 1))
    assert len(ping) == 1 and "nkeys" not in json.loads(ping[0])
    empty = encode_request(Request(MsgType.RESERVE, 2))
    assert empty[1] == b"" and decode_request(empty).keys == ()


def test_reply_round_trip_ok_and_error():
    ok = Reply(7, True, {"lease_id": 3, "slab_ids": [1, 2], "generations": [2**64 - 1, 0]})
    frames = encode_reply(ok)
    assert json.loads(frames[0]) == {"v": 1, "id": 7, "ok": True, "body": {"lease_id": 3}, "arrays": ["slab_ids", "generations"], "alen": 2}
    assert frames[1] == np.array([1, 2, 2**64 - 1, 0], dtype="<u8").tobytes()
    assert decode_reply(frames) == ok
    assert decode_reply(encode_reply(Reply(1, True, {"slab_ids": []}))) == Reply(1, True, {"slab_ids": []})
    plain = Reply(9, True, {"pid": 5})
    assert len(encode_reply(plain)) == 1 and decode_reply(encode_reply(plain)) == plain
    err = Reply(8, False, code=ErrorCode.GEOMETRY, error="nope")
    assert decode_reply(encode_reply(err)) == Reply(8, False, {}, ErrorCode.GEOMETRY, "nope")


@pytest.mark.parametrize(
    "frames, code, fragment",
    [
        ([], ErrorCode.BAD_REQUEST, "empty message"),
        ([b"\xff\xfe"], ErrorCode.BAD_REQUEST, "not UTF-8 JSON"),
        ([b"{"], ErrorCode.BAD_REQUEST, "not UTF-8 JSON"),
        ([b"[1,2]"], ErrorCode.BAD_REQUEST, "must be a JSON object, got list"),
        ([header(extra=1)], ErrorCode.BAD_REQUEST, "unknown fields ['extra']"),
        ([header(v=2)], ErrorCode.VERSION, "protocol version must be 1, got 2"),
        ([header(v=True)], ErrorCode.VERSION, "protocol version"),
        ([header(id=-1)], ErrorCode.BAD_REQUEST, "id must be an integer"),
        ([header(id=True)], ErrorCode.BAD_REQUEST, "id must be an integer"),
        ([header(id=2**60)], ErrorCode.BAD_REQUEST, "id must be an integer"),
        ([header(id="1")], ErrorCode.BAD_REQUEST, "id must be an integer"),
        ([header(type="EXPLODE")], ErrorCode.BAD_REQUEST, "unknown message type 'EXPLODE'"),
        ([header(type=None)], ErrorCode.BAD_REQUEST, "unknown message type None"),
        ([header(body=[])], ErrorCode.BAD_REQUEST, "body must be a JSON object, got list"),
        ([header(session=5)], ErrorCode.BAD_REQUEST, "session must be a string"),
        ([header(session="s")], ErrorCode.UNAUTHORIZED, "message of an unknown session 's'"),
        ([header(token="s3cret")], ErrorCode.BAD_REQUEST, "unknown fields ['token']"),
        ([b'{"v": 1, "type": "PING", "id": 1' + b"0" * 5000 + b"}"], ErrorCode.BAD_REQUEST,
         "an integer of 5001 characters; at most 20 digits"),
        ([header(id=10**20)], ErrorCode.BAD_REQUEST, "an integer of 21 characters"),
        ([b'{"v": 1, "type": "PING", "id": 1, "body": {"x": 1e999}}'], ErrorCode.BAD_REQUEST, "not a finite float"),
        ([header(), KEYS[0]], ErrorCode.BAD_REQUEST, "PING takes no key frame and no nkeys field"),
        ([header(nkeys=0)], ErrorCode.BAD_REQUEST, "PING takes no key frame and no nkeys field"),
        ([header(type="LOOKUP"), KEYS[0]], ErrorCode.BAD_REQUEST, "nkeys must be an integer in [0, 4096]"),
        ([header(type="LOOKUP", nkeys=True), KEYS[0]], ErrorCode.BAD_REQUEST, "nkeys must be an integer"),
        ([header(type="LOOKUP", nkeys=MAX_KEYS + 1), KEYS[0] * (MAX_KEYS + 1)], ErrorCode.BAD_REQUEST, f"the limit is {MAX_KEYS}"),
        ([header(type="LOOKUP", nkeys=1)], ErrorCode.BAD_REQUEST, "LOOKUP needs exactly one key frame after the header, got 0"),
        ([header(type="LOOKUP", nkeys=1), b"x" * 31], ErrorCode.BAD_REQUEST, "key frame is 31 bytes, expected nkeys * 32 = 32"),
        ([header(type="LOOKUP", nkeys=1), b"x" * 33], ErrorCode.BAD_REQUEST, "key frame is 33 bytes, expected nkeys * 32 = 32"),
        ([header(type="LOOKUP", nkeys=3), KEYS[0] * 2], ErrorCode.BAD_REQUEST, "expected nkeys * 32 = 96 (it holds 2 keys)"),
        ([header(type="LOOKUP", nkeys=1), KEYS[0], KEYS[1]], ErrorCode.BAD_REQUEST, "message has 3 frames"),
        ([header(type="LOOKUP")] + [KEYS[0]] * (MAX_KEYS + 1), ErrorCode.BAD_REQUEST, f"message has {MAX_KEYS + 2} frames"),
        ([b" " * (MAX_HEADER_BYTES + 1)], ErrorCode.BAD_REQUEST, f"the limit is {MAX_HEADER_BYTES}"),
        ([b'{"v": NaN}'], ErrorCode.BAD_REQUEST, "non-JSON constant NaN"),
        ([b"[" * 100000 + b"]" * 100000], ErrorCode.BAD_REQUEST, "header frame"),
    ],
)
def test_decode_request_rejects_with_a_named_problem(frames, code, fragment):
    with pytest.raises(ProtocolError) as info:
        decode_request(frames)
    assert info.value.code is code
    assert fragment in str(info.value)


def test_decode_request_accepts_the_key_limit_exactly():
    frames = [header(type="RESERVE", nkeys=MAX_KEYS), KEYS[1] * MAX_KEYS]
    assert decode_request(frames).keys == (KEYS[1],) * MAX_KEYS


def test_encode_request_refuses_bad_keys():
    with pytest.raises(ValueError, match="keys\\[1\\] must be 32 bytes"):
        encode_request(Request(MsgType.LOOKUP, 1, {}, (KEYS[0], b"short")))
    # b"".join would accept these, and 31 + 33 bytes would pass a total-length check
    with pytest.raises(ValueError, match="keys\\[1\\] must be 32 bytes"):
        encode_request(Request(MsgType.LOOKUP, 1, {}, (KEYS[0], bytearray(32))))
    with pytest.raises(ValueError, match="keys\\[0\\] must be 32 bytes"):
        encode_request(Request(MsgType.LOOKUP, 1, {}, (b"x" * 31, b"y" * 33)))
    with pytest.raises(ValueError, match="PING takes no keys, got 1"):
        encode_request(Request(MsgType.PING, 1, {}, KEYS[:1]))
    with pytest.raises(ValueError, match=f"at most {MAX_KEYS} keys"):
        encode_request(Request(MsgType.LOOKUP, 1, {}, KEYS[:1] * (MAX_KEYS + 1)))


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([], "one header frame and at most one array frame, got 0"),
        ([b'{"v":1,"id":1,"ok":true}', b"x"], "only then"),
        ([b'{"v":1,"id":1,"ok":false,"code":"internal","error":"","arrays":["slab_ids"],"alen":0}', b""], "only then"),
        ([b'{"v":1,"id":1,"ok":true,"arrays":["slab_ids"],"alen":2}', b"\0" * 15], "array frame is 15 bytes, expected 1 arrays * 2 * 8 = 16"),
        ([b'{"v":1,"id":1,"ok":true,"arrays":["lease_id"],"alen":0}', b""], "arrays must be distinct names"),
        ([b'{"v":1,"id":1,"ok":true,"arrays":["slab_ids","slab_ids"],"alen":0}', b""], "arrays must be distinct names"),
        ([b'{"v":1,"id":1,"ok":true,"arrays":[["slab_ids"]],"alen":0}', b""], "arrays must be distinct names"),
        ([b'{"v":1,"id":1,"ok":true,"body":{"slab_ids":[]},"arrays":["slab_ids"],"alen":0}', b""], "not also in the body"),
        ([b'{"v":1,"id":1,"ok":true,"arrays":["slab_ids"],"alen":-1}', b""], "alen must be an integer"),
        ([b'{"v":1,"id":1,"ok":1}'], "ok must be a boolean"),
        ([b'{"v":1,"id":1,"ok":false,"code":"weird","error":""}'], "unknown error code"),
        ([b'{"v":1,"id":1,"ok":false,"code":"internal","error":3}'], "error must be a string"),
        ([b'{"v":1,"id":1,"ok":true,"keys":[]}'], "unknown fields ['keys']"),
    ],
)
def test_decode_reply_rejects_with_a_named_problem(frames, fragment):
    with pytest.raises(ProtocolError, match=None) as info:
        decode_reply(frames)
    assert fragment in str(info.value)


def test_authorize_runs_before_anything_but_type_and_session_is_parsed():
    seen = []

    def refuse(msg_type, session):
        seen.append((msg_type, session))
        raise ProtocolError("no", code=ErrorCode.UNAUTHORIZED)

    # Every problem after type and session (unknown field, bad id, bad nkeys, key frame size) loses to authorize.
    bad = [header(type="LOOKUP", id=-1, nkeys=10**9, extra=1, body=[]), b"x" * 7]
    with pytest.raises(ProtocolError) as info:
        decode_request(bad, refuse)
    assert info.value.code is ErrorCode.UNAUTHORIZED and seen == [(MsgType.LOOKUP, None)]


@pytest.mark.parametrize("where", ["header", "keys", "mac"])
def test_a_sealed_request_with_any_byte_changed_is_unauthorized(where):
    frames = encode_request(Request(MsgType.LOOKUP, 5, {"epoch": "e"}, KEYS, auth=SESSION))
    if where == "header":
        frames[0] = frames[0].replace(b'"id":5', b'"id":6')  # still valid JSON, same session
    else:
        i = {"keys": 1, "mac": 2}[where]
        frames[i] = frames[i][:-1] + bytes([frames[i][-1] ^ 1])
    with pytest.raises(ProtocolError) as info:
        decode_request(frames, lambda msg_type, session: SESSION)
    assert info.value.code is ErrorCode.UNAUTHORIZED


def test_moving_bytes_between_frames_breaks_the_mac():
    frames = encode_request(Request(MsgType.LOOKUP, 5, {"epoch": "e"}, KEYS[:1], auth=SESSION))
    other = SessionKey(SESSION.session, bytes(32))
    with pytest.raises(ProtocolError, match="without a valid MAC frame"):
        decode_request(frames, lambda msg_type, session: other)
    joined = [frames[0] + frames[1][:1], frames[1][1:], frames[2]]
    with pytest.raises(ProtocolError):
        decode_request(joined, lambda msg_type, session: SESSION)


def test_sealed_replies_name_their_session_and_unsealed_ones_none():
    ok = Reply(7, True, {"lease_id": 3, "slab_ids": [1, 2], "generations": [5, 6]}, auth=SESSION)
    frames = encode_reply(ok)
    assert len(frames) == 3 and json.loads(frames[0])["session"] == SESSION.session
    assert decode_reply(frames, SESSION) == ok
    plain = encode_reply(Reply(7, False, code=ErrorCode.UNAUTHORIZED, error="who?"))
    assert decode_reply(plain, SESSION).auth is None  # the caller decides what an unsealed reply means
    with pytest.raises(ProtocolError, match="unknown session"):
        decode_reply(frames, None)
    with pytest.raises(ProtocolError, match="unknown session"):
        decode_reply(frames, SessionKey("f" * 32, SESSION.key))
    frames[1] = frames[1][:-1] + bytes([frames[1][-1] ^ 1])
    with pytest.raises(ProtocolError, match="without a valid MAC"):
        decode_reply(frames, SESSION)


def test_body_accessors_name_the_field():
    assert body_int({"n": 3}, "n") == 3
    with pytest.raises(ProtocolError, match="body.n must be an integer in \\[0, "):
        body_int({"n": True}, "n")
    with pytest.raises(ProtocolError, match="body.n must be an integer"):
        body_int({"n": -1}, "n")
    assert body_str({"s": "x"}, "s") == "x"
    assert body_str({}, "s", optional=True) is None
    with pytest.raises(ProtocolError, match="body.s must be a string of at most 4 characters"):
        body_str({"s": "12345"}, "s", max_len=4)


# -- shared-memory segment ------------------------------------------------------


@pytest.fixture
def segment():
    seg = SharedSegment.create(5, 3 * 1024)
    try:
        yield seg
    finally:
        seg.close()
    assert not segment_exists(seg.name)


def test_segment_is_private_aligned_and_shared(segment):
    assert os.stat(f"/dev/shm{segment.name}").st_mode & 0o777 == 0o600
    assert segment.data.size == 5 * 3 * 1024 and segment.data.dtype == np.uint8
    assert segment.data.ctypes.data % SLAB_ALIGN == 0
    assert np.array_equal(segment.generations, np.zeros(5, dtype=np.uint64))
    client = SharedSegment.open(segment.name, 5, 3 * 1024)
    try:
        payload = np.random.default_rng(3).integers(0, 256, 3 * 1024, dtype=np.uint8)
        segment.slab(4)[:] = payload
        segment.generations[2] = 2**64 - 1
        assert np.array_equal(client.slab(4), payload)
        assert np.array_equal(client.slab(3), np.zeros(3 * 1024, dtype=np.uint8))
        assert client.generations.tolist() == [0, 0, 2**64 - 1, 0, 0]
        client.slab(0)[:4] = [1, 2, 3, 4]
        assert segment.slab(0)[:5].tolist() == [1, 2, 3, 4, 0]
    finally:
        client.close()
    assert segment_exists(segment.name), "a client's close must not unlink the daemon's segment"


def test_segment_open_checks_the_expected_geometry(segment):
    with pytest.raises(ValueError, match="does not match"):
        SharedSegment.open(segment.name, 6, 3 * 1024)
    with pytest.raises(ValueError, match="does not match"):
        SharedSegment.open(segment.name, 5, 2 * 1024)
    with pytest.raises(FileNotFoundError):
        SharedSegment.open(segment.name + "-missing", 5, 3 * 1024)


def test_segment_size_and_arguments():
    assert segment_bytes(1, 100) == SLAB_ALIGN + 100
    assert segment_bytes(600, 8) == 8192 + 4800  # 64 + 8 * 600 spills into a second page
    with pytest.raises(ValueError, match="num_slabs must be a positive int, got 0"):
        SharedSegment.create(0, 10)
    with pytest.raises(ValueError, match="slab_bytes must be a positive int, got -1"):
        SharedSegment.create(1, -1)


def test_a_segment_others_can_open_is_refused(segment):
    """(Another uid's segment: tests/test_mp_security.py.)"""
    path = f"/dev/shm{segment.name}"
    os.chmod(path, 0o640)
    with pytest.raises(PermissionError, match=rf"segment {segment.name} must be a regular file owned by uid "
                                              rf"{os.getuid()} with mode 0600, got a regular file owned by uid "
                                              rf"{os.getuid()} with mode 0o640"):
        SharedSegment.open(segment.name, 5, 3 * 1024)
    os.chmod(path, 0o600)
    SharedSegment.open(segment.name, 5, 3 * 1024).close()
