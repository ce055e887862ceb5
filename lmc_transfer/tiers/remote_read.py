"""GET replies read off a redis-py connection's socket straight into slabs: the kernel's copy only.

redis-py cannot read a value into a caller's buffer: both of its parsers read the socket into a
buffer of theirs and build a new ``bytes`` per value from it (hiredis's copies once more, into its
own reader buffer), and a response callback only ever sees that finished object, so a value
reached a slab after three or four copies. On a loopback redis-server redis-py's pipelined GET
with hiredis moved 0.89 GB/s before even the copy into the slab, reading into the slab moved
1.29 GB/s over one connection (benchmarks/RESULTS.md). The fetch path therefore sends its
pipelined GETs through a pooled redis-py connection (which did the connect, AUTH, SELECT and
TLS) and reads the RESP2 replies off that connection's socket (``Connection._sock``, present in
every redis-py release) itself: the bulk string's length line, the value's header into a small
buffer, the payload with ``recv_into`` into the slab, then the checksum over the slab in place.
The kernel's copy from the socket into the slab is the only one left.

Every read is exact (never past the reply being read), so a connection whose replies were all
read is clean for the pool again (``in_sync``). Every read also ends by ``deadline`` and waits at
most ``timeout_s`` for a byte, so one stalled connection holds its caller no longer than either.
"""

from __future__ import annotations

import enum
import socket
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

from lmc_transfer.tiers.format import HEADER_BYTES, SlabFormat, Verdict

#: A RESP2 length line ("$" and a 64-bit integer) is never longer than this.
_MAX_LENGTH_LINE = 24
#: Error replies are read up to this length for their message; longer ones are cut.
_MAX_ERROR_LINE = 512
_CRLF = b"\r\n"


class Reply(enum.Enum):
    VALUE = "a valid value, its payload in the destination"
    MISSING = "nil: the key does not exist (any more)"
    INVALID = "a value that is not this key's in this format (length, header or checksum)"


class SocketReader:
    """Exact reads of one connection's replies; ``received`` counts every byte read, also of a
    reply cut short by a failure, and ``in_sync`` is False while a reply is read only in part."""

    def __init__(self, sock: socket.socket, deadline: float, timeout_s: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._timeout_s = timeout_s
        self._header = bytearray(HEADER_BYTES)
        self._byte = bytearray(1)
        self._crlf = bytearray(2)
        self.received = 0
        self.in_sync = True

    def value_into(self, key: bytes, slab_format: SlabFormat, dest: memoryview) -> Reply:
        """Read one GET reply; its payload lands in ``dest`` (``slab_format.payload_bytes``).

        Raises ``ResponseError`` for an error reply, ``InvalidResponse`` for anything that is not
        RESP2, and ``OSError``/``ConnectionError`` when the socket fails, times out, or passes
        the deadline.
        """
        self.in_sync = False
        kind = self._exact_byte()
        if kind == b"-":
            message = self._line(_MAX_ERROR_LINE)
            self.in_sync = True
            raise ResponseError(message.decode("utf-8", "replace"))
        if kind != b"$":
            raise InvalidResponse(f"expected a bulk string reply to GET, got a reply starting with {kind!r}")
        length = self._length()
        if length == -1:
            self.in_sync = True
            return Reply.MISSING
        if length != slab_format.value_bytes:
            return Reply.INVALID  # the reply is left unread: the caller stops on this connection
        header = memoryview(self._header)
        self._exact(header)
        if slab_format.check_header(key, header) is not Verdict.OK:
            return Reply.INVALID
        self._exact(dest)
        self._exact(memoryview(self._crlf))
        if self._crlf != _CRLF:
            raise InvalidResponse(f"expected CRLF after a bulk string, got {bytes(self._crlf)!r}")
        self.in_sync = True
        return Reply.VALUE if slab_format.check(key, header, dest) is Verdict.OK else Reply.INVALID

    def _length(self) -> int:
        line = self._line(_MAX_LENGTH_LINE)
        try:
            return int(line)
        except ValueError:
            raise InvalidResponse(f"expected a bulk string length, got {line[:_MAX_LENGTH_LINE]!r}") from None

    def _line(self, limit: int) -> bytes:
        """The rest of a line (without its CRLF), one byte per read so that none of the next reply
        is consumed; lines are a few bytes, values megabytes."""
        out = bytearray()
        while not out.endswith(_CRLF):
            if len(out) > limit:
                raise InvalidResponse(f"reply line longer than {limit} bytes")
            out += self._exact_byte()
        return bytes(out[:-2])

    def _exact_byte(self) -> bytes:
        self._exact(memoryview(self._byte))
        return bytes(self._byte)

    def _exact(self, view: memoryview) -> None:
        got, size = 0, view.nbytes
        while got < size:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("remote fetch passed its deadline")
            self._sock.settimeout(min(self._timeout_s, left))
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise RedisConnectionError("the server closed the connection mid-reply")
            got += n
            self.received += n
