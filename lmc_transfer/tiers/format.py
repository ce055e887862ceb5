"""The one value format of a chunk slab in every tier: a disk file and a Redis value are the same bytes.

A value is a fixed header followed by the slab's bytes (the payload)::

    magic         8s   b"LMCTSLAB"
    version       u32  FORMAT_VERSION (1 was the older, separate disk and Redis formats)
    reserved      u32  0
    geometry      32s  geometry_digest(): KV geometry and chunk size of the slab format
    key           32s  the chunk key this value belongs to
    payload_len   u64  slab bytes that follow
    checksum      16s  XXH3-128 over the header bytes before it, then the payload

little-endian, ``HEADER_BYTES`` long. The key and geometry sit inside the checksummed bytes, so
a value copied under another key, or written by a daemon of another geometry, fails ``check``
like a flipped bit does: a tier serves a value only for the key it was written for.

The checksum guards against accidents (bit rot, torn writes, truncation, stray or stale
values), not against a writer with access to the tier, who could compute any checksum; the
tiers' own access rules (owner-only directory, Redis authentication) cover that. XXH3-128 was
measured at ~0.3 ms per 8 MiB slab on one CPU core, against ~1.9 ms for zlib's CRC-32 and ~8.8 ms
for blake2b (the previous disk checksum), and its 128 bits make an undetected corruption
negligible.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from dataclasses import dataclass

import xxhash

from lmc_transfer.kernels.geometry import KVGeometry
from lmc_transfer.keys import KEY_BYTES, check_keys

MAGIC = b"LMCTSLAB"
FORMAT_VERSION = 2
DIGEST_BYTES = 32
_PREFIX = struct.Struct(f"<8sII{DIGEST_BYTES}s{KEY_BYTES}sQ")  # everything the checksum follows
_CHECKSUM = struct.Struct("<16s")
HEADER_BYTES = _PREFIX.size + _CHECKSUM.size


def geometry_digest(geometry: KVGeometry, chunk_size: int) -> bytes:
    """Identity of a slab format: the same geometry and chunk size give the same 32 bytes."""
    blob = json.dumps({"geometry": geometry.to_dict(), "chunk_size": chunk_size}, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=DIGEST_BYTES).digest()


class Verdict(enum.Enum):
    """What ``SlabFormat.check`` found; only ``OK`` may be served."""

    OK = "ok"
    FOREIGN = "not this format or version"  # an older format, or not a slab value at all
    OTHER_GEOMETRY = "written for another geometry"
    OTHER_KEY = "written for another key"
    WRONG_LENGTH = "wrong length"
    BAD_CHECKSUM = "checksum mismatch"


@dataclass(frozen=True)
class SlabFormat:
    """Values of one slab format: ``geometry`` (a ``geometry_digest``) and ``payload_bytes`` per slab."""

    geometry: bytes
    payload_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, bytes) or len(self.geometry) != DIGEST_BYTES:
            raise ValueError(f"geometry: expected a {DIGEST_BYTES}-byte geometry_digest, got {self.geometry!r:.80}")
        if isinstance(self.payload_bytes, bool) or not isinstance(self.payload_bytes, int) or self.payload_bytes <= 0:
            raise ValueError(f"payload_bytes: expected a positive int, got {self.payload_bytes!r}")

    @property
    def value_bytes(self) -> int:
        """Length of a whole value (header and payload)."""
        return HEADER_BYTES + self.payload_bytes

    def header(self, key: bytes, payload: bytes | memoryview) -> bytes:
        """The header of ``key``'s value holding ``payload`` (any C-contiguous buffer of the slab size)."""
        check_keys((key,))
        length = memoryview(payload).nbytes
        if length != self.payload_bytes:
            raise ValueError(f"payload: expected {self.payload_bytes} bytes, got {length}")
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, self.geometry, key, length)
        return prefix + _checksum(prefix, payload)

    def encode(self, key: bytes, payload: bytes | memoryview) -> bytes:
        """The whole value: header and payload in one bytes object (one copy of the payload)."""
        return b"".join((self.header(key, payload), payload))

    def check_header(self, key: bytes, header: bytes | memoryview) -> Verdict:
        """Everything a header alone can tell: format, geometry, key and length (not the checksum)."""
        if len(header) < HEADER_BYTES:
            return Verdict.WRONG_LENGTH
        magic, version, _reserved, geometry, value_key, length = _PREFIX.unpack_from(header)
        if magic != MAGIC or version != FORMAT_VERSION:
            return Verdict.FOREIGN
        if geometry != self.geometry:
            return Verdict.OTHER_GEOMETRY
        if value_key != key:
            return Verdict.OTHER_KEY
        if length != self.payload_bytes:
            return Verdict.WRONG_LENGTH
        return Verdict.OK

    def check(self, key: bytes, header: bytes | memoryview, payload: bytes | memoryview) -> Verdict:
        """Whether ``header`` + ``payload`` is a valid value of ``key`` in this format."""
        verdict = self.check_header(key, header)
        if verdict is not Verdict.OK:
            return verdict
        if memoryview(payload).nbytes != self.payload_bytes:
            return Verdict.WRONG_LENGTH
        (expected,) = _CHECKSUM.unpack_from(header, _PREFIX.size)
        if _checksum(header[: _PREFIX.size], payload) != expected:
            return Verdict.BAD_CHECKSUM
        return Verdict.OK

    def check_value(self, key: bytes, value: bytes | memoryview) -> Verdict:
        """``check`` of a whole value (header and payload in one buffer, as Redis holds it)."""
        view = memoryview(value)
        return self.check(key, view[:HEADER_BYTES], view[HEADER_BYTES:])


def _checksum(prefix: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    h = xxhash.xxh3_128(prefix)
    h.update(payload)
    return h.digest()
