"""Chunk keys: process-stable, salt-isolated, full chunks only, rolling."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmc_transfer.kernels import KVGeometry, LayoutKind
from lmc_transfer.keys import KEY_BYTES, KeySalt, chunk_keys

GEOM = KVGeometry(LayoutKind.TOKEN_SLOT, 32, ((8, 128), (8, 128)), "bfloat16")


def salt(**kw) -> KeySalt:
    return KeySalt(**{"model_id": "llama-8b", "geometry": GEOM, **kw})


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(150_000) for _ in range(n)]


def test_keys_match_the_documented_derivation() -> None:
    ids = tokens(8)
    s = b"\x01" * 32
    expected = []
    prev = bytes(32)
    for i in range(2):
        data = b"".join(t.to_bytes(4, "little") for t in ids[4 * i : 4 * i + 4])
        prev = hashlib.blake2b(prev + data, digest_size=32, key=s).digest()
        expected.append(prev)
    assert chunk_keys(ids, 4, s) == expected


def test_partial_chunk_is_not_keyed_and_prefixes_agree() -> None:
    ids = tokens(1000)
    keys = chunk_keys(ids, 256, salt())
    assert len(keys) == 3 and all(len(k) == KEY_BYTES for k in keys)
    assert chunk_keys(ids[:768], 256, salt()) == keys
    assert chunk_keys(ids[:767], 256, salt()) == keys[:2]
    assert chunk_keys(ids[:255], 256, salt()) == []
    assert len(set(keys)) == 3


def test_rolling_key_depends_on_every_earlier_chunk() -> None:
    ids = tokens(512)
    changed = list(ids)
    changed[3] += 1
    a, b = chunk_keys(ids, 256, salt()), chunk_keys(changed, 256, salt())
    assert a[0] != b[0] and a[1] != b[1]
    # Same second chunk after a different first chunk: still a different key.
    assert chunk_keys(ids[256:], 256, salt())[0] != a[1]


def test_array_and_tensor_inputs_give_the_same_keys() -> None:
    ids = tokens(600)
    expected = chunk_keys(ids, 100, salt())
    assert chunk_keys(np.array(ids, dtype=np.int64), 100, salt()) == expected
    assert chunk_keys(torch.tensor(ids, dtype=torch.int32), 100, salt()) == expected


@pytest.mark.parametrize(
    "other",
    [
        {"model_id": "llama-70b"},
        {"geometry": KVGeometry(LayoutKind.TOKEN_SLOT, 32, ((8, 128), (8, 128)), "float16")},
        {"geometry": KVGeometry(LayoutKind.TOKEN_SLOT, 31, ((8, 128), (8, 128)), "bfloat16")},
        {"geometry": KVGeometry(LayoutKind.TOKEN_SLOT, 32, ((4, 128), (4, 128)), "bfloat16")},
        {"geometry": KVGeometry(LayoutKind.PAGED_BLOCKS, 32, ((8, 128), (8, 128)), "bfloat16")},
        {"tp_rank": 1, "tp_size": 2},
        {"tp_size": 2},
        {"cache_salt": "tenant-a"},
    ],
)
def test_salt_isolation(other: dict) -> None:
    ids = tokens(512)
    base = salt()
    changed = salt(**other)
    assert changed.digest() != base.digest()
    assert set(chunk_keys(ids, 256, changed)).isdisjoint(chunk_keys(ids, 256, base))


def test_tenants_are_isolated_from_each_other() -> None:
    ids = tokens(256)
    assert chunk_keys(ids, 256, salt(cache_salt="a")) != chunk_keys(ids, 256, salt(cache_salt="b"))
    assert chunk_keys(ids, 256, salt(cache_salt="a")) == chunk_keys(ids, 256, salt(cache_salt="a"))


def test_keys_are_stable_across_processes() -> None:
    ids = tokens(1024, seed=7)
    code = (
        "import json, sys\n"
        "from lmc_transfer.kernels import KVGeometry\n"
        "from lmc_transfer.keys import KeySalt, chunk_keys\n"
        "d = json.loads(sys.stdin.read())\n"
        "s = KeySalt('llama-8b', KVGeometry.from_dict(d['geometry']), 1, 4, 't')\n"
        "print(json.dumps([s.digest().hex()] + [k.hex() for k in chunk_keys(d['ids'], 256, s)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps({"ids": ids, "geometry": GEOM.to_dict()}),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    here = salt(tp_rank=1, tp_size=4, cache_salt="t")
    assert json.loads(out.stdout) == [here.digest().hex()] + [k.hex() for k in chunk_keys(ids, 256, here)]


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        chunk_keys([1], 0, b"s")
    with pytest.raises(ValueError, match="salt bytes must be 1 to 64 bytes long, got 65"):
        chunk_keys([1], 1, b"s" * 65)
    with pytest.raises(TypeError, match="salt must be a KeySalt or bytes, got str"):
        chunk_keys([1], 1, "s")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token_ids must be ints in"):
        chunk_keys([-1], 1, b"s")
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 2\*\*32\), got values in \[-3, 5\]"):
        chunk_keys(np.array([-3, 5]), 2, b"s")
    with pytest.raises(ValueError, match=r"tp_rank must be an int in \[0, 2\), got 2"):
        salt(tp_rank=2, tp_size=2)
    with pytest.raises(ValueError, match="model_id must be a non-empty string"):
        salt(model_id="")
