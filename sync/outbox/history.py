"""What people read from the outbox: each attempt at a visit, what is not sent, one
visit's whole row, and the pruning of old history.

``sync_attempt`` gets one row per outcome ``Store.record`` writes (an upload and the
platform's answer, a local validation, a key-population decision), inside the same
transaction, and one per crash. Its texts never hold an ID number in clear.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from sync.logs import redact
from sync.outbox.schema import sync_attempt, sync_label_cache, sync_outbox, sync_run, sync_timezone

# Columns of sync_outbox that `failures` lists.
_PROBLEM_COLUMNS = (
    "institution", "lsh", "status", "attempts", "last_error", "last_http_status", "last_answer", "visit_type", "card_type",
    "settlement_date", "source_changed_at", "first_failed_at", "next_attempt_at", "updated_at", "key_crowd",
)


def _text(value: Any, size: int | None = None) -> str | None:
    if value is None or not isinstance(value, str):
        return None
    masked = redact(value)
    return masked if size is None else masked[:size]


def attempt_row(
    lsh: str, values: Mapping[str, Any], *, kind: str | None = None, institution: str | None = None
) -> dict[str, Any]:
    """The ``sync_attempt`` row of one outcome, from the columns it sets on the outbox row
    (``status``, ``last_error``, ``last_http_status``, ``last_answer``, ``updated_at``).

    Its kind, unless given: an upload when the platform answered (an HTTP status, or sent);
    a decision when the visit was skipped; else a local check (validation, an undecided
    key population)."""
    status = str(values.get("status"))
    http_status = values.get("last_http_status")
    if kind is None:
        if status == "skipped":
            kind = "decision"
        elif http_status is not None or status == "sent":
            kind = "upload"
        else:
            kind = "check"
    return {
        "lsh": lsh,
        "institution": institution,
        "at": values.get("updated_at"),
        "kind": kind,
        "outcome": status,
        "http_status": http_status if isinstance(http_status, int) else None,
        "answer": _text(values.get("last_answer"), 200),
        "error": _text(values.get("last_error")),
    }


def attempt_rows(outcomes: Iterable[tuple[str, Mapping[str, Any], str | None]]) -> list[dict[str, Any]]:
    """``attempt_row`` of many (lsh, outcome columns, institution); each distinct text is masked once (a batch of
    visits skipped by the key_crowd column all share one reason)."""
    masked: dict[str, str | None] = {}

    def once(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        got = masked.get(text)
        if got is None:
            got = masked[text] = _text(text)
        return got

    rows = []
    for lsh, values, institution in outcomes:
        row = attempt_row(lsh, {**values, "last_error": None, "last_answer": None}, institution=institution)
        row["answer"] = _cut(once(values.get("last_answer")), 200)
        row["error"] = once(values.get("last_error"))
        rows.append(row)
    return rows


def _cut(text: str | None, size: int) -> str | None:
    return text if text is None else text[:size]


def insert_attempts(conn: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Written inside the transaction that records the outcomes: one statement for them all."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        # The driver's executemany loops in C; SQLAlchemy's would process every parameter of
        # every row in Python (a back-fill writes one row here per visit it skips).
        sql, stamp = _sqlite_insert(conn.dialect)
        conn.exec_driver_sql(sql, [
            (r["lsh"], r["institution"], stamp(r["at"]), r["kind"], r["outcome"], r["http_status"], r["answer"], r["error"]) for r in rows
        ])
        return
    conn.execute(sa.insert(sync_attempt), list(rows))


_ATTEMPT_COLUMNS = ("lsh", "institution", "at", "kind", "outcome", "http_status", "answer", "error")


@functools.cache
def _sqlite_insert(dialect: sa.Dialect) -> tuple[str, Callable[[Any], Any]]:
    compiled = sa.insert(sync_attempt).values({c: sa.bindparam(c) for c in _ATTEMPT_COLUMNS}).compile(dialect=dialect)
    assert list(compiled.positiontup or ()) == list(_ATTEMPT_COLUMNS), compiled.positiontup
    stamp = sync_attempt.c.at.type.dialect_impl(dialect).bind_processor(dialect) or (lambda value: value)
    return str(compiled), stamp


def attempts(conn: sa.Connection, lsh: str, institution: str | None = None) -> list[dict[str, Any]]:
    """Every attempt kept for ``lsh`` (of ``institution``, when given), oldest first."""
    a = sync_attempt
    query = sa.select(a.c.at, a.c.kind, a.c.outcome, a.c.http_status, a.c.answer, a.c.error).where(a.c.lsh == lsh)
    if institution is not None:
        query = query.where(a.c.institution == institution)
    rows = conn.execute(query.order_by(a.c.at, a.c.id))
    return [dict(r._mapping) for r in rows]


def problems(conn: sa.Connection, statuses: Sequence[str], *, since: datetime | None) -> list[dict[str, Any]]:
    """Rows in ``statuses`` (changed at or after ``since``, UTC), oldest change first."""
    o = sync_outbox
    query = sa.select(*(o.c[name] for name in _PROBLEM_COLUMNS)).where(o.c.status.in_(list(statuses)))
    if since is not None:
        query = query.where(o.c.updated_at >= since)
    return [dict(r._mapping) for r in conn.execute(query.order_by(o.c.updated_at, o.c.lsh))]


def visit(conn: sa.Connection, lsh: str, institution: str | None = None) -> dict[str, Any] | None:
    """The whole outbox row of ``lsh`` (of ``institution``, when given; else the first)."""
    query = sa.select(sync_outbox).where(sync_outbox.c.lsh == lsh)
    if institution is not None:
        query = query.where(sync_outbox.c.institution == institution)
    row = conn.execute(query.order_by(sync_outbox.c.institution)).first()
    return None if row is None else dict(row._mapping)


def label_cache(conn: sa.Connection, card_hash: str) -> dict[str, Any] | None:
    """The cached label codes of one person (by ``card_hash``), None when none are kept."""
    t = sync_label_cache
    row = conn.execute(sa.select(t.c.labels, t.c.key_crowd, t.c.fetched_at).where(t.c.card_hash == card_hash)).first()
    return None if row is None else dict(row._mapping)


def prune(conn: sa.Connection, *, now: datetime, keep_runs_days: int, keep_attempts_days: int) -> tuple[int, int]:
    """Delete runs and attempts older than their retention; the newest run always stays
    (``status`` shows it). Returns (runs, attempts) deleted."""
    r = sync_run
    newest = conn.execute(sa.select(sa.func.max(r.c.id))).scalar()
    runs = 0
    if newest is not None:
        runs = int(
            conn.execute(
                sa.delete(r).where(r.c.started_at < now - timedelta(days=keep_runs_days), r.c.id < newest)
            ).rowcount
        )
    gone = int(
        conn.execute(sa.delete(sync_attempt).where(sync_attempt.c.at < now - timedelta(days=keep_attempts_days))).rowcount
    )
    return runs, gone


def put_timezone(conn: sa.Connection, *, zone: str, offset_minutes: int, now: datetime) -> bool:
    """Keep ``sync_timezone`` equal to schedule.timezone; True when it changed."""
    t = sync_timezone
    row = conn.execute(sa.select(t.c.zone, t.c.utc_offset_minutes).where(t.c.id == 1)).first()
    if row is not None and (row.zone, row.utc_offset_minutes) == (zone, offset_minutes):
        return False
    values = {"zone": zone, "utc_offset_minutes": offset_minutes, "updated_at": now}
    if row is None:
        conn.execute(sa.insert(t).values(id=1, **values))
    else:
        conn.execute(sa.update(t).where(t.c.id == 1).values(values))
    return True
