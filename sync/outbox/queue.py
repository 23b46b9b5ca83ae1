"""Into the queue: visits read from the HIS (with the cursor covering them), and rows made due again.

``enqueue`` is idempotent on ``(lsh, payload_hash)`` and moves the poll cursor in the
same transaction as the rows it covers. ``source_changed_at`` and the cursor are the
HIS's own clock and stored as given.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import structlog

from sync.crashpoints import crash_point
from sync.outbox import history
from sync.outbox.cache import LabelCache
from sync.outbox.engine import RawInsert, by_institution, chunks, fit, utc, wall
from sync.outbox.model import DUE, EnqueueResult, Incoming, Status
from sync.outbox.schema import sync_cursor, sync_outbox
from sync.records import RESIDENT_ID

log = structlog.get_logger(__name__)

CURSOR_NAME = "his"


class Queue:
    """Rows entering (or entering again) the ``sync_outbox`` queue, and the poll cursor."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    # -- the cursor ------------------------------------------------------------------
    def get_cursor(self) -> tuple[datetime, str] | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(sync_cursor.c.changed_at, sync_cursor.c.lsh).where(sync_cursor.c.name == CURSOR_NAME)
            ).first()
        if row is None or row.changed_at is None:
            return None
        return row.changed_at, row.lsh or ""

    def rewind_cursor(self, cursor: tuple[datetime, str], *, now: datetime) -> None:
        """Set the cursor back (it was found ahead of the HIS clock); ``enqueue`` only moves it forward."""
        with self._engine.begin() as conn:
            updated = conn.execute(
                sa.update(sync_cursor)
                .where(sync_cursor.c.name == CURSOR_NAME)
                .values(changed_at=wall(cursor[0]), lsh=cursor[1], updated_at=utc(now))
            ).rowcount
            if not updated:
                conn.execute(
                    sa.insert(sync_cursor).values(
                        name=CURSOR_NAME, changed_at=wall(cursor[0]), lsh=cursor[1], updated_at=utc(now)
                    )
                )

    def clear_cursor(self) -> None:
        """Forget the cursor: the next poll back-fills from his.start_from."""
        with self._engine.begin() as conn:
            conn.execute(sa.delete(sync_cursor).where(sync_cursor.c.name == CURSOR_NAME))

    def newest_source_changed_at(self, *, not_after: datetime) -> datetime | None:
        """The newest HIS change time (HIS clock) of any visit read, not after ``not_after``."""
        o = sync_outbox
        with self._engine.connect() as conn:
            value = conn.execute(
                sa.select(sa.func.max(o.c.source_changed_at)).where(o.c.source_changed_at <= wall(not_after))
            ).scalar()
        return value if isinstance(value, datetime) else None

    def _move_cursor(self, conn: sa.Connection, cursor: tuple[datetime, str], now: datetime) -> None:
        changed_at, lsh = wall(cursor[0]), cursor[1]
        assert changed_at is not None
        row = conn.execute(
            sa.select(sync_cursor.c.changed_at, sync_cursor.c.lsh)
            .where(sync_cursor.c.name == CURSOR_NAME)
            .with_for_update()
        ).first()
        if row is None:
            conn.execute(sa.insert(sync_cursor).values(name=CURSOR_NAME, changed_at=changed_at, lsh=lsh, updated_at=now))
            return
        if row.changed_at is not None and (row.changed_at, row.lsh or "") >= (changed_at, lsh):
            return  # only forward: a late batch never rewinds the cursor
        conn.execute(
            sa.update(sync_cursor)
            .where(sync_cursor.c.name == CURSOR_NAME)
            .values(changed_at=changed_at, lsh=lsh, updated_at=now)
        )

    # -- enqueue -----------------------------------------------------------------------
    def enqueue(
        self, items: Sequence[Incoming], *, now: datetime, cursor: tuple[datetime, str] | None = None
    ) -> EnqueueResult:
        """Record a batch of visits (and the cursor covering them) in one transaction.

        Idempotent on ``(lsh, payload_hash)``: an unchanged row is not written at all.
        A changed row starts over: its new status, attempts reset, due now if pending.
        """
        now = utc(now)
        o = sync_outbox
        latest: dict[tuple[str, str], Incoming] = {}
        for item in items:
            if len(item.lsh) > o.c.lsh.type.length:  # type: ignore[attr-defined]
                log.warning("lsh_too_long_to_store", lsh=item.lsh[:60], length=len(item.lsh))
                continue
            latest[(item.institution, item.lsh)] = item  # duplicates inside a batch: the last wins
        inserts: list[Incoming] = []
        updates: list[dict[str, Any]] = []
        with self._engine.begin() as conn:
            known: dict[tuple[str, str], str] = {}
            for institution, lshs in by_institution(latest).items():
                for chunk in chunks(lshs):
                    rows = conn.execute(
                        sa.select(o.c.lsh, o.c.payload_hash).where(o.c.institution == institution, o.c.lsh.in_(chunk))
                    )
                    known.update({(institution, r.lsh): r.payload_hash for r in rows})
            for key, item in latest.items():
                if key not in known:
                    inserts.append(item)
                elif known[key] != item.payload_hash:
                    updates.append({**self._incoming_values(item, now), "b_institution": key[0], "b_lsh": key[1]})
            if inserts:
                self._insert(conn, inserts, now)
            crash_point("mid_enqueue")
            if updates:
                stmt = (
                    sa.update(o)
                    .where(o.c.institution == sa.bindparam("b_institution"), o.c.lsh == sa.bindparam("b_lsh"))
                    .values({k: sa.bindparam(k) for k in updates[0] if not k.startswith("b_")})
                )
                conn.execute(stmt, updates)
            if cursor is not None:
                self._move_cursor(conn, cursor, now)
            # Rows parked at once (local validation, the key_crowd column) start their story here.
            history.insert_attempts(conn, history.attempt_rows([
                (i.lsh, {"status": Status(i.status).value, "last_error": i.reason, "updated_at": now}, i.institution)
                for i in inserts if i.status is not Status.PENDING
            ] + [
                (v["b_lsh"], v, v["b_institution"]) for v in updates if v["status"] != Status.PENDING.value
            ]))
        written = [Status(i.status).value for i in inserts] + [v["status"] for v in updates]
        result = EnqueueResult(
            inserted=len(inserts),
            changed=len(updates),
            unchanged=len(latest) - len(inserts) - len(updates),
            invalid=written.count(Status.INVALID.value),
            skipped=written.count(Status.SKIPPED.value),
        )
        log.debug("outbox_enqueued", inserted=result.inserted, changed=result.changed, unchanged=result.unchanged)
        return result

    def _insert(self, conn: sa.Connection, items: Sequence[Incoming], now: datetime) -> None:
        raw = self._raw_insert
        if raw is not None:
            raw.execute(conn, items, now)
            return
        conn.execute(
            sa.insert(sync_outbox),
            [
                {**self._incoming_values(item, now), "institution": item.institution, "lsh": item.lsh,
                 "first_seen_at": now}
                for item in items
            ],
        )

    @functools.cached_property
    def _raw_insert(self) -> RawInsert | None:
        # SQLite only: there SQLAlchemy's executemany processes every parameter of every row
        # in Python (half the cost of a back-fill's INSERT), where the driver loops in C.
        # Other drivers keep SQLAlchemy's path, which batches rows into multi-row INSERTs.
        return RawInsert.for_dialect(self._engine.dialect) if self._engine.dialect.name == "sqlite" else None

    @staticmethod
    def _incoming_values(item: Incoming, now: datetime) -> dict[str, Any]:
        status = Status(item.status)
        return {
            "status": status.value,
            "payload": item.payload_json,
            "payload_hash": item.payload_hash,
            "key_crowd": fit(item.key_crowd, 1),
            "card_type": fit(item.card_type, 8),
            "card_no": fit(item.card_no, 64),
            "visit_type": fit(item.visit_type, 1),
            "settlement_date": item.settlement_date,
            "source_changed_at": wall(item.source_changed_at),
            "attempts": 0,
            "generic_failures": 0,
            "crashes": 0,
            "first_failed_at": None,
            "next_attempt_at": now if status is Status.PENDING else None,
            "last_error": item.reason,
            "last_http_status": None,
            "updated_at": now,
        }

    # -- institutions --------------------------------------------------------------------
    def park_unrouted(self, institutions: Sequence[str], *, now: datetime) -> int:
        """Due rows of an institution the settings do not list (removed since, or requeued while
        still unknown) are parked ``invalid`` with the fix: no credentials to send them with."""
        now = utc(now)
        o = sync_outbox
        stray = sa.and_(o.c.status.in_(DUE), o.c.institution.not_in(list(institutions)), o.c.lease_owner.is_(None))
        with self._engine.begin() as conn:
            keys = conn.execute(sa.select(o.c.institution, o.c.lsh).where(stray)).all()
            if not keys:
                return 0
            rows = []
            for institution, lshs in by_institution((k.institution, k.lsh) for k in keys).items():
                reason = (
                    f"机构 {institution!r} 不在配置中 / institution {institution!r} is none of the settings' institutions[].code "
                    f"({', '.join(institutions)}): add it to institutions: with its own app key and account, "
                    "then `crowd-sync retry --status invalid`"
                )
                values = {"status": Status.INVALID.value, "last_error": reason, "next_attempt_at": None,
                          "updated_at": now}
                for chunk in chunks(lshs):
                    conn.execute(sa.update(o).where(o.c.institution == institution, o.c.lsh.in_(chunk), stray)
                                 .values(values))
                rows += [history.attempt_row(lsh, values, institution=institution) for lsh in lshs]
            history.insert_attempts(conn, rows)
        log.warning("institution_unknown", records=len(keys), fix="add the institution to institutions: in the settings")
        return len(keys)

    # -- due again -----------------------------------------------------------------------
    def requeue(
        self, *, now: datetime, lshs: Sequence[str] | None = None, statuses: Sequence[Status] | None = None
    ) -> int:
        """Make rows due now with a fresh retry budget; by lsh, by status, or both (AND).

        Nothing about the key population carries over as a decision: every requeued row is
        decided again at dispatch (``sync.keycrowd``), and for the skipped ones the label
        cache forgets their cards, so the label API is asked afresh (labels imported late).
        """
        if lshs is None and statuses is None:
            raise ValueError("requeue needs lshs or statuses")
        now = utc(now)
        o = sync_outbox
        values = {
            "status": Status.PENDING.value, "attempts": 0, "generic_failures": 0, "crashes": 0, "first_failed_at": None,
            "next_attempt_at": now, "updated_at": now,
        }
        conds: list[sa.ColumnElement[bool]] = []
        if statuses is not None:
            conds.append(o.c.status.in_([Status(s).value for s in statuses]))
        total = 0
        skipped = o.c.status == Status.SKIPPED.value
        with self._engine.begin() as conn:
            if lshs is None:
                cards = conn.scalars(sa.select(o.c.card_no).where(skipped, *conds).distinct()).all()
                total = conn.execute(sa.update(o).where(*conds).values(values)).rowcount
            else:
                cards = []
                for chunk in chunks(list(lshs)):
                    cards += conn.scalars(sa.select(o.c.card_no).where(o.c.lsh.in_(chunk), skipped, *conds)).all()
                    total += conn.execute(sa.update(o).where(o.c.lsh.in_(chunk), *conds).values(values)).rowcount
            LabelCache.forget(conn, cards)
        log.info("outbox_requeued", count=total)
        return int(total)

    def recheck_skipped(self, *, now: datetime, changed_since: datetime) -> int:
        """Skipped visits of resident ID cards changed since ``changed_since`` (HIS clock) go back
        to pending with the key-population decision forgotten, so the label API is asked again.
        (Other cards are decided by the HIS's key_crowd column: a label lookup cannot change them.)"""
        now = utc(now)
        o = sync_outbox
        with self._engine.begin() as conn:
            n = conn.execute(
                sa.update(o)
                .where(
                    o.c.status == Status.SKIPPED.value, o.c.source_changed_at >= wall(changed_since),
                    o.c.card_type == RESIDENT_ID,
                )
                .values(
                    status=Status.PENDING.value, key_crowd=None, attempts=0, generic_failures=0,
                    first_failed_at=None, next_attempt_at=now, updated_at=now,
                )
            ).rowcount
        return int(n)
