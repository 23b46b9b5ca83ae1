"""The shared login token in ``sync_token``, and its renewal by exactly one login.

Logging in again pushes the previous token out upstream (document FAQ 4), so every
thread and every process using the outbox shares the one row (see
``sync.upstream.tokens``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog

from sync.errors import TransientError
from sync.outbox.engine import utc
from sync.outbox.lock import renewal_lock
from sync.outbox.model import DEFAULT_INSTITUTION
from sync.outbox.schema import sync_token
from sync.upstream.tokens import Token

log = structlog.get_logger(__name__)


class DbTokenStore:
    """``sync.upstream.tokens.TokenStore`` on the single ``sync_token`` row.

    Single flight across threads (a lock in the process) and across processes (a lock
    beside the outbox: a file lock next to a SQLite outbox, a named lock of the database
    server elsewhere), so concurrent renewals cause exactly one login. No outbox
    transaction is open while the login waits on the network: a slow platform never holds
    up the poll or the recording of outcomes (SQLite has a single writer).
    """

    # Longer than any one login (upstream.timeout_s is at most 600 s).
    RENEWAL_WAIT_S = 900.0

    def __init__(
        self, engine: sa.Engine, clock: Callable[[], datetime] | None = None, *, institution: str = DEFAULT_INSTITUTION
    ) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._clock = clock or (lambda: datetime.now(UTC))
        # Each institution logs in with its own account: its own row, its own single flight.
        self.institution = institution
        self._id: int | None = None

    @staticmethod
    def _token(row: sa.Row[Any] | None) -> Token | None:
        if row is None or not row.token or row.expires_at is None:
            return None
        return Token(
            value=row.token,
            obtained_at=(row.obtained_at or row.expires_at).replace(tzinfo=UTC),
            expires_at=row.expires_at.replace(tzinfo=UTC),
        )

    def _row_id(self) -> int:
        """The id of this institution's row, created on first use (the migration made the first one's)."""
        if self._id is not None:
            return self._id
        t = sync_token
        for attempt in (1, 2):
            with self._engine.begin() as conn:
                found = conn.execute(sa.select(t.c.id).where(t.c.institution == self.institution)).scalar()
                if found is None:
                    # Not claimed yet: the migration's row (id 1) if it belongs to no one, else a new one.
                    unclaimed = conn.execute(sa.select(t.c.id).where(t.c.id == 1, t.c.institution.is_(None))).scalar()
                    if unclaimed is not None:
                        conn.execute(sa.update(t).where(t.c.id == 1).values(institution=self.institution))
                        found = 1
                    else:
                        found = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.c.id), 0))).scalar() or 0) + 1
                        try:
                            conn.execute(sa.insert(t).values(id=found, institution=self.institution))
                        except sa.exc.IntegrityError:
                            if attempt == 2:
                                raise
                            continue  # another process took that id first: look again
            self._id = int(found)
            return self._id
        raise AssertionError("unreachable")  # pragma: no cover

    def _select(self) -> sa.Select[Any]:
        t = sync_token
        return sa.select(t.c.token, t.c.obtained_at, t.c.expires_at).where(t.c.id == self._row_id())

    def current(self) -> Token | None:
        select = self._select()
        with self._engine.connect() as conn:
            return self._token(conn.execute(select).first())

    def renew(self, stale: str | None, login: Callable[[], Token]) -> Token:
        with self._lock:
            scope = "" if self._row_id() == 1 else self.institution
            guard = renewal_lock(self._engine, wait_s=self.RENEWAL_WAIT_S, scope=scope)
            if guard is None:
                return self._renew_holding_the_row(stale, login)
            try:
                with guard:
                    tok = self.current()
                    if tok is not None and tok.value != stale and tok.valid_at(self._clock()):
                        return tok  # another process renewed it while we waited
                    tok = login()
                    with self._engine.begin() as conn:
                        self._store(conn, tok)
                    return tok
            except TimeoutError as exc:
                raise TransientError(
                    f"平台登录被阻塞 / the platform login is held up: {exc}",
                    hint="另一个 crowd-sync 进程正在登录，下个周期重试 / another crowd-sync process is logging in; it is retried at the next cycle",
                ) from None

    def _renew_holding_the_row(self, stale: str | None, login: Callable[[], Token]) -> Token:
        """Where no named lock exists (Oracle): the token row stays locked during the login,
        which holds up other renewers only (Oracle's readers never wait for a row lock)."""
        with self._engine.begin() as conn:
            row = conn.execute(self._select().with_for_update()).first()
            tok = self._token(row)
            if tok is not None and tok.value != stale and tok.valid_at(self._clock()):
                return tok
            tok = login()
            self._store(conn, tok)
            return tok

    def _store(self, conn: sa.Connection, tok: Token) -> None:
        values = {
            "token": tok.value, "obtained_at": utc(tok.obtained_at), "expires_at": utc(tok.expires_at),
            "updated_at": utc(self._clock()),
        }
        row_id = self._row_id()
        if not conn.execute(sa.update(sync_token).where(sync_token.c.id == row_id).values(values)).rowcount:
            # The migration inserts the row; recreate it if someone deleted it.
            conn.execute(sa.insert(sync_token).values(id=row_id, institution=self.institution, **values))
        log.info("token_stored", expires_at=tok.expires_at.isoformat())

    def discard(self, value: str) -> None:
        with self._lock, self._engine.begin() as conn:
            conn.execute(
                sa.update(sync_token)
                .where(sync_token.c.id == self._row_id(), sync_token.c.token == value)
                .values(token=None, obtained_at=None, expires_at=None, updated_at=utc(self._clock()))
            )
