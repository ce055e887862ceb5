"""The cache daemon as a real subprocess: protocol handling, hostile input, expiry,
STATS, disk tier across restarts, CLI, tcp (the disk tier on its own: tests/test_disk_tier.py)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq

from lmc_transfer.config import LMCTransferConfig, load_config
from lmc_transfer.daemon import auth
from lmc_transfer.daemon.auth import SessionKey
from lmc_transfer.daemon.instance import read_token, token_path
from lmc_transfer.store.mp_client import DaemonConnection, DaemonError, MPStore, UntrustedDaemon
from lmc_transfer.daemon.protocol import (
    KEY_BYTES,
    MAX_KEYS,
    PROTOCOL_VERSION,
    ErrorCode,
    MsgType,
    Reply,
    Request,
    decode_reply,
    encode_request,
)
from lmc_transfer.daemon.server import CacheDaemon, check_bind_address
from lmc_transfer.daemon.shm import SharedSegment, segment_exists
from tests.conftest_mp import (  # noqa: F401  (fixtures)
    CHUNK,
    REPO,
    SLAB_BYTES,
    daemon_env,
    daemons,
    expected_after_load,
    make_buffers,
    prompt_keys,
    raw_socket,
    engine_load,
    engine_store,
    start_daemon,
    tokens_for,
    workdir,
    write_config,
)

pytestmark = pytest.mark.timeout(120)


def hello_body(buffers=None, chunk_size: int = CHUNK) -> dict:
    buffers = buffers or make_buffers(1)
    return {"geometry": buffers.geometry.to_dict(), "chunk_size": chunk_size, "client_id": "t"}


def test_ping_stats_and_out_of_order_requests(workdir, daemons):
    d = start_daemon(daemons, write_config(workdir))
    assert d.request(MsgType.PING)["ready"] is False
    stats = d.stats()
    assert stats["pool"] is None and stats["segment"] is None
    with pytest.raises(DaemonError) as info:
        d.request(MsgType.LOOKUP, {"epoch": "x"}, (b"k" * 32,))
    assert info.value.code is ErrorCode.HELLO_REQUIRED
    hello = d.request(MsgType.HELLO, hello_body())
    assert hello["slab_bytes"] == SLAB_BYTES and hello["num_slabs"] == 64
    with pytest.raises(DaemonError) as info:
        d.request(MsgType.COMMIT, {"epoch": "stale", "reservation_id": 1})
    assert info.value.code is ErrorCode.HELLO_REQUIRED
    lease = d.request(MsgType.LOOKUP, {"epoch": hello["epoch"]}, (b"k" * 32,))
    assert lease == {"lease_id": 0, "slab_ids": [], "generations": [], "ttl_s": 10.0}
    assert d.request(MsgType.PING)["ready"] is True
    rc = d.stop()
    assert rc == 0 and d.leftovers() == []
    assert "listening on ipc://" in d.log() and hello["segment"] in d.log()


def test_hello_with_other_geometry_or_chunk_size_is_refused(workdir, daemons):
    d = start_daemon(daemons, write_config(workdir))
    d.request(MsgType.HELLO, hello_body())
    with pytest.raises(DaemonError) as info:
        d.request(MsgType.HELLO, hello_body(make_buffers(1, heads=4)))
    assert info.value.code is ErrorCode.GEOMETRY and "differs from the pool's" in str(info.value)
    with pytest.raises(DaemonError) as info:
        d.request(MsgType.HELLO, hello_body(chunk_size=CHUNK * 2))
    assert info.value.code is ErrorCode.GEOMETRY and f"chunk_size must be the daemon's {CHUNK}" in str(info.value)
    with pytest.raises(DaemonError) as info:
        d.request(MsgType.HELLO, {"geometry": {"kind": "nope"}, "chunk_size": CHUNK, "client_id": "t"})
    assert info.value.code is ErrorCode.GEOMETRY
    # an engine with another geometry is refused at construction
    with pytest.raises(ValueError, match="refused this engine"):
        MPStore(d.config, make_buffers(1, heads=4))


HUGE = "@HUGE@"  # in a header dict: replaced by an integer literal of thousands of digits


def _json(header: dict, rng: random.Random) -> bytes:
    text = json.dumps(header)
    return text.replace(f'"{HUGE}"', "9" * rng.randrange(21, 6000)).encode()


def _garbage_messages(rng: random.Random, epoch: str, session: SessionKey) -> list[list[bytes]]:
    """Hostile messages: malformed frames and headers, integers past any bound (item 9),
    requests without, with forged or with tampered sessions (item 1), and sealed garbage that
    gets past authentication and tests the body checks behind it."""

    def hdr(**kw) -> dict:
        base = {"v": PROTOCOL_VERSION, "type": "LOOKUP", "id": rng.randrange(1, 10**6), "body": {"epoch": epoch}}
        base.update(kw)
        return base

    def plain(header: dict, *rest: bytes) -> list[bytes]:
        return [_json(header, rng), *rest]

    def sealed(header: dict, *rest: bytes) -> list[bytes]:
        return auth.seal([_json({**header, "session": session.session}, rng), *rest], session)

    def tampered(header: dict, *rest: bytes) -> list[bytes]:
        frames = sealed(header, *rest)
        i = rng.randrange(len(frames))
        frames[i] = frames[i][:-1] + bytes([frames[i][-1] ^ 1]) if frames[i] else b"x"
        return frames

    key = bytes(KEY_BYTES)
    nonce = "ab" * 32
    big_hello = {"geometry": {"kind": "mla", "num_layers": 10**9, "plane_shapes": [[10**9]], "dtype": "float32"},
                 "chunk_size": CHUNK, "client_id": "x"}
    unauthenticated = [
        lambda: [rng.randbytes(rng.randrange(0, 200))],
        lambda: [rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(2, 6))],
        lambda: [plain(hdr())[0][: rng.randrange(0, 40)]],
        lambda: plain(hdr(type=rng.choice(["", "lookup", "HELLO ", "X" * 300, 5, None]))),
        lambda: plain(hdr(v=rng.choice([0, 2, "1", None, 1.5, HUGE]))),
        lambda: plain(hdr(id=rng.choice([-1, 2**64, "7", None, 1.0, HUGE]))),
        lambda: plain(hdr(body=rng.choice([[], "x", 3, None, {"n": HUGE}]))),
        lambda: plain(hdr(nkeys=rng.choice([HUGE, -1, 1.0])), key),
        lambda: [b'{"v": 1, "type": "PING", "id": 1, "body": {"x": ' + rng.choice([b"1e999", b"-1e400"]) + b"}}"],
        lambda: plain(hdr(), key + b"\x00"),
        lambda: plain(hdr()) + [key] * (MAX_KEYS + 1),
        lambda: [b"{" * 70000],
        lambda: [b" " * 70000 + b"{}"],
        lambda: plain(hdr(type="HELLO", body={"geometry": {"kind": "nope"}, "chunk_size": 3, "client_id": "x"})),
        lambda: plain(hdr(type="RESERVE", nkeys=1), key),
        lambda: plain(hdr(type="COMMIT", body={"epoch": epoch, "reservation_id": 1})),
        lambda: plain(hdr(type="CLEAR", body={})),
        lambda: plain(hdr(type="STATS", body={})),
        lambda: plain(hdr(token=rng.choice(["t0ken", "", "x" * 1000]))),
        lambda: plain(hdr(session=rng.choice(["", "x" * 40, session.session, 7]))),  # a real id, no MAC
        lambda: plain(hdr(session=session.session, type="PING", body={}), rng.randbytes(32)),  # forged MAC
        lambda: tampered(hdr(type="PING", body={})),
        lambda: tampered(hdr(nkeys=2), key * 2),
        lambda: plain(hdr(type="CHALLENGE", body={"client_nonce": rng.choice(["", "zz" * 32, "0" * 63, 5, HUGE])})),
        lambda: plain(hdr(type="CHALLENGE", body={"client_nonce": nonce})),  # answered: a nonce and a proof
        lambda: plain(hdr(type="CHALLENGE", body={"client_nonce": nonce}, session=session.session)),
        lambda: plain(hdr(type="AUTH", body={"daemon_nonce": nonce, "proof": rng.choice([nonce, "0" * 64])})),
        lambda: plain(hdr(type="AUTH", body={"daemon_nonce": nonce})),
    ]
    authenticated = [
        lambda: sealed(hdr(type=rng.choice(["", "EXPLODE", None]))),
        lambda: sealed(hdr(id=HUGE)),
        lambda: sealed(hdr(type="COMMIT", body={"epoch": epoch, "reservation_id": rng.choice([-5, "1", 2**70, None, HUGE])})),
        lambda: sealed(hdr(type="RELEASE", body={"epoch": epoch, "lease_id": rng.randrange(0, 10**9)})),
        lambda: sealed(hdr(type="ABORT", body={"epoch": epoch, "reservation_id": rng.randrange(0, 10**9)})),
        lambda: sealed(hdr(type="RESERVE", body={"epoch": epoch, "extra": 1}, nkeys=1), key),
        lambda: sealed(hdr(nkeys=rng.randrange(0, 5)), key * rng.randrange(0, 5) + key[: rng.choice([0, 1, 31])]),
        lambda: sealed(hdr(nkeys=HUGE), key),
        lambda: sealed(hdr(type="PING", nkeys=1), key),
        lambda: sealed(hdr(type="HELLO", body=rng.choice([big_hello, {"geometry": [], "chunk_size": CHUNK, "client_id": "x"}]))),
        lambda: sealed(hdr(type="STATS", body={"x": 1})),
        lambda: sealed(hdr(type="LOOKUP", body={"epoch": "stale"}, nkeys=1), key),
        lambda: sealed(hdr(type="AUTH", body={"daemon_nonce": nonce, "proof": nonce})),
    ]
    return [rng.choice(rng.choice([unauthenticated, authenticated]))() for _ in range(3000)]


def _open_session(sock: zmq.Socket, token: str) -> SessionKey:
    """The handshake of lmc_transfer.daemon.auth over a raw socket, step by step."""
    client_nonce = auth.new_nonce()
    sock.send_multipart(encode_request(Request(MsgType.CHALLENGE, 1, {"client_nonce": client_nonce})))
    challenge = decode_reply(sock.recv_multipart())
    assert challenge.ok and challenge.auth is None and set(challenge.body) == {"daemon_nonce", "proof"}
    daemon_nonce = challenge.body["daemon_nonce"]
    assert auth.same(auth.daemon_proof(token, client_nonce, daemon_nonce), challenge.body["proof"])
    session = auth.derive_session(token, client_nonce, daemon_nonce)
    proof = auth.client_proof(token, client_nonce, daemon_nonce)
    sock.send_multipart(encode_request(Request(MsgType.AUTH, 2, {"daemon_nonce": daemon_nonce, "proof": proof})))
    opened = decode_reply(sock.recv_multipart(), session)
    assert opened.ok and opened.auth == session
    return session


#: Words an error reply to an unauthenticated peer must not contain: they would describe the pool.
POOL_WORDS = ("geometry", "slab", "segment", "num_layers", "chunk_size", "epoch", "lmct-", str(SLAB_BYTES))


@pytest.mark.parametrize("endpoint", ["ipc with mp_auth_token", "tcp without mp_auth_token"])
def test_fuzz_garbage_never_kills_the_daemon(workdir, daemons, endpoint):
    if endpoint.startswith("ipc"):
        cfg = write_config(workdir, mp_auth_token="t0ken", max_local_cpu_size=8 * SLAB_BYTES / 1024**3)
    else:
        cfg = write_config(workdir, mp_socket=None, mp_host="127.0.0.1", mp_port=_free_port(),
                           max_local_cpu_size=8 * SLAB_BYTES / 1024**3)
    d = start_daemon(daemons, cfg)
    token = d.config.mp_auth_token or read_token(token_path(d.config))
    store = MPStore(d.config, make_buffers(11))
    try:
        stats0 = d.stats()
        log_bytes0 = d.log_path.stat().st_size
        replies: list[Reply] = []
        start = time.monotonic()
        with raw_socket(d.config.mp_url) as sock:
            session = _open_session(sock, token)
            messages = _garbage_messages(random.Random(1234), store._session.epoch, session)

            def receive() -> None:
                replies.append(decode_reply(sock.recv_multipart(), session))  # every reply is well-formed

            for i, msg in enumerate(messages):
                sock.send_multipart(msg)
                if i % 50 == 49:  # keep the queues short
                    while sock.poll(0):
                        receive()
            deadline = time.monotonic() + 20
            while len(replies) < len(messages) and time.monotonic() < deadline:
                if sock.poll(200):
                    receive()
        assert time.monotonic() - start < 60
        assert d.alive()
        assert len(replies) == len(messages)  # everything got an answer
        assert [r for r in replies if r.code is ErrorCode.INTERNAL] == []  # nothing escaped the checks
        for r in replies:
            if r.auth is not None:
                continue
            # What an unauthenticated peer learns: a CHALLENGE's nonce and proof, or an error about its message.
            if r.ok:
                assert set(r.body) == {"daemon_nonce", "proof"}
            else:
                assert r.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNAUTHORIZED, ErrorCode.VERSION), r
                assert not [w for w in POOL_WORDS if w in r.error], r.error
        assert sum(r.auth is not None for r in replies) > len(messages) // 4
        assert sum(r.code is ErrorCode.UNAUTHORIZED for r in replies) > len(messages) // 4
        assert d.log_path.stat().st_size - log_bytes0 < 2000, "bad input must not fill the log"
        stats = d.stats()
        # the messages, the raw handshake (2) and this STATS call's handshake and request (3)
        assert stats["counters"]["requests"] - stats0["counters"]["requests"] == len(messages) + 5
        assert stats["counters"]["errors"] > len(messages) // 2
        assert (stats["pool"]["reservations"], stats["pool"]["committed_chunks"]) == (0, 0)
        # a client with a wrong token sends nothing past its nonce; one without a token is refused
        conn = DaemonConnection(d.config.mp_url, "wrong")
        try:
            with pytest.raises(UntrustedDaemon, match="did not prove it knows the token"):
                conn.request(MsgType.PING, deadline=time.monotonic() + 2)
        finally:
            conn.close()
        conn = DaemonConnection(d.config.mp_url)
        try:
            with pytest.raises(DaemonError) as info:
                conn.request(MsgType.PING, deadline=time.monotonic() + 2)
            assert info.value.code is ErrorCode.UNAUTHORIZED and "authenticate first" in str(info.value)
        finally:
            conn.close()
        # and the good client still works byte-exact
        keys = [bytes([i + 1]) * 32 for i in range(4)]
        res = store.reserve(keys)
        assert store.save(res, torch.arange(4 * CHUNK)) == 4
        other = MPStore(d.config, make_buffers(12))
        try:
            lease = other.lookup(keys)
            assert other.load(lease, torch.arange(4 * CHUNK) + 100).chunks_loaded == 4
            for layer in range(2):
                for plane in range(2):
                    assert torch.equal(
                        other.buffers.plane_rows(layer, plane)[100 : 100 + 4 * CHUNK],
                        store.buffers.plane_rows(layer, plane)[: 4 * CHUNK],
                    )
            other.release(lease)
        finally:
            other.close()
    finally:
        store.close()
    assert d.stop() == 0 and d.leftovers() == []


def test_leases_and_reservations_expire(workdir, daemons):
    d = start_daemon(daemons, write_config(workdir, lease_ttl_s=0.6, max_local_cpu_size=4 * SLAB_BYTES / 1024**3))
    hello = d.request(MsgType.HELLO, hello_body())
    epoch = {"epoch": hello["epoch"]}
    keys = tuple(bytes([i + 1]) * 32 for i in range(4))
    res = d.request(MsgType.RESERVE, epoch, keys)
    assert d.request(MsgType.COMMIT, {**epoch, "reservation_id": res["reservation_id"]}) == {"committed": 4}
    lease = d.request(MsgType.LOOKUP, epoch, keys)  # pins all 4 slabs, never released
    assert lease["slab_ids"] == res["slab_ids"]
    other = tuple(bytes([i + 50]) * 32 for i in range(2))
    assert d.request(MsgType.RESERVE, epoch, other)["slab_ids"] == []  # all pinned
    stale = d.request(MsgType.RESERVE, epoch, (bytes([99]) * 32,))
    assert stale["slab_ids"] == []
    time.sleep(0.9)
    pool = d.stats()["pool"]
    assert (pool["leases"], pool["pinned_slabs"]) == (0, 0)
    res2 = d.request(MsgType.RESERVE, epoch, other)
    assert len(res2["slab_ids"]) == 2  # evicted two expired-lease chunks
    time.sleep(0.9)  # the reservation expires uncommitted: its commit is refused
    assert d.request(MsgType.COMMIT, {**epoch, "reservation_id": res2["reservation_id"]}) == {"committed": 0}
    pool = d.stats()["pool"]
    assert (pool["reservations"], pool["committed_chunks"], pool["evictions"]) == (0, 2, 2)


def test_stats_counters_are_consistent(workdir, daemons):
    d = start_daemon(daemons, write_config(workdir))
    store = MPStore(d.config, make_buffers(3))
    try:
        keys = [bytes([i + 1]) * 32 for i in range(6)]
        assert store.save(store.reserve(keys[:4]), torch.arange(4 * CHUNK)) == 4
        lease = store.lookup(keys)  # 4 hits, 2 misses
        assert lease.num_chunks == 4
        assert store.lookup(keys[4:]).num_chunks == 0  # 2 misses
        stats = store.daemon_stats()
        c = stats.counters
        assert (c.lookups, c.hit_chunks, c.miss_chunks) == (2, 4, 4)
        assert (c.reserved_chunks, c.committed_chunks, c.committed_bytes) == (4, 4, 4 * SLAB_BYTES)
        assert stats.hit_rate == 0.5
        assert stats.clients == 1
        pool = stats.pool
        assert (pool.committed_chunks, pool.pinned_slabs, pool.leases, pool.used_slabs) == (4, 4, 1, 4)
        store.release(lease)
        local = store.stats()
        assert (local.lookups, local.hit_chunks, local.miss_chunks, local.stored_chunks) == (2, 4, 4, 4)
        store.clear()
        pool = store.daemon_stats().pool
        assert (pool.committed_chunks, pool.pinned_slabs, pool.used_slabs) == (0, 0, 0)
    finally:
        store.close()


def _check_load(d, seed: int, chunks: int, hit: int | None = None) -> dict:
    """A fresh engine loads the prompt of ``seed``; the loaded prefix is byte-exact."""
    result, kv = engine_load(d.config, seed, chunks)
    hit = chunks if hit is None else hit
    assert result == {"hit": hit, "loaded": hit}
    assert kv == expected_after_load(seed, hit)
    return result


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_daemon_restart_with_disk_tier_keeps_committed_chunks(workdir, daemons, sig):
    cfg = write_config(workdir, local_disk=str(workdir / "disk"), max_local_disk_size=1.0, disk_flush_interval_s=0.2)
    d = start_daemon(daemons, cfg)
    assert engine_store(d.config, 5, 3) == {"committed": 3}
    if sig == signal.SIGKILL:
        time.sleep(0.2 * 3)  # past the flush interval
        d.kill()
    else:
        assert d.stop(sig) == 0 and d.leftovers() == []
    files = sorted((workdir / "disk").rglob("*.kv"))
    assert len(files) == 3
    d2 = start_daemon(daemons, cfg)
    _check_load(d2, 5, 3)
    stats = d2.stats()
    assert stats["counters"]["disk_promotions"] == 3 and stats["disk"]["files"] == 3


def test_corrupt_and_torn_disk_files_are_dropped_never_served(workdir, daemons):
    cfg = write_config(workdir, local_disk=str(workdir / "disk"), max_local_disk_size=1.0)
    d = start_daemon(daemons, cfg)
    assert engine_store(d.config, 6, 3) == {"committed": 3}
    assert d.stop() == 0
    buffers = make_buffers(6)
    keys = prompt_keys(buffers, tokens_for(6, 3))
    disk_dir = next((workdir / "disk").iterdir())
    second = disk_dir / (keys[1].hex() + ".kv")
    blob = bytearray(second.read_bytes())
    blob[-5] ^= 0xFF  # bit rot in the payload: caught by the checksum on load
    second.write_bytes(bytes(blob))
    third = disk_dir / (keys[2].hex() + ".kv")
    third.write_bytes(third.read_bytes()[:100])  # torn: caught when the index is rebuilt
    d2 = start_daemon(daemons, cfg)
    _check_load(d2, 6, 3, hit=1)  # the first HELLO rebuilds the index: the torn file goes
    assert not third.exists() and not second.exists()
    assert d2.stats()["disk"]["corrupt"] == 2


def test_cli_ping_and_stats(workdir, daemons):
    cfg = write_config(workdir)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lmc_transfer.cli", *args, "--config", str(cfg), "--timeout-ms", "300"],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )

    start = time.monotonic()
    down = cli("ping")
    assert down.returncode == 1 and ("timed out" in down.stderr or "no connection" in down.stderr), down.stderr
    assert time.monotonic() - start < 15
    d = start_daemon(daemons, cfg)
    up = cli("ping")
    assert up.returncode == 0 and f"pid {d.proc.pid}" in up.stdout
    store = MPStore(d.config, make_buffers(4))
    try:
        store.save(store.reserve([b"a" * 32, b"b" * 32]), torch.arange(2 * CHUNK))
        store.lookup([b"a" * 32, b"c" * 32])
        out = cli("stats")
        assert out.returncode == 0, out.stderr
        assert "chunks                 2 / 64 slabs" in out.stdout
        assert f"bytes                  {2 * SLAB_BYTES}" in out.stdout
        assert "hit rate               0.500 (1 hit, 1 missed chunks)" in out.stdout
        assert "clients                1" in out.stdout
        assert "disk usage             off" in out.stdout
    finally:
        store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loopback_tcp_round_trip(workdir, daemons):
    cfg = write_config(workdir, mp_socket=None, mp_host="127.0.0.1", mp_port=_free_port())
    d = start_daemon(daemons, cfg)
    assert d.config.mp_url.startswith("tcp://127.0.0.1:")
    assert engine_store(d.config, 8, 2) == {"committed": 2}
    _check_load(d, 8, 2)
    assert d.stop() == 0 and d.leftovers() == []


def test_non_loopback_tcp_is_refused_unless_allowed():
    with pytest.raises(ValueError, match="mp_host must be a loopback address unless allow_remote_tcp is true, got '10.1.2.3'"):
        check_bind_address(LMCTransferConfig(mp_host="10.1.2.3"))
    assert check_bind_address(LMCTransferConfig(mp_host="10.1.2.3", allow_remote_tcp=True)) == "tcp://10.1.2.3:5555"
    assert check_bind_address(LMCTransferConfig(mp_host="::1")) == "tcp://[::1]:5555"


# -- endpoint defaults, one daemon per endpoint, reaping a killed daemon's segment --------


def test_default_endpoint_is_a_0600_ipc_socket_in_the_runtime_dir(workdir, daemons, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(workdir))  # as the daemon's (daemon_env)
    cfg = write_config(workdir, mp_socket=None)  # no mp_socket/mp_host/mp_port: the default
    d = start_daemon(daemons, cfg)
    sock = workdir / "lmc-transfer" / "daemon.sock"
    assert d.config.mp_url == f"ipc://{sock}"
    assert sock.stat().st_mode & 0o777 == 0o600
    assert (workdir / "lmc-transfer").stat().st_mode & 0o777 == 0o700
    assert engine_store(d.config, 9, 2) == {"committed": 2}
    _check_load(d, 9, 2)
    assert d.stop() == 0 and d.leftovers() == []


def test_default_runtime_dir_writable_by_others_is_refused(workdir):
    (workdir / "lmc-transfer").mkdir(mode=0o700)
    (workdir / "lmc-transfer").chmod(0o777)
    cfg = write_config(workdir, mp_socket=None)
    out = subprocess.run(
        [sys.executable, "-m", "lmc_transfer.daemon", "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=daemon_env(workdir),
    )
    assert out.returncode == 1
    assert f"runtime directory {workdir / 'lmc-transfer'} must be owned by uid" in out.stderr
    assert "mode 0o777" in out.stderr
    assert not (workdir / "lmc-transfer" / "daemon.sock").exists()


@pytest.mark.parametrize("entry", [["-m", "lmc_transfer.daemon"], ["-m", "lmc_transfer.cli", "server"]])
def test_second_daemon_on_the_same_endpoint_refuses_to_start(workdir, daemons, entry):
    cfg = write_config(workdir)
    first = start_daemon(daemons, cfg)
    store = MPStore(first.config, make_buffers(3))
    try:
        keys = prompt_keys(store.buffers, tokens_for(3, 2))
        assert store.save(store.reserve(keys), torch.arange(2 * CHUNK)) == 2
        out = subprocess.run(
            [sys.executable, *entry, "--config", str(cfg)],
            cwd=REPO, capture_output=True, text=True, timeout=60, env=daemon_env(workdir),
        )
        assert out.returncode == 1
        assert f"another lmc-transfer daemon (pid {first.proc.pid}) is serving {first.config.mp_ipc_path}" in out.stderr
        # the first daemon keeps its socket and its clients
        assert first.alive() and first.request(MsgType.PING)["pid"] == first.proc.pid
        assert store.lookup(keys).num_chunks == 2
    finally:
        store.close()
    assert first.stop() == 0 and first.leftovers() == []


def test_second_daemon_on_the_same_tcp_port_refuses_to_start(workdir, daemons):
    cfg = write_config(workdir, mp_socket=None, mp_host="127.0.0.1", mp_port=_free_port())
    first = start_daemon(daemons, cfg)
    out = subprocess.run(
        [sys.executable, "-m", "lmc_transfer.daemon", "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=daemon_env(workdir),
    )
    assert out.returncode == 1
    assert f"another lmc-transfer daemon (pid {first.proc.pid}) is serving" in out.stderr
    assert first.request(MsgType.PING)["pid"] == first.proc.pid
    assert first.stop() == 0 and first.leftovers() == []


def test_segment_of_a_daemon_killed_with_sigkill_is_reaped_by_the_next(workdir, daemons):
    cfg = write_config(workdir)
    first = start_daemon(daemons, cfg)
    assert engine_store(first.config, 4, 2) == {"committed": 2}
    segment = first.stats()["segment"]
    assert json.loads(first.state_path.read_text()) == {"pid": first.proc.pid, "segment": segment}
    first.stop(signal.SIGKILL)
    assert segment_exists(segment), "a SIGKILLed daemon cannot unlink its own segment"
    second = start_daemon(daemons, cfg)
    assert not segment_exists(segment)
    assert f"unlinked segment {segment} left behind by dead daemon pid {first.proc.pid}" in second.log()
    assert engine_store(second.config, 4, 2) == {"committed": 2}
    assert json.loads(second.state_path.read_text()) == {"pid": second.proc.pid, "segment": second.stats()["segment"]}
    _check_load(second, 4, 2)
    assert second.stop() == 0 and second.leftovers() == []


def test_segment_of_a_live_pid_is_not_reaped(workdir, daemons):
    cfg = write_config(workdir)
    live = SharedSegment.create(1, 4096, name=f"/lmct-{os.getpid()}-reaptest")
    try:
        state = Path(load_config(cfg).mp_ipc_path + ".state")
        state.write_text(json.dumps({"pid": os.getpid(), "segment": live.name}))
        d = start_daemon(daemons, cfg)
        assert segment_exists(live.name)
        assert json.loads(state.read_text()) == {"pid": d.proc.pid, "segment": None}
        assert d.stop() == 0 and d.leftovers() == []
    finally:
        live.close()
    assert not segment_exists(live.name)


def test_a_flood_of_huge_integers_is_a_protocol_error_with_a_bounded_log(workdir, daemons):
    """Integers past Python's digit limit once gave an "internal" error and a traceback per message."""
    d = start_daemon(daemons, write_config(workdir, mp_auth_token="t0ken"))
    log_bytes0 = d.log_path.stat().st_size
    rng = random.Random(9)
    replies = []
    with raw_socket(d.config.mp_url) as sock:
        for _ in range(300):
            digits = "7" * rng.randrange(4301, 9000)
            field = rng.choice(["id", "v", "nkeys"])
            header = {"v": 1, "type": "LOOKUP", "id": 5, "nkeys": 1, "body": {"epoch": "e"}, field: HUGE}
            sock.send_multipart([json.dumps(header).replace(f'"{HUGE}"', digits).encode(), bytes(KEY_BYTES)])
            replies.append(decode_reply(sock.recv_multipart()))
    assert {(r.ok, r.code, r.request_id) for r in replies} == {(False, ErrorCode.BAD_REQUEST, 0)}
    assert all("at most 20 digits" in r.error for r in replies)
    assert d.log_path.stat().st_size - log_bytes0 < 500
    assert d.request(MsgType.PING)["pid"] == d.proc.pid
    assert d.stop() == 0 and d.leftovers() == []


def test_unexpected_errors_are_logged_at_a_bounded_rate(workdir, caplog):
    now = [0.0]
    daemon = CacheDaemon(load_config(write_config(workdir)), clock=lambda: now[0])

    def broken(message):
        raise RuntimeError("handler bug")

    daemon._handlers[MsgType.PING] = broken
    ping = encode_request(Request(MsgType.PING, 3))
    caplog.set_level(logging.ERROR, logger="lmc_transfer.daemon.server")
    for _ in range(300):
        reply = decode_reply(daemon._begin(ping))
        assert (reply.ok, reply.code, reply.error, reply.request_id) == (False, ErrorCode.INTERNAL, "RuntimeError: handler bug", 3)
    assert len(caplog.records) == 10 and all(r.exc_info for r in caplog.records)
    now[0] += 60.0  # the next window: one record that counts what was held back
    decode_reply(daemon._begin(ping))
    assert len(caplog.records) == 11
    assert caplog.records[-1].getMessage() == (
        "internal error while handling a request (290 similar errors not logged before this one)")
    assert daemon.counters.errors == 301


def test_a_tcp_port_held_by_another_process_is_one_error_line(workdir):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = write_config(workdir, mp_socket=None, mp_host="127.0.0.1", mp_port=port)
        out = subprocess.run([sys.executable, "-m", "lmc_transfer.daemon", "--config", str(cfg)],
                             cwd=REPO, capture_output=True, text=True, timeout=60, env=daemon_env(workdir))
    assert out.returncode == 1
    assert out.stderr.strip().endswith(f"cannot listen on tcp://127.0.0.1:{port}: Address already in use"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not list((workdir / "lmc-transfer").glob("*.token")) and not list((workdir / "lmc-transfer").glob("*.state"))
