"""The login token and the store that shares it.

Logging in again pushes the previous token out upstream (document FAQ 4), so
every thread and every process using the same account must share one token
and renew it by exactly one login. A store does that: ``renew`` is single
flight, and a caller passes the token it saw rejected so that a renewal that
already happened elsewhere is reused instead of repeated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol


@dataclass(frozen=True, kw_only=True)
class Token:
    value: str
    obtained_at: datetime  # aware, UTC
    expires_at: datetime  # aware, UTC: when we stop trusting it and log in again

    def valid_at(self, now: datetime) -> bool:
        return now < self.expires_at


class TokenStore(Protocol):
    def current(self) -> Token | None:
        """The shared token, if any (possibly expired: callers check ``valid_at``)."""
        ...

    def renew(self, stale: str | None, login: Callable[[], Token]) -> Token:
        """Single flight: if the stored token is still ``stale`` (or absent, or expired),
        call ``login`` once and store its token; otherwise return the stored one.
        Concurrent callers with the same stale value cause exactly one login."""
        ...

    def discard(self, value: str) -> None:
        """Forget ``value`` if it is still the stored token (it was rejected)."""
        ...


def utcnow() -> datetime:
    return datetime.now(UTC)


class MemoryTokenStore:
    """One process: threads share the token; one lock makes renewal single flight."""

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self._lock = threading.Lock()
        self._token: Token | None = None
        self._clock = clock

    def current(self) -> Token | None:
        return self._token

    def renew(self, stale: str | None, login: Callable[[], Token]) -> Token:
        with self._lock:
            tok = self._token
            if tok is not None and tok.value != stale and tok.valid_at(self._clock()):
                return tok
            tok = login()
            self._token = tok
            return tok

    def discard(self, value: str) -> None:
        with self._lock:
            if self._token is not None and self._token.value == value:
                self._token = None
