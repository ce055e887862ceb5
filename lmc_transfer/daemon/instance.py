"""One daemon per endpoint, and cleanup after a daemon that was killed.

Beside each endpoint the daemon keeps small files, all mode 0600:

- ``<stem>.lock``: held with ``flock`` for the daemon's lifetime. A second daemon
  for the same endpoint fails to take it and refuses to start (``AlreadyRunning``)
  instead of unlinking and re-binding the first one's ipc socket. The kernel drops
  the lock when its holder dies, even by SIGKILL. The file itself stays: unlinking
  a lock file lets two later starters lock two different inodes.
- ``<stem>.state``: JSON ``{"pid": ..., "segment": ...}`` naming the shared-memory
  segment the daemon created. A daemon killed with -9 cannot unlink its segment;
  the next daemon for the endpoint reads this file and unlinks that segment when
  its owner pid is no longer alive.
- ``<stem>.token`` (TCP without ``mp_auth_token`` only): the random token this start of the
  daemon requires (lmc_transfer.daemon.auth). Clients of the same user read it from there;
  no other user can, since the file and its directory are private. Removed on shutdown.

``stem`` is the ipc socket path, or for tcp ``<runtime dir>/tcp-<host>-<port>``
(the runtime dir is the default socket's directory, see ``config.default_mp_socket``).
Its directory must be private: owned by this uid and not writable by group or others
(``check_private_dir``), so nobody else can put a socket, a token or a lock file there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
from pathlib import Path

from lmc_transfer.config import DEFAULT_MP_PORT, LMCTransferConfig, default_mp_socket
from lmc_transfer.private_paths import check_private_dir, check_private_file, create_private_file
from lmc_transfer.daemon.shm import unlink_segment

log = logging.getLogger(__name__)


class AlreadyRunning(RuntimeError):
    """Another live daemon holds this endpoint."""


def runtime_stem(config: LMCTransferConfig) -> Path:
    """The path the lock and state files are named after (module docstring)."""
    ipc = config.mp_ipc_path
    if ipc is not None:
        return Path(ipc)
    port = config.mp_port if config.mp_port is not None else DEFAULT_MP_PORT
    host = config.tcp_host.replace(":", "_").replace("/", "_")
    return Path(default_mp_socket()).parent / f"tcp-{host}-{port}"


def token_path(config: LMCTransferConfig) -> Path:
    """Where a TCP daemon without ``mp_auth_token`` keeps the token it made (module docstring)."""
    return DaemonInstance(runtime_stem(config)).token_path


def read_token(path: Path) -> str:
    """The token a daemon wrote to ``path``, after checking the file and its directory are private.

    FileNotFoundError when there is none (no daemon started yet); PermissionError for one that
    someone else could have written or read."""
    check_private_dir(path.parent)
    # O_NONBLOCK: a FIFO planted under the name cannot block the caller.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        check_private_file(os.fstat(fd), f"token file {path}")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    token = data.decode("ascii", errors="replace").strip()
    if not token:
        raise PermissionError(f"token file {path} is empty")
    return token


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class DaemonInstance:
    """The lock and state files of one running daemon; ``acquire`` first, ``release`` last."""

    def __init__(self, stem: Path) -> None:
        self.stem = stem
        self.lock_path = stem.with_name(stem.name + ".lock")
        self.state_path = stem.with_name(stem.name + ".state")
        self.token_path = stem.with_name(stem.name + ".token")
        self._lock_fd: int | None = None

    def acquire(self) -> list[str]:
        """Take the endpoint; returns the segments of dead predecessors it unlinked.

        Raises AlreadyRunning when a live daemon holds the lock.
        """
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = self._read_state().get("pid")
            raise AlreadyRunning(
                f"another lmc-transfer daemon (pid {owner if owner is not None else 'unknown'}) is serving "
                f"{self.stem} (lock {self.lock_path} is held); stop it first or configure another endpoint"
            ) from None
        self._lock_fd = fd
        return self._reap()

    def record_segment(self, segment: str | None) -> None:
        """Write the state file (atomically: a crash leaves the old or the new one)."""
        _write_private(self.state_path, json.dumps({"pid": os.getpid(), "segment": segment}).encode())

    def new_token(self) -> str:
        """Make this start's random token and write it to the token file, for same-uid clients."""
        token = secrets.token_urlsafe(32)
        _write_private(self.token_path, token.encode("ascii"))
        return token

    def release(self) -> None:
        """Remove the state and token files and drop the lock; idempotent."""
        if self._lock_fd is None:
            return
        self.state_path.unlink(missing_ok=True)
        self.token_path.unlink(missing_ok=True)
        os.close(self._lock_fd)  # closing the last descriptor drops the flock
        self._lock_fd = None

    def _read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_bytes())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _reap(self) -> list[str]:
        state = self._read_state()
        pid, segment = state.get("pid"), state.get("segment")
        reaped: list[str] = []
        # Holding the lock means no daemon serves this endpoint; the pid check
        # guards against a state file copied in from elsewhere.
        if isinstance(pid, int) and not isinstance(pid, bool) and pid != os.getpid() and not pid_alive(pid):
            if isinstance(segment, str) and segment.startswith("/lmct-") and unlink_segment(segment):
                log.warning("unlinked segment %s left behind by dead daemon pid %d", segment, pid)
                reaped.append(segment)
        self.state_path.unlink(missing_ok=True)
        return reaped


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (a crash leaves the old or the new file), mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = create_private_file(tmp)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
