"""Chunk keys: a rolling keyed hash over full chunks of token ids.

``key_i = blake2b(key=salt, key_{i-1} || token ids of chunk i)``, 32 bytes. The
salt binds the model, the KV geometry, the TP rank/size and an optional
per-tenant ``cache_salt``, so two deployments (or tenants) never share a key.
Everything is computed from fixed-width little-endian bytes with hashlib, so a
key is the same in every process and on every machine (no ``hash()``, no
PYTHONHASHSEED). Only full chunks are keyed.

This module imports no torch (the daemon checks keys with it): a token-id tensor is
recognised only when torch is already loaded, which it must be for one to exist.
"""

from __future__ import annotations

import array
import hashlib
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from lmc_transfer.kernels.geometry import KVGeometry

if TYPE_CHECKING:
    import torch

#: Length of every chunk key, in the pool, on the wire and in every tier's values.
KEY_BYTES = 32
#: Bumped whenever the key derivation changes, so old disk tiers never match.
_KEY_VERSION = 1
_FIRST_PREV = bytes(KEY_BYTES)
_MAX_SALT_BYTES = 64  # blake2b's key limit


@dataclass(frozen=True)
class KeySalt:
    """Everything besides token ids that must match for two chunks' KV to be interchangeable."""

    model_id: str
    geometry: KVGeometry
    tp_rank: int = 0
    tp_size: int = 1
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
        if not isinstance(self.geometry, KVGeometry):
            raise TypeError(f"geometry must be a KVGeometry, got {type(self.geometry).__name__}")
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tp_size must be an int >= 1, got {self.tp_size!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be an int in [0, {self.tp_size}), got {self.tp_rank!r}")
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise TypeError(f"cache_salt must be a str or None, got {type(self.cache_salt).__name__}")

    def digest(self) -> bytes:
        """32 bytes identifying this salt; canonical JSON so field order never matters."""
        doc = {
            "version": _KEY_VERSION,
            "model_id": self.model_id,
            "geometry": self.geometry.to_dict(),
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "cache_salt": self.cache_salt,
        }
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(blob, digest_size=KEY_BYTES, person=b"lmc-salt").digest()


def check_keys(
    keys: Sequence[bytes], error: type[Exception] = TypeError, *, limit: int | None = None
) -> tuple[bytes, ...]:
    """``keys`` as a tuple after checking each is ``KEY_BYTES`` of ``bytes`` and, with
    ``limit``, that there are at most that many; raises ``error`` naming the first bad key."""
    out = tuple(keys)
    if limit is not None and len(out) > limit:
        raise ValueError(f"keys: at most {limit} keys per call, got {len(out)}")
    # Whole-sequence checks run in C (a LOOKUP is latency-bound); the loop only finds the culprit.
    if out and (set(map(type, out)) != {bytes} or set(map(len, out)) != {KEY_BYTES}):
        for i, key in enumerate(out):
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise error(f"keys[{i}] must be {KEY_BYTES} bytes, got {key!r:.80}")
    return out


def _token_bytes(token_ids: Sequence[int] | np.ndarray | torch.Tensor, count: int) -> bytes:
    """The first ``count`` token ids as little-endian uint32."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    if isinstance(token_ids, np.ndarray):
        ids = token_ids[:count]
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise TypeError(f"token_ids must be a 1-D integer array, got {ids.dtype} of shape {token_ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() > 0xFFFFFFFF):
            raise ValueError(f"token_ids must be in [0, 2**32), got values in [{ids.min()}, {ids.max()}]")
        return ids.astype("<u4", copy=False).tobytes()
    try:
        packed = array.array("I", token_ids[:count])
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token_ids must be ints in [0, 2**32): {exc}") from None
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def chunk_keys(
    token_ids: Sequence[int] | np.ndarray | torch.Tensor, chunk_size: int, salt: KeySalt | bytes
) -> list[bytes]:
    """One 32-byte key per full chunk of ``token_ids``; a trailing partial chunk gets none."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(salt, KeySalt):
        salt_bytes = salt.digest()
    elif isinstance(salt, bytes):
        if not 1 <= len(salt) <= _MAX_SALT_BYTES:
            raise ValueError(f"salt bytes must be 1 to {_MAX_SALT_BYTES} bytes long, got {len(salt)}")
        salt_bytes = salt
    else:
        raise TypeError(f"salt must be a KeySalt or bytes, got {type(salt).__name__}")
    num_chunks = len(token_ids) // chunk_size
    data = memoryview(_token_bytes(token_ids, num_chunks * chunk_size))
    step = 4 * chunk_size
    keys = []
    prev = _FIRST_PREV
    for start in range(0, num_chunks * step, step):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES, key=salt_bytes)
        h.update(data[start : start + step])
        prev = h.digest()
        keys.append(prev)
    return keys
