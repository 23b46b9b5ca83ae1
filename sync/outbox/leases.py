"""Out of the queue: due rows leased to one sender, and what became of each.

Rows move ``pending -> sent`` (or ``failed``/``invalid``/``dead``/``skipped``) under a
lease, so several workers, threads or processes can dispatch from the same outbox
without sending a row twice at once. An outcome is written only if the row is still
the sender's and its payload unchanged: a row the HIS changed meanwhile keeps its new
state and is sent again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from sync.outbox import history
from sync.outbox.engine import by_institution, chunks, fit, skip_locked_ok, utc
from sync.outbox.model import DUE, Claimed, Failed, Outcome, Sent, Status
from sync.outbox.schema import sync_outbox

log = structlog.get_logger(__name__)


class Leases:
    """Claiming due rows, recording their outcomes, giving them back."""

    def __init__(self, engine: sa.Engine, *, lease_s: int) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self.lease_s = lease_s
        # SQLite has one writer at a time, and a connection that finds the lock taken polls
        # it with sleeps of 1 to 100 ms (busy_timeout). The upload threads of this process
        # queue on this lock instead, so each outcome is recorded as soon as the file is free.
        self._outcome_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if self._dialect == "sqlite" else contextlib.nullcontext()
        )

    def claim_due(self, *, now: datetime, limit: int, owner: str, institution: str | None = None) -> list[Claimed]:
        """Lease up to ``limit`` due rows to ``owner``, oldest due first (``institution``'s only, when given).

        Concurrent claimers never get the same row: ``FOR UPDATE SKIP LOCKED`` where
        the dialect has it, SQLite's BEGIN IMMEDIATE elsewhere, and the UPDATE only
        takes rows that are still free.
        """
        now = utc(now)
        if limit <= 0:
            return []
        o = sync_outbox
        free = sa.or_(o.c.lease_until.is_(None), o.c.lease_until < now)
        until = now + timedelta(seconds=self.lease_s)
        with self._claim_connection() as conn, conn.begin():
            keys = self._pick_due(conn, now=now, limit=limit, free=free, institution=institution)
            if not keys:
                return []
            rows: list[Any] = []
            for inst, lshs in by_institution(keys).items():
                mine = sa.and_(o.c.institution == inst, o.c.lsh.in_(lshs))
                conn.execute(sa.update(o).where(mine, free).values(lease_owner=owner, lease_until=until))
                rows += conn.execute(
                    sa.select(
                        o.c.institution, o.c.lsh, o.c.payload, o.c.payload_hash, o.c.key_crowd, o.c.card_type,
                        o.c.card_no, o.c.attempts, o.c.generic_failures, o.c.first_failed_at, o.c.next_attempt_at,
                    ).where(mine, o.c.lease_owner == owner)
                ).all()
        rows = sorted(rows, key=lambda r: (r.next_attempt_at, r.lsh, r.institution))
        claims = [
            Claimed(
                institution=r.institution, lsh=r.lsh, payload_json=r.payload, payload_hash=r.payload_hash, key_crowd=r.key_crowd,
                card_type=r.card_type, card_no=r.card_no, attempts=r.attempts, generic_failures=r.generic_failures,
                first_failed_at=r.first_failed_at, lease_owner=owner,
            )
            for r in rows
        ]
        if claims:
            log.debug("outbox_claimed", count=len(claims), owner=owner)
        return claims

    def _pick_due(
        self, conn: sa.Connection, *, now: datetime, limit: int, free: sa.ColumnElement[bool],
        institution: str | None,
    ) -> list[tuple[str, str]]:
        """The (institution, lsh) of up to ``limit`` free due rows, oldest due first, locked
        where the dialect can.

        One query per due status, each in the order of the (institution, status,
        next_attempt_at, lsh) index with a LIMIT: the database reads the rows it returns and stops, so a claim
        costs its batch, not the backlog (``status IN (...)`` would sort every due row).
        The few candidates of the statuses are merged here.
        """
        o = sync_outbox
        found: list[tuple[datetime, str, str]] = []
        for status in DUE:
            due = sa.and_(o.c.status == status, o.c.next_attempt_at <= now, free)
            if institution is not None:
                due = sa.and_(o.c.institution == institution, due)
            picked = (o.c.next_attempt_at, o.c.lsh, o.c.institution)
            query = sa.select(*picked).where(due).order_by(o.c.next_attempt_at, o.c.lsh).limit(limit)
            if self._dialect == "oracle":
                # Oracle refuses FOR UPDATE together with FETCH FIRST (ORA-02014):
                # pick candidates first, then lock those still free.
                candidates = conn.execute(query.with_only_columns(o.c.institution, o.c.lsh)).all()
                for inst, lshs in by_institution((c.institution, c.lsh) for c in candidates).items():
                    locked = (
                        sa.select(*picked).where(o.c.institution == inst, o.c.lsh.in_(lshs), due)
                        .with_for_update(skip_locked=True)
                    )
                    found.extend((r.next_attempt_at, r.lsh, r.institution) for r in conn.execute(locked))
                continue
            elif self._dialect != "sqlite":
                query = query.with_for_update(skip_locked=skip_locked_ok(self._engine.dialect))
            found.extend((r.next_attempt_at, r.lsh, r.institution) for r in conn.execute(query))
        found.sort()
        return [(inst, lsh) for _, lsh, inst in found[:limit]]

    @contextmanager
    def _claim_connection(self) -> Iterator[sa.Connection]:
        with self._engine.connect() as conn:
            if self._dialect in ("mysql", "mariadb"):
                # InnoDB's default REPEATABLE READ takes gap locks on the scanned
                # index range, holding up enqueues and other claimers; READ COMMITTED
                # locks only the rows it returns.
                conn = conn.execution_options(isolation_level="READ COMMITTED")
            yield conn

    def record(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Write outcomes in one transaction, each as if alone: only if the row is still ours
        and its payload unchanged; our lease is dropped either way. True per outcome written.

        One commit for many outcomes: the upload threads hand them to one writer instead of
        each holding its slot through a transaction of its own. The rows are read (and locked
        where the dialect can) once for the group, then each kind of outcome is one prepared
        UPDATE executed for all its rows, not a statement built per row.
        """
        if not outcomes:
            return []
        plans = [_plan(item) for item in outcomes]
        # Each attempt stays in the history even when its outcome is dropped: it happened.
        tried = history.attempt_rows(
            (item.claimed.lsh, plan.shown, item.claimed.institution) for item, plan in zip(outcomes, plans, strict=True)
        )
        with self._outcome_lock, self._engine.begin() as conn:
            now_held = self._holders(conn, [(item.claimed.institution, item.claimed.lsh) for item in outcomes])
            written = [
                now_held.get((item.claimed.institution, item.claimed.lsh)) == (item.claimed.lease_owner, item.claimed.payload_hash)
                for item in outcomes
            ]
            by_shape: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
            lost: list[dict[str, Any]] = []
            for item, plan, done in zip(outcomes, plans, written, strict=True):
                c = item.claimed
                if done:
                    by_shape.setdefault(plan.shape, []).append(plan.params)
                elif now_held.get((c.institution, c.lsh), (None, None))[0] == c.lease_owner:
                    # The source changed while uploading: the row keeps its new state, due as it was.
                    lost.append({"k_institution": c.institution, "k_lsh": c.lsh, "k_owner": c.lease_owner})
            for shape, params in by_shape.items():
                conn.execute(_statement(shape), params)
            if lost:
                conn.execute(_RELEASE, lost)
            history.insert_attempts(conn, tried)
        for item, done in zip(outcomes, written, strict=True):
            if not done:
                log.info("outbox_outcome_dropped", lsh=item.claimed.lsh, reason="payload changed or lease lost")
        return written

    def _holders(
        self, conn: sa.Connection, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[str | None, str]]:
        """Who holds each row and its payload hash now; locked until the transaction ends (SQLite's
        BEGIN IMMEDIATE holds the whole file), so that the UPDATEs find what was read."""
        o = sync_outbox
        found: dict[tuple[str, str], tuple[str | None, str]] = {}
        for institution, lshs in by_institution(keys).items():
            for chunk in chunks(lshs):
                query = sa.select(o.c.lsh, o.c.lease_owner, o.c.payload_hash).where(
                    o.c.institution == institution, o.c.lsh.in_(chunk)
                )
                if self._dialect != "sqlite":
                    query = query.with_for_update()
                found.update(((institution, r.lsh), (r.lease_owner, r.payload_hash)) for r in conn.execute(query))
        return found

    def record_crash(
        self, c: Claimed, *, error: str, now: datetime, next_attempt_at: datetime, limit: int
    ) -> Status | None:
        """Uploading ``c`` raised where nothing should (a payload edited into broken JSON, a
        bug): ``failed`` until its ``limit``-th crash, then ``invalid`` with ``error``, so a
        poison record stops being tried every cycle. None when the row is no longer ours."""
        now = utc(now)
        o = sync_outbox
        held = sa.and_(o.c.institution == c.institution, o.c.lsh == c.lsh, o.c.lease_owner == c.lease_owner)
        ours = sa.and_(held, o.c.payload_hash == c.payload_hash)
        with self._outcome_lock, self._engine.begin() as conn:
            crashes = conn.execute(sa.select(o.c.crashes).where(ours)).scalar()
            if crashes is None:
                conn.execute(
                    sa.update(o).where(held)
                    .values(lease_owner=None, lease_until=None)
                )
                return None
            crashes = int(crashes) + 1
            status = Status.INVALID if crashes >= limit else Status.FAILED
            conn.execute(
                sa.update(o).where(ours).values(
                    status=status.value, crashes=crashes, attempts=o.c.attempts + 1, last_error=error,
                    last_http_status=None, updated_at=now, lease_owner=None, lease_until=None,
                    next_attempt_at=None if status is Status.INVALID else utc(next_attempt_at),
                    first_failed_at=sa.func.coalesce(o.c.first_failed_at, now),
                )
            )
            history.insert_attempts(
                conn, [history.attempt_row(c.lsh, {"status": status.value, "last_error": error, "updated_at": now},
                                           kind="crash", institution=c.institution)]
            )
        return status

    def release(self, claims: Iterable[Claimed], *, now: datetime) -> None:
        """Drop leases and change nothing else (configuration pause, shutdown)."""
        by_owner: dict[tuple[str, str], list[str]] = {}
        for c in claims:
            by_owner.setdefault((c.lease_owner, c.institution), []).append(c.lsh)
        if not by_owner:
            return
        o = sync_outbox
        with self._engine.begin() as conn:
            for (owner, institution), lshs in by_owner.items():
                for chunk in chunks(lshs):
                    conn.execute(
                        sa.update(o)
                        .where(o.c.institution == institution, o.c.lsh.in_(chunk), o.c.lease_owner == owner)
                        .values(lease_owner=None, lease_until=None)
                    )

    def postpone(self, claims: Sequence[Claimed], *, until: datetime) -> None:
        """Due rows among ``claims`` that are free become due only at ``until`` (nothing else
        changes: no attempt is counted). A failed probe of the platform rotates this way."""
        until = utc(until)
        o = sync_outbox
        with self._engine.begin() as conn:
            for institution, lshs in by_institution((c.institution, c.lsh) for c in claims).items():
                for chunk in chunks(lshs):
                    conn.execute(
                        sa.update(o)
                        .where(
                            o.c.institution == institution, o.c.lsh.in_(chunk), o.c.status.in_(DUE),
                            o.c.lease_owner.is_(None), o.c.next_attempt_at < until,
                        )
                        .values(next_attempt_at=until)
                    )

    def release_other_leases(self, owner: str) -> int:
        """Drop every lease held by anyone but ``owner``.

        Only for the holder of the instance lock: it is the only process sending, so any
        other lease belongs to a process that died (a crash, SIGKILL, a power cut) and its
        rows would otherwise wait for ``lease_s``. Their uploads may have reached the
        platform; sending them again is harmless (upsert by lsh).
        """
        o = sync_outbox
        with self._engine.begin() as conn:
            return int(
                conn.execute(
                    sa.update(o)
                    .where(o.c.lease_owner.is_not(None), o.c.lease_owner != owner)
                    .values(lease_owner=None, lease_until=None)
                ).rowcount
            )

    def release_owner(self, owner: str) -> int:
        """Drop every lease ``owner`` holds (a restarted worker reusing its name)."""
        o = sync_outbox
        with self._engine.begin() as conn:
            return int(
                conn.execute(sa.update(o).where(o.c.lease_owner == owner).values(lease_owner=None, lease_until=None))
                .rowcount
            )


@dataclass(frozen=True)
class _Plan:
    """One outcome as SQL: the shape of its UPDATE (one prepared statement per shape), the
    statement's parameters for this row, and the values the attempt history shows."""

    shape: tuple[Any, ...]
    params: dict[str, Any]
    shown: dict[str, Any]


# Columns an outcome sets from its own values (``v_<column>`` parameters); the counters and
# first_failed_at are expressions over the row's own values.
_SENT = ("status", "sent_at", "sent_hash", "payload_hash", "payload", "key_crowd", "last_answer", "last_http_status",
         "last_error", "next_attempt_at", "updated_at")
_FAILED = ("status", "last_error", "last_http_status", "next_attempt_at", "updated_at")


def _plan(outcome: Outcome) -> _Plan:
    c = outcome.claimed
    now = utc(outcome.at)
    values: dict[str, Any]
    if isinstance(outcome, Sent):
        new_hash = outcome.payload_hash or c.payload_hash
        values = {
            "status": Status.SENT.value, "sent_at": now, "sent_hash": new_hash, "payload_hash": new_hash,
            "payload": outcome.body, "key_crowd": fit(outcome.key_crowd, 1), "last_answer": fit(outcome.answer, 200),
            "last_http_status": outcome.http_status, "last_error": None, "next_attempt_at": None, "updated_at": now,
        }
        shape: tuple[Any, ...] = ("sent", _SENT)
        extra: dict[str, Any] = {}
    elif isinstance(outcome, Failed):
        values = {
            "status": Status.FAILED.value, "last_error": outcome.error, "last_http_status": outcome.http_status,
            "next_attempt_at": utc(outcome.retry_at), "updated_at": now,
        }
        shape = ("failed", _FAILED)
        extra = {"x_generic": 1 if outcome.generic else 0}
    else:
        values = {
            "status": outcome.status.value, "last_error": outcome.error, "last_http_status": outcome.http_status,
            "next_attempt_at": None, "updated_at": now,
        }
        if outcome.key_crowd is not None:
            values["key_crowd"] = outcome.key_crowd
        # A skip is a decision, not an attempt at the platform.
        shape = ("parked", tuple(values), outcome.status is not Status.SKIPPED)
        extra = {}
    params = {f"v_{name}": value for name, value in values.items()}
    params.update(extra, k_institution=c.institution, k_lsh=c.lsh, k_owner=c.lease_owner, k_hash=c.payload_hash)
    return _Plan(shape=shape, params=params, shown=values)


_STATEMENTS: dict[tuple[Any, ...], sa.Update] = {}


def _statement(shape: tuple[Any, ...]) -> sa.Update:
    """The prepared UPDATE of one shape of outcome (built once; SQLAlchemy caches its compiled form)."""
    stmt = _STATEMENTS.get(shape)
    if stmt is not None:
        return stmt
    o = sync_outbox
    kind, names = shape[0], shape[1]
    values: dict[str, Any] = {name: sa.bindparam(f"v_{name}", type_=o.c[name].type) for name in names}
    if kind == "failed":
        values["attempts"] = o.c.attempts + 1
        values["generic_failures"] = o.c.generic_failures + sa.bindparam("x_generic", type_=sa.Integer)
        values["first_failed_at"] = sa.func.coalesce(o.c.first_failed_at, sa.bindparam("v_updated_at", type_=o.c.updated_at.type))
    elif kind == "parked" and shape[2]:
        values["attempts"] = o.c.attempts + 1
    stmt = (
        sa.update(o)
        .where(
            o.c.institution == sa.bindparam("k_institution", type_=o.c.institution.type),
            o.c.lsh == sa.bindparam("k_lsh", type_=o.c.lsh.type),
            o.c.lease_owner == sa.bindparam("k_owner", type_=o.c.lease_owner.type),
            o.c.payload_hash == sa.bindparam("k_hash", type_=o.c.payload_hash.type),
        )
        .values(**values, lease_owner=None, lease_until=None)
    )
    _STATEMENTS[shape] = stmt
    return stmt


_RELEASE = (
    sa.update(sync_outbox)
    .where(
        sync_outbox.c.institution == sa.bindparam("k_institution", type_=sync_outbox.c.institution.type),
        sync_outbox.c.lsh == sa.bindparam("k_lsh", type_=sync_outbox.c.lsh.type),
        sync_outbox.c.lease_owner == sa.bindparam("k_owner", type_=sync_outbox.c.lease_owner.type),
    )
    .values(lease_owner=None, lease_until=None)
)
