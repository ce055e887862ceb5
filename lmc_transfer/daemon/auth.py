"""The token handshake: each side proves it knows the daemon's token without sending it.

A daemon with a token (``mp_auth_token``, or the one it writes for TCP, see
lmc_transfer.daemon.instance) answers only CHALLENGE and AUTH until a peer has a session:

1. client -> CHALLENGE ``{client_nonce}``; daemon -> ``{daemon_nonce, proof}`` where
   ``proof = HMAC(token, "daemon" | client_nonce | daemon_nonce)``.
2. The client checks the proof (constant time). A peer that does not know the token (another
   user who bound the port while the daemon was down) fails here, before the client has said
   anything but a random nonce.
3. client -> AUTH ``{daemon_nonce, proof = HMAC(token, "client" | ...)}``; the daemon checks it
   against the challenge it issued and opens a session: an id and a key, both derived from the
   token and the two nonces on each side. The key never crosses the socket.
4. Every later message of the session, both ways, names the session id in its header and ends
   with a MAC frame (``seal``): HMAC(key) over the length-prefixed frames before it. The daemon
   checks it before it parses anything else; the client ignores any reply that is not sealed
   (an unsealed ``unauthorized`` error only makes it authenticate again).
5. A session lives as long as the client's socket: the socket never reconnects by itself, and a
   new socket authenticates again before it sends anything else. So a peer that takes the port
   over after the daemon died hears nothing but a nonce, and cannot answer for the daemon.

Distinct labels keep a MAC of one kind from being replayed as another; fresh nonces on both
sides keep a recorded exchange from being replayed. Nothing here hides the traffic from a
reader on the network: the token decides who may talk to the daemon and who may answer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass, field
from typing import Sequence

NONCE_BYTES = 32
#: Hex characters of a nonce or a proof (both 32 bytes).
HEX_LEN = 2 * NONCE_BYTES
MAC_BYTES = 32
_DAEMON, _CLIENT = b"lmct-daemon-proof", b"lmct-client-proof"
_SESSION_ID, _SESSION_KEY = b"lmct-session-id", b"lmct-session-key"
_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class SessionKey:
    """One authenticated session: ``session`` names it in headers, ``key`` seals its messages."""

    session: str
    key: bytes = field(repr=False)


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def _mac(token: str, label: bytes, client_nonce: str, daemon_nonce: str) -> bytes:
    message = b"\0".join((label, bytes.fromhex(client_nonce), bytes.fromhex(daemon_nonce)))
    return hmac.digest(token.encode("utf-8"), message, hashlib.sha256)


def daemon_proof(token: str, client_nonce: str, daemon_nonce: str) -> str:
    return _mac(token, _DAEMON, client_nonce, daemon_nonce).hex()


def client_proof(token: str, client_nonce: str, daemon_nonce: str) -> str:
    return _mac(token, _CLIENT, client_nonce, daemon_nonce).hex()


def derive_session(token: str, client_nonce: str, daemon_nonce: str) -> SessionKey:
    return SessionKey(
        session=_mac(token, _SESSION_ID, client_nonce, daemon_nonce).hex()[:32],
        key=_mac(token, _SESSION_KEY, client_nonce, daemon_nonce),
    )


def seal(frames: Sequence[bytes], auth: SessionKey) -> list[bytes]:
    """``frames`` plus their MAC frame."""
    return [*frames, _frames_mac(frames, auth.key)]


def unseal(frames: Sequence[bytes], auth: SessionKey) -> Sequence[bytes] | None:
    """The frames before a valid MAC frame; None when the last frame is no valid MAC of them."""
    if len(frames) < 2 or len(frames[-1]) != MAC_BYTES:
        return None
    body = frames[:-1]
    return body if hmac.compare_digest(_frames_mac(body, auth.key), bytes(frames[-1])) else None


def _frames_mac(frames: Sequence[bytes], key: bytes) -> bytes:
    # Length prefixes: moving bytes from one frame to the next changes the MAC.
    message = b"".join(_LENGTH.pack(len(f)) + bytes(f) for f in frames)
    return hmac.digest(key, message, hashlib.sha256)


def same(expected: str, given: str) -> bool:
    """Constant-time comparison of two hex strings."""
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))
