"""SocketReader on a socket pair: exact reads of RESP2 GET replies into destinations."""

from __future__ import annotations

import importlib
import random
import socket
import threading
import time
from typing import Iterator

import numpy as np
import pytest

from tests.test_remote_tier import REDIS_REQUIRED

redis = importlib.import_module("redis") if REDIS_REQUIRED else pytest.importorskip("redis")

from redis.exceptions import ConnectionError as RedisConnectionError  # noqa: E402
from redis.exceptions import InvalidResponse, ResponseError  # noqa: E402

from lmc_transfer.tiers.format import SlabFormat  # noqa: E402
from lmc_transfer.tiers.remote_read import Reply, SocketReader  # noqa: E402

FORMAT = SlabFormat(b"\x05" * 32, 70_001)  # crosses every socket buffer size
TIMEOUT_S = 0.2


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _value(seed: int) -> tuple[bytes, bytes, bytes]:
    rng = random.Random(seed)
    key, payload = rng.randbytes(32), rng.randbytes(FORMAT.payload_bytes)
    return key, payload, FORMAT.encode(key, payload)


def _send_later(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send from a thread: a payload larger than the socket buffer blocks until it is read."""
    t = threading.Thread(target=sock.sendall, args=(data,))
    t.start()
    return t


def _dest() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, FORMAT.payload_bytes, dtype=np.uint8)


def test_reads_one_reply_exactly_and_leaves_the_next_untouched(pair) -> None:
    server, client = pair
    (k1, p1, v1), (k2, p2, v2) = _value(1), _value(2)
    sender = _send_later(server, _bulk(v1) + b"$-1\r\n" + _bulk(v2) + b"+NEXT\r\n")
    reader = SocketReader(client, time.monotonic() + 5, TIMEOUT_S)
    d1, d2 = _dest(), _dest()
    assert reader.value_into(k1, FORMAT, memoryview(d1)) is Reply.VALUE and reader.in_sync
    assert reader.value_into(k2, FORMAT, memoryview(d2)) is Reply.MISSING and reader.in_sync
    assert reader.value_into(k2, FORMAT, memoryview(d2)) is Reply.VALUE and reader.in_sync
    sender.join(5)
    assert (d1.tobytes(), d2.tobytes()) == (p1, p2)
    assert reader.received == len(_bulk(v1)) + 5 + len(_bulk(v2))
    assert client.recv(16) == b"+NEXT\r\n"


def test_error_reply_raises_with_its_message_and_stays_in_sync(pair) -> None:
    server, client = pair
    server.sendall(b"-ERR unknown command 'GET'\r\n")
    reader = SocketReader(client, time.monotonic() + 5, TIMEOUT_S)
    with pytest.raises(ResponseError, match="^ERR unknown command 'GET'$"):
        reader.value_into(bytes(32), FORMAT, memoryview(_dest()))
    assert reader.in_sync


@pytest.mark.parametrize(
    ("reply", "in_sync"),
    [
        ("wrong_length", False),  # the value is left unread
        ("other_key", False),  # the header says so: the payload is left unread
        ("bad_checksum", True),  # found after the whole value was read
    ],
)
def test_values_that_are_not_this_keys_are_invalid(pair, reply: str, in_sync: bool) -> None:
    server, client = pair
    key, _, value = _value(3)
    other_key, _, other_value = _value(4)
    flipped = bytearray(value)
    flipped[-1] ^= 0x80
    data = {"wrong_length": _bulk(value[:-1]), "other_key": _bulk(other_value), "bad_checksum": _bulk(bytes(flipped))}
    sender = _send_later(server, data[reply])
    reader = SocketReader(client, time.monotonic() + 5, TIMEOUT_S)
    assert reader.value_into(key, FORMAT, memoryview(_dest())) is Reply.INVALID
    assert reader.in_sync is in_sync
    server.close()  # unblocks the sender of a value left unread
    sender.join(5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"+OK\r\n", "expected a bulk string reply to GET, got a reply starting with b'\\+'"),
        (b"$12x\r\n", "expected a bulk string length, got b'12x'"),
        (b"$" + b"9" * 40 + b"\r\n", "reply line longer than 24 bytes"),
    ],
)
def test_what_is_not_resp2_is_a_protocol_error(pair, data: bytes, message: str) -> None:
    server, client = pair
    server.sendall(data)
    with pytest.raises(InvalidResponse, match=message):
        SocketReader(client, time.monotonic() + 5, TIMEOUT_S).value_into(bytes(32), FORMAT, memoryview(_dest()))


def test_a_stalled_reply_times_out_and_a_closed_one_fails(pair) -> None:
    server, client = pair
    key, _, value = _value(5)
    server.sendall(_bulk(value)[:1000])
    reader = SocketReader(client, time.monotonic() + 5, TIMEOUT_S)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.value_into(key, FORMAT, memoryview(_dest()))
    assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 0.5
    assert not reader.in_sync and reader.received == 1000
    server.close()
    with pytest.raises(RedisConnectionError, match="closed the connection mid-reply"):
        reader.value_into(key, FORMAT, memoryview(_dest()))


def test_the_deadline_bounds_a_reply_that_trickles(pair) -> None:
    server, client = pair
    key, _, value = _value(6)
    stop = threading.Event()

    def trickle() -> None:
        for byte in _bulk(value):
            if stop.wait(0.01):
                return
            server.sendall(bytes([byte]))

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):  # the deadline check, or a wait cut to what is left of it
            SocketReader(client, t0 + 0.3, TIMEOUT_S).value_into(key, FORMAT, memoryview(_dest()))
        assert time.monotonic() - t0 < 0.3 + 0.1  # each byte came well within TIMEOUT_S
    finally:
        stop.set()
        sender.join(5)
