"""The daemon's side of the token handshake (lmc_transfer.daemon.auth): challenges and sessions.

Both tables are bounded and forget idle entries, so peers that flood CHALLENGE or never come
back cost a fixed amount of memory; an engine whose session was forgotten is told
``unauthorized`` and authenticates again on its own.
"""

from __future__ import annotations

import time
from typing import Callable, Generic, TypeVar

from lmc_transfer.daemon import auth
from lmc_transfer.daemon.auth import SessionKey
from lmc_transfer.daemon.messages import AuthRequest, ChallengeReply, ChallengeRequest
from lmc_transfer.daemon.protocol import HANDSHAKE_TYPES, ErrorCode, MsgType, ProtocolError

#: A challenge must be answered within this long.
CHALLENGE_TTL_S = 10.0
MAX_CHALLENGES = 1024
#: A session unused this long is forgotten.
SESSION_IDLE_S = 600.0
MAX_SESSIONS = 4096

V = TypeVar("V")


class RecentTable(Generic[V]):
    """A dict that forgets entries not touched for ``idle_s`` and keeps at most ``max_entries``
    (the least recently touched go first)."""

    def __init__(self, max_entries: int, idle_s: float, clock: Callable[[], float]) -> None:
        self._entries: dict[str, tuple[V, float]] = {}
        self._max = max_entries
        self._idle_s = idle_s
        self._clock = clock

    def put(self, key: str, value: V) -> None:
        now = self._clock()
        self._entries.pop(key, None)
        self._entries[key] = (value, now)
        if len(self._entries) > self._max or len(self._entries) % 64 == 0:
            for k in [k for k, (_, seen) in self._entries.items() if now - seen > self._idle_s]:
                del self._entries[k]
            while len(self._entries) > self._max:
                del self._entries[next(iter(self._entries))]

    def get(self, key: str) -> V | None:
        """The live value of ``key``, touched (it counts as used now); None if absent or idle."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry[1] > self._idle_s:
            del self._entries[key]
            return None
        self.put(key, entry[0])
        return entry[0]

    def pop(self, key: str) -> V | None:
        entry = self._entries.pop(key, None)
        if entry is None or self._clock() - entry[1] > self._idle_s:
            return None
        return entry[0]

    def live(self) -> int:
        now = self._clock()
        return sum(1 for _, seen in self._entries.values() if now - seen <= self._idle_s)


class Sessions:
    """Who may talk to a daemon whose token is ``token``; ``None``: everyone who can connect."""

    def __init__(self, token: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._token = token
        self._challenges: RecentTable[str] = RecentTable(MAX_CHALLENGES, CHALLENGE_TTL_S, clock)
        self._sessions: RecentTable[SessionKey] = RecentTable(MAX_SESSIONS, SESSION_IDLE_S, clock)

    def authorize(self, msg_type: MsgType, session: str | None) -> SessionKey | None:
        """``protocol.Authorize``: the key of a request's session; None where none is needed."""
        if self._token is None:
            if session is not None or msg_type in HANDSHAKE_TYPES:
                raise _unauthorized("this daemon has no token and takes no session; remove mp_auth_token from the client's config")
            return None
        if msg_type in HANDSHAKE_TYPES:
            if session is not None:
                raise _unauthorized(f"{msg_type.value} starts a session and must not name one")
            return None
        if session is None:
            raise _unauthorized("authenticate first (CHALLENGE, then AUTH): this daemon has a token")
        key = self._sessions.get(session)
        if key is None:
            raise _unauthorized("unknown or expired session: authenticate again")
        return key

    def challenge(self, request: ChallengeRequest) -> ChallengeReply:
        assert self._token is not None, "authorize() refuses handshakes without a token"
        daemon_nonce = auth.new_nonce()
        self._challenges.put(daemon_nonce, request.client_nonce)
        return ChallengeReply(daemon_nonce, auth.daemon_proof(self._token, request.client_nonce, daemon_nonce))

    def open(self, request: AuthRequest) -> SessionKey:
        """The session an AUTH opens; ``unauthorized`` unless it answers a live challenge of ours."""
        assert self._token is not None, "authorize() refuses handshakes without a token"
        client_nonce = self._challenges.pop(request.daemon_nonce)
        if client_nonce is None:
            raise _unauthorized("unknown or expired challenge: send CHALLENGE again")
        if not auth.same(auth.client_proof(self._token, client_nonce, request.daemon_nonce), request.proof):
            raise _unauthorized("wrong proof: the client does not know the token")
        key = auth.derive_session(self._token, client_nonce, request.daemon_nonce)
        self._sessions.put(key.session, key)
        return key


def _unauthorized(message: str) -> ProtocolError:
    return ProtocolError(message, code=ErrorCode.UNAUTHORIZED)
