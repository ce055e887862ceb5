"""MP mode against another local user and against impostors: real daemon subprocesses, and a
second uid (a forked child that switched to ``OTHER_UID``; skipped, saying so, without root)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import _posixshmem
import pytest
import torch
import zmq

from lmc_transfer.config import load_config
from lmc_transfer.daemon.instance import read_token, token_path
from lmc_transfer.daemon.server import CacheDaemon
from lmc_transfer.daemon import auth
from lmc_transfer.daemon.messages import AuthRequest, ChallengeRequest, HelloReply
from lmc_transfer.daemon.sessions import CHALLENGE_TTL_S, SESSION_IDLE_S, Sessions
from lmc_transfer.daemon.protocol import (
    ErrorCode,
    MsgType,
    ProtocolError,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from lmc_transfer.daemon.shm import SharedSegment, segment_exists
from lmc_transfer.store.mp_client import DaemonConnection, MPStore, UntrustedDaemon
from tests.conftest_mp import (  # noqa: F401  (fixtures)
    CHUNK,
    OTHER_UID,
    REPO,
    SLAB_BYTES,
    OtherUser,
    daemon_env,
    daemons,
    expected_after_load,
    engine_load,
    engine_store,
    make_buffers,
    prompt_keys,
    raw_socket,
    start_daemon,
    tokens_for,
    workdir,
    write_config,
)
from tests.test_mp_daemon import POOL_WORDS, _free_port

pytestmark = pytest.mark.timeout(120)


def _tcp_config(workdir: Path, **overrides) -> Path:
    return write_config(workdir, mp_socket=None, mp_host="127.0.0.1", mp_port=_free_port(), **overrides)


def _ask(sock: zmq.Socket, msg_type: MsgType, body: dict, keys: tuple = ()) -> dict:
    """One unsealed request over a raw socket; the reply as plain JSON types."""
    sock.send_multipart(encode_request(Request(msg_type, 1, body, keys)))
    reply = decode_reply(sock.recv_multipart())
    return {"ok": reply.ok, "code": reply.code.value if reply.code else None, "error": reply.error,
            "body": sorted(reply.body), "sealed": reply.auth is not None}


# -- item 1: TCP never runs without a token -------------------------------------------------


def test_another_uid_cannot_use_a_tcp_daemon_configured_without_a_token(workdir, daemons):
    d = start_daemon(daemons, _tcp_config(workdir))
    token_file = token_path(d.config)
    assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.stat().st_uid == os.getuid()
    assert engine_store(d.config, 3, 3) == {"committed": 3}  # same uid: reads the token file by itself
    keys = prompt_keys(make_buffers(3), tokens_for(3, 3))
    other_geometry = make_buffers(1, heads=4).geometry.to_dict()
    url = d.config.mp_url

    def attack(me: OtherUser) -> dict:
        out: dict = {}
        try:
            read_token(token_file)
            out["token"] = "read"
        except OSError as exc:
            out["token"] = type(exc).__name__
        with raw_socket(url) as sock:
            hello = {"geometry": other_geometry, "chunk_size": CHUNK, "client_id": "evil"}
            out["hello"] = _ask(sock, MsgType.HELLO, hello)
            out["reserve"] = _ask(sock, MsgType.RESERVE, {"epoch": "x"}, tuple(keys))
            out["commit"] = _ask(sock, MsgType.COMMIT, {"epoch": "x", "reservation_id": 1})
            out["clear"] = _ask(sock, MsgType.CLEAR, {})
            out["stats"] = _ask(sock, MsgType.STATS, {})
            out["challenge"] = _ask(sock, MsgType.CHALLENGE, {"client_nonce": "ab" * 32})
            out["auth"] = _ask(sock, MsgType.AUTH, {"daemon_nonce": "cd" * 32, "proof": "ef" * 32})
        me.ready()
        return out

    other = OtherUser(attack)
    other.wait_ready()
    out = other.stop()
    assert out["token"] == "PermissionError"
    assert out["challenge"] == {"ok": True, "code": None, "error": None, "body": ["daemon_nonce", "proof"], "sealed": False}
    for name in ("hello", "reserve", "commit", "clear", "stats", "auth"):
        assert out[name]["code"] == ErrorCode.UNAUTHORIZED.value, (name, out[name])
        assert not [w for w in POOL_WORDS if w in out[name]["error"]], (name, out[name]["error"])
    stats = d.stats()
    assert (stats["pool"]["reservations"], stats["pool"]["committed_chunks"]) == (0, 3)
    result, kv = engine_load(d.config, 3, 3)  # the victim's chunks, untouched and byte-exact
    assert result == {"hit": 3, "loaded": 3} and kv == expected_after_load(3, 3)
    assert d.stop() == 0 and d.leftovers() == [] and not token_file.exists()


# -- item 2: the client trusts only a peer that proves it knows the token --------------------


def _impostor(url: str, segment_name: str, segment_bytes: int):
    """A server for the other user: binds ``url``, answers every message as a daemon would if it
    did not know the token (a made-up proof, an unsealed HELLO naming its own world-writable
    segment, hits everywhere) and returns everything it received."""

    def serve(me: OtherUser) -> list:
        fd = _posixshmem.shm_open(segment_name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o666)
        os.fchmod(fd, 0o666)
        os.ftruncate(fd, segment_bytes)
        os.close(fd)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(url)
        me.ready()
        received = []
        try:
            while not me.stop_requested():
                if not sock.poll(20):
                    continue
                identity, *frames = sock.recv_multipart()
                received.append([f.hex() for f in frames])
                header = json.loads(frames[0])
                if header["type"] == "CHALLENGE":
                    body = {"daemon_nonce": "ab" * 32, "proof": "cd" * 32}
                elif header["type"] == "HELLO":
                    body = HelloReply("evil", segment_name, 64, SLAB_BYTES, CHUNK, 10.0).encode()
                else:
                    body = {"lease_id": 1, "slab_ids": [0], "generations": [0], "ttl_s": 10.0}
                sock.send_multipart([identity, *encode_reply(Reply(header["id"], True, body))])
        finally:
            sock.close()
            ctx.term()
            _posixshmem.shm_unlink(segment_name)
        return received

    return serve


def test_a_client_tells_nothing_to_an_impostor_on_the_tcp_port(workdir, daemons, caplog):
    cfg = _tcp_config(workdir)
    d = start_daemon(daemons, cfg)
    token = read_token(token_path(d.config))
    store = MPStore(d.config, make_buffers(5))
    keys = prompt_keys(store.buffers, tokens_for(5, 2))
    caplog.set_level(logging.INFO, logger="lmc_transfer")
    impostor = None
    try:
        assert store.save(store.reserve(keys), torch.arange(2 * CHUNK)) == 2
        d.kill()  # SIGKILL: the token file stays, the client still holds its session
        evil_segment = f"/lmct-evil-{os.getpid()}"
        impostor = OtherUser(_impostor(d.config.mp_url, evil_segment, 1 << 20))
        impostor.wait_ready()
        caplog.clear()
        deadline = time.monotonic() + 4  # past the backoff: the client tries to reconnect several times
        while time.monotonic() < deadline:
            assert store.lookup(keys).num_chunks == 0
            assert store.reserve(keys).num_chunks == 0
            time.sleep(0.05)
        fresh = MPStore(d.config, make_buffers(6))  # an engine started now
        try:
            assert fresh.lookup(keys).num_chunks == 0 and fresh._segment is None
        finally:
            fresh.close()
        received = impostor.stop()
        impostor = None
        assert store._segment is not None and store._segment.name != evil_segment
    finally:
        if impostor is not None:
            impostor.stop()
        store.close()
    # All it ever got: CHALLENGEs with a fresh nonce each; never the token, a HELLO or a key.
    assert len(received) >= 2
    nonces = set()
    for frames in received:
        assert len(frames) == 1
        header = json.loads(bytes.fromhex(frames[0]))
        assert (header["type"], set(header), set(header["body"])) == ("CHALLENGE", {"v", "type", "id", "body"}, {"client_nonce"})
        nonces.add(header["body"]["client_nonce"])
        assert token.encode().hex() not in frames[0] and token not in bytes.fromhex(frames[0]).decode()
    assert len(nonces) == len(received)
    untrusted = [r for r in caplog.records if "untrusted" in r.getMessage()]
    assert [r.levelno for r in untrusted] == [logging.WARNING, logging.WARNING]  # once per store, not per request
    assert "did not prove it knows the token; nothing else was sent to it" in untrusted[0].getMessage()
    assert not segment_exists(evil_segment)


class _FakeDaemon:
    """A same-uid ipc "daemon" (a thread) whose HELLO reply names ``segment``; records requests."""

    def __init__(self, url: str, segment: str, num_slabs: int) -> None:
        self.requests: list[str] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(url)
        self._reply = HelloReply("fake", segment, num_slabs, SLAB_BYTES, CHUNK, 10.0).encode()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(20):
                identity, *frames = self._sock.recv_multipart()
                request = decode_request(frames)
                self.requests.append(request.type.value)
                self._sock.send_multipart([identity, *encode_reply(Reply(request.request_id, True, self._reply))])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()
        self._ctx.term()


@pytest.mark.parametrize("flaw", ["mode 0644", "another uid's"])
def test_a_client_never_maps_a_segment_others_can_open_or_own(workdir, caplog, flaw):
    segment = SharedSegment.create(4, SLAB_BYTES)
    path = f"/dev/shm{segment.name}"
    if flaw == "mode 0644":
        os.chmod(path, 0o644)
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to give the segment to another uid")
        os.chown(path, OTHER_UID, OTHER_UID)
    fake = _FakeDaemon(f"ipc://{workdir}/fake.sock", segment.name, 4)
    caplog.set_level(logging.INFO, logger="lmc_transfer")
    try:
        store = MPStore(load_config(write_config(workdir, mp_socket=str(workdir / "fake.sock"))), make_buffers(1))
        try:
            assert store._segment is None
            assert store.lookup([b"k" * 32]).num_chunks == 0
        finally:
            store.close()
    finally:
        fake.close()
        segment.close()
    assert set(fake.requests) == {"HELLO"}  # never a request about slabs of that segment
    owner = os.getuid() if flaw == "mode 0644" else OTHER_UID
    mode = "0o644" if flaw == "mode 0644" else "0o600"
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"untrusted: not mapping the segment the daemon at ipc://{workdir}/fake.sock named: segment {segment.name} "
        f"must be a regular file owned by uid {os.getuid()} with mode 0600, got a regular file owned by uid {owner} "
        f"with mode {mode}" in m for m in messages
    ), messages


def test_ipc_sockets_live_only_in_private_directories(workdir, daemons):
    shared = workdir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may create a socket here once the daemon is gone
    cfg = write_config(workdir, mp_socket=str(shared / "d.sock"))
    out = subprocess.run([sys.executable, "-m", "lmc_transfer.daemon", "--config", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=daemon_env(workdir))
    assert out.returncode == 1
    assert f"runtime directory {shared} must be owned by uid {os.getuid()}, a directory and not group/other-writable" in out.stderr
    assert "mode 0o1777" in out.stderr and not (shared / "d.sock").exists()
    conn = DaemonConnection(f"ipc://{shared}/d.sock")
    try:
        with pytest.raises(UntrustedDaemon, match=f"not connecting to ipc://{shared}/d.sock: runtime directory"):
            conn.request(MsgType.PING, deadline=time.monotonic() + 1)
    finally:
        conn.close()


# -- item 4: no secret in any message or log -------------------------------------------------

TOKEN, PASSWORD, QUERY_PASSWORD = "tok-S3CRET-71", "pw-S3CRET-72", "qp-S3CRET-73"
SECRETS = (TOKEN, PASSWORD, QUERY_PASSWORD)


def _assert_no_secret(what: str, text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{what} shows {leaked}: {text[-2000:]}"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (f"mp_auth_token: [{TOKEN}]\n", "mp_auth_token: expected a non-empty string, got <hidden list>"),
        (f"mp_auth_token: {{nested: {TOKEN}}}\n", "got <hidden dict>"),
        (f"mp_auth_token: {TOKEN}\nmp_port: 0\n", "mp_port: expected an integer >= 1, got 0"),
        (f"remote_password: [{PASSWORD}]\n", "remote_password: expected a non-empty string, got <hidden list>"),
        (f"remote_password: {PASSWORD}\n", "remote_password: <hidden> needs remote_url to be set"),
        (f"remote_url: {{x: {PASSWORD}}}\n", "remote_url: expected a non-empty string, got <hidden dict>"),
        (f"remote_url: http://u:{PASSWORD}@h/0?password={QUERY_PASSWORD}\n",
         "got 'http://u:***@h/0?password=***'"),
        (f"remote_url: redis://u:{PASSWORD}@h:1/0?password={QUERY_PASSWORD}&db=2\nremote_tls_ca: CFG\n",
         "TLS settings need a rediss:// or rediss+cluster:// remote_url, got 'redis://u:***@h:1/0?password=***&db=***'"),
        (f"remote_url: redis://{PASSWORD}@h:1\nremote_tls_ca: CFG\n", "got 'redis://***@h:1'"),
    ],
)
def test_config_errors_never_show_a_secret(tmp_path, capsys, text, fragment):
    from lmc_transfer.cli import main as cli_main
    from lmc_transfer.daemon.server import main as server_main

    path = tmp_path / "cfg.yaml"
    path.write_text(text.replace("CFG", str(path)))
    assert cli_main(["ping", "--config", str(path)]) == 2
    assert server_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count(fragment) == 2, err
    assert len(err.strip().splitlines()) == 2  # one line each
    _assert_no_secret("the config error", err)


def test_no_secret_in_the_logs_of_a_daemon_and_its_clients(workdir, daemons, caplog):
    pytest.importorskip("redis")
    from tests.test_remote_tier import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed (apt-get install redis-server)")
    redis_server = RedisServer(workdir)
    redis_server.start()
    try:
        # rediss:// against a plain redis-server: every remote operation fails in the TLS handshake.
        url = f"rediss://u:{PASSWORD}@127.0.0.1:{redis_server.port}/0?password={QUERY_PASSWORD}"
        cfg = write_config(workdir, mp_auth_token=TOKEN, remote_url=url, remote_timeout_ms=100,
                           remote_password=PASSWORD)
        d = start_daemon(daemons, cfg, log_level="DEBUG")
        caplog.set_level(logging.DEBUG)
        assert engine_store(d.config, 7, 2) == {"committed": 2}
        assert engine_load(d.config, 7, 3)[0] == {"hit": 2, "loaded": 2}  # the third chunk asks the remote tier
        cli = subprocess.run([sys.executable, "-m", "lmc_transfer.cli", "stats", "--json", "--config", str(cfg)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        remote = json.loads(cli.stdout)["remote"]
        assert remote["errors"] + remote["skipped"] + remote["put_errors"] >= 1  # the failures did happen
        assert d.stop() == 0
    finally:
        redis_server.stop()
    log = d.log()
    assert f"remote tier: rediss://u:***@127.0.0.1:{redis_server.port}/0?password=*** (namespace" in log
    for what, text in (("the daemon's log", log), ("this process's log", caplog.text),
                       ("the CLI", cli.stdout + cli.stderr)):
        _assert_no_secret(what, text)


def test_a_forgotten_session_authenticates_again_by_itself(workdir):
    """The daemon forgets sessions idle past SESSION_IDLE_S; the client's next request is
    answered ``unauthorized`` (unsealed), and it runs the handshake again within that request."""
    offset = [0.0]
    daemon = CacheDaemon(load_config(write_config(workdir, mp_auth_token="t0ken")),
                         clock=lambda: time.monotonic() + offset[0])
    daemon.bind()
    stop = threading.Event()
    loop = threading.Thread(target=daemon.serve_forever, args=(stop,), daemon=True)
    loop.start()
    conn = DaemonConnection(daemon.config.mp_url, "t0ken")
    try:
        assert conn.request(MsgType.PING, deadline=time.monotonic() + 2)["pid"] == os.getpid()
        first = conn._auth
        offset[0] += SESSION_IDLE_S + 1
        assert conn.request(MsgType.PING, deadline=time.monotonic() + 2)["pid"] == os.getpid()
        assert conn._auth is not None and conn._auth != first
        # CHALLENGE, AUTH, PING; the refused PING; CHALLENGE, AUTH and the PING again
        assert (daemon.counters.requests, daemon.counters.errors) == (7, 1)
    finally:
        conn.close()
        stop.set()
        loop.join(10)
        daemon.close()
    assert not loop.is_alive()


def test_a_challenge_answers_one_auth_and_expires():
    now = [0.0]
    sessions = Sessions("t0ken", clock=lambda: now[0])
    client_nonce = auth.new_nonce()
    challenge = sessions.challenge(ChallengeRequest(client_nonce))
    assert auth.same(auth.daemon_proof("t0ken", client_nonce, challenge.daemon_nonce), challenge.proof)
    answer = AuthRequest(challenge.daemon_nonce, auth.client_proof("t0ken", client_nonce, challenge.daemon_nonce))
    key = sessions.open(answer)
    assert key == auth.derive_session("t0ken", client_nonce, challenge.daemon_nonce)
    assert sessions.authorize(MsgType.PING, key.session) == key
    with pytest.raises(ProtocolError, match="unknown or expired challenge"):
        sessions.open(answer)  # replayed
    late = sessions.challenge(ChallengeRequest(client_nonce))
    now[0] += CHALLENGE_TTL_S + 1
    with pytest.raises(ProtocolError, match="unknown or expired challenge"):
        sessions.open(AuthRequest(late.daemon_nonce, auth.client_proof("t0ken", client_nonce, late.daemon_nonce)))
    fresh = sessions.challenge(ChallengeRequest(client_nonce))
    with pytest.raises(ProtocolError, match="wrong proof"):
        sessions.open(AuthRequest(fresh.daemon_nonce, auth.client_proof("other", client_nonce, fresh.daemon_nonce)))
    for msg_type, session, fragment in [(MsgType.PING, None, "authenticate first"),
                                        (MsgType.PING, "0" * 32, "unknown or expired session"),
                                        (MsgType.CHALLENGE, key.session, "must not name one")]:
        with pytest.raises(ProtocolError, match=fragment) as info:
            sessions.authorize(msg_type, session)
        assert info.value.code is ErrorCode.UNAUTHORIZED
    with pytest.raises(ProtocolError, match="this daemon has no token"):
        Sessions(None).authorize(MsgType.CHALLENGE, None)
    assert Sessions(None).authorize(MsgType.PING, None) is None
