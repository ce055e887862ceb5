"""The one slab value format of every tier: exact layout, key and geometry binding, every verdict."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash

from lmc_transfer.tiers.format import FORMAT_VERSION, HEADER_BYTES, MAGIC, SlabFormat, Verdict, geometry_digest
from tests.conftest_mp import CHUNK, make_buffers

GEOMETRY = geometry_digest(make_buffers(1).geometry, CHUNK)
SLAB = 1000 + 7  # not a multiple of anything
FORMAT = SlabFormat(GEOMETRY, SLAB)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def payload(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, SLAB, dtype=np.uint8)


def test_layout_is_exactly_the_documented_header_then_the_payload():
    data = payload(1)
    value = FORMAT.encode(KEY, data)
    assert HEADER_BYTES == 104 and len(value) == FORMAT.value_bytes == HEADER_BYTES + SLAB
    prefix = struct.pack("<8sII32s32sQ", MAGIC, FORMAT_VERSION, 0, GEOMETRY, KEY, SLAB)
    assert value[: len(prefix)] == prefix
    assert value[len(prefix) : HEADER_BYTES] == xxhash.xxh3_128(prefix + data.tobytes()).digest()
    assert value[HEADER_BYTES:] == data.tobytes()
    assert FORMAT.header(KEY, memoryview(data.tobytes())) == value[:HEADER_BYTES]
    assert FORMAT.check_value(KEY, value) is Verdict.OK
    assert FORMAT.check(KEY, value[:HEADER_BYTES], data) is Verdict.OK


def test_geometry_digest_is_stable_and_tells_formats_apart():
    assert geometry_digest(make_buffers(1).geometry, CHUNK) == GEOMETRY and len(GEOMETRY) == 32
    assert geometry_digest(make_buffers(1).geometry, CHUNK * 2) != GEOMETRY
    assert geometry_digest(make_buffers(1, heads=4).geometry, CHUNK) != GEOMETRY


def _flip(value: bytes, at: int) -> bytes:
    out = bytearray(value)
    out[at] ^= 0x01
    return bytes(out)


def test_every_kind_of_bad_value_gets_its_verdict():
    value = FORMAT.encode(KEY, payload(2))
    assert FORMAT.check_value(OTHER_KEY, value) is Verdict.OTHER_KEY, "a value copied under another key"
    assert SlabFormat(bytes(32), SLAB).check_value(KEY, value) is Verdict.OTHER_GEOMETRY
    assert SlabFormat(GEOMETRY, SLAB + 1).check_value(KEY, value) is Verdict.WRONG_LENGTH
    cases = {
        "payload bit": (_flip(value, HEADER_BYTES + 17), Verdict.BAD_CHECKSUM),
        "reserved field": (_flip(value, 12), Verdict.BAD_CHECKSUM),
        "checksum bit": (_flip(value, HEADER_BYTES - 1), Verdict.BAD_CHECKSUM),
        "magic": (_flip(value, 0), Verdict.FOREIGN),
        "version": (_flip(value, 8), Verdict.FOREIGN),
        "truncated": (value[:-1], Verdict.WRONG_LENGTH),
        "header only": (value[: HEADER_BYTES - 1], Verdict.WRONG_LENGTH),
        "one byte more": (value + b"\0", Verdict.WRONG_LENGTH),
    }
    got = {name: FORMAT.check_value(KEY, bad) for name, (bad, _) in cases.items()}
    assert got == {name: verdict for name, (_, verdict) in cases.items()}


def test_values_of_the_older_formats_are_foreign():
    data = payload(3).tobytes()
    old_disk = struct.pack("<8sIIQ32s32s32s", b"LMCTKV01", 1, 0, SLAB, GEOMETRY, KEY, bytes(32)) + data
    old_redis = struct.pack("<4sHH16sQI", b"LMCR", 1, 0, bytes(16), SLAB, 0) + data
    assert FORMAT.check_value(KEY, old_disk) is Verdict.FOREIGN
    assert FORMAT.check_value(KEY, old_redis) is Verdict.FOREIGN


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="geometry: expected a 32-byte geometry_digest"):
        SlabFormat(b"short", SLAB)
    with pytest.raises(ValueError, match="payload_bytes: expected a positive int, got 0"):
        SlabFormat(GEOMETRY, 0)
    with pytest.raises(ValueError, match=f"payload: expected {SLAB} bytes, got {SLAB - 1}"):
        FORMAT.encode(KEY, payload(4)[:-1])
    with pytest.raises(TypeError, match="keys\\[0\\] must be 32 bytes"):
        FORMAT.encode(b"k", payload(4))
