"""One daemon per endpoint, and cleanup after a daemon that was killed.

Beside each endpoint the daemon keeps two small files, both mode 0600:

- ``<stem>.lock``: held with ``flock`` for the daemon's lifetime. A second daemon
  for the same endpoint fails to take it and refuses to start (``AlreadyRunning``)
  instead of unlinking and re-binding the first one's ipc socket. The kernel drops
  the lock when its holder dies, even by SIGKILL. The file itself stays: unlinking
  a lock file lets two later starters lock two different inodes.
- ``<stem>.state``: JSON ``{"pid": ..., "segment": ...}`` naming the shared-memory
  segment the daemon created. A daemon killed with -9 cannot unlink its segment;
  the next daemon for the endpoint reads this file and unlinks that segment when
  its owner pid is no longer alive.

``stem`` is the ipc socket path, or for tcp ``<runtime dir>/tcp-<host>-<port>``
(the runtime dir is the default socket's directory, see ``config.default_mp_socket``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

from lmc_transfer.config import DEFAULT_MP_PORT, LMCTransferConfig, default_mp_socket
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
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        data = json.dumps({"pid": os.getpid(), "segment": segment}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)

    def release(self) -> None:
        """Remove the state file and drop the lock; idempotent."""
        if self._lock_fd is None:
            return
        self.state_path.unlink(missing_ok=True)
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
