"""A loopback TCP proxy in front of a real redis-server, to make the network slow or break it.

``bytes_per_s`` throttles what each connection receives from the server. ``cut_after`` closes
(with a reset) the first connection whose received bytes pass it, mid-reply; ``stall_after``
stops forwarding to the first connection that passes it, leaving it open and silent. Either
fires once. Threads poll a stop flag, so ``stop`` ends them within a bounded time.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

_POLL_S = 0.05
_PIECE = 64 * 1024
_JOIN_S = 5.0
_SEND_TIMEOUT_S = 5.0  # a peer that stops reading for this long is treated as gone


class RedisProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        bytes_per_s: float | None = None,
        cut_after: int | None = None,
        stall_after: int | None = None,
    ) -> None:
        self._upstream_port = upstream_port
        self._bytes_per_s = bytes_per_s
        self._cut_after = cut_after
        self._stall_after = stall_after
        self._fired = threading.Event()  # the cut or the stall has happened (to one connection)
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_S)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="redis-proxy-accept", daemon=True)]
        self.connections = 0
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def fired(self) -> bool:
        return self._fired.is_set()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(_JOIN_S)
            assert not t.is_alive(), f"proxy thread {t.name} still running after {_JOIN_S}s"
        with self._lock:
            for s in self._sockets:
                s.close()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(("127.0.0.1", self._upstream_port), timeout=_JOIN_S)
            for s in (client, server):
                s.settimeout(_SEND_TIMEOUT_S)  # receives wait in select, polling the stop flag
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
                pumps = [
                    threading.Thread(target=self._pump, args=(client, server, False), daemon=True),
                    threading.Thread(target=self._pump, args=(server, client, True), daemon=True),
                ]
                self._threads += pumps
            for t in pumps:
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        sent = 0
        while not self._stop.is_set():
            try:
                if not select.select([src], [], [], _POLL_S)[0]:
                    continue
                data = src.recv(_PIECE)
            except (OSError, ValueError):  # closed by the other pump
                return
            if not data:
                _close(dst)
                return
            if to_client and not self._fired.is_set():
                limit = min(x for x in (self._cut_after, self._stall_after, float("inf")) if x is not None)
                if sent + len(data) > limit:
                    with self._lock:
                        first = not self._fired.is_set()
                        self._fired.set()
                    if first:
                        self._send(dst, data[: int(limit) - sent])
                        if self._cut_after is not None:
                            _reset(dst)
                            _close(src)
                            return
                        self._stop.wait()  # stalled: open and silent until the proxy stops
                        return
            # Paced piece by piece: an idle connection earns no burst.
            if to_client and self._bytes_per_s is not None and self._stop.wait(len(data) / self._bytes_per_s):
                return
            if not self._send(dst, data):
                return
            sent += len(data)

    @staticmethod
    def _send(dst: socket.socket, data: bytes) -> bool:
        try:
            dst.sendall(data)
        except OSError:
            return False
        return True


def _reset(sock: socket.socket) -> None:
    """Close with an RST (linger 0), as a dying proxy or host would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
