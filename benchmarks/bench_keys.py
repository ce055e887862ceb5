"""CPU benchmark: chunk keys for a 32k-token prompt (run: pytest benchmarks/bench_keys.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmc_transfer.kernels import KVGeometry, LayoutKind
from lmc_transfer.keys import KeySalt, chunk_keys

NUM_TOKENS = 32 * 1024
CHUNK_SIZE = 256
SALT = KeySalt("llama-8b", KVGeometry(LayoutKind.TOKEN_SLOT, 32, ((8, 128), (8, 128)), "bfloat16"))


@pytest.fixture(scope="module")
def token_list() -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(150_000) for _ in range(NUM_TOKENS)]


def test_chunk_keys_32k_list(benchmark, token_list: list[int]) -> None:
    keys = benchmark(chunk_keys, token_list, CHUNK_SIZE, SALT)
    assert len(keys) == NUM_TOKENS // CHUNK_SIZE


def test_chunk_keys_32k_numpy(benchmark, token_list: list[int]) -> None:
    ids = np.array(token_list, dtype=np.int64)
    keys = benchmark(chunk_keys, ids, CHUNK_SIZE, SALT)
    assert len(keys) == NUM_TOKENS // CHUNK_SIZE
