"""Views for the DBA: sync_problem_records, sync_daily_counts, sync_pending_age.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Plain ``CREATE VIEW name AS SELECT ...`` that SQLite, MySQL/MariaDB, PostgreSQL,
Oracle and SQL Server all accept. Only two things differ per dialect, and are
branched on below: truncating a timestamp to its day, and the current UTC time
(outbox times are naive UTC, so the age of a row is measured against UTC, not
the server's local clock).

No view shows ``card_no`` or ``payload``: a monitoring account can be granted
the views without being able to read ID numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ("sync_problem_records", "sync_daily_counts", "sync_pending_age")


def _day(column: str, dialect: str) -> str:
    """The UTC day of a naive-UTC timestamp column, as a DATE (text 'YYYY-MM-DD' on SQLite)."""
    if dialect == "sqlite":
        # SQLite's CAST(... AS DATE) yields the number 2026; date() reads SQLAlchemy's text timestamps.
        return f"date({column})"
    if dialect == "oracle":
        # Oracle's CAST(timestamp AS DATE) keeps the time of day; TRUNC drops it.
        return f"TRUNC({column})"
    return f"CAST({column} AS DATE)"


def _minutes_since(column: str, dialect: str) -> str:
    """Whole minutes from a naive-UTC timestamp column to now (UTC)."""
    if dialect == "sqlite":
        return f"CAST((julianday('now') - julianday({column})) * 1440 AS INTEGER)"
    if dialect in ("mysql", "mariadb"):
        return f"TIMESTAMPDIFF(MINUTE, {column}, UTC_TIMESTAMP())"
    if dialect == "postgresql":
        return f"CAST(FLOOR(EXTRACT(EPOCH FROM ((now() AT TIME ZONE 'UTC') - {column})) / 60) AS INTEGER)"
    if dialect == "oracle":
        # DATE minus DATE is days (a number); TIMESTAMP minus TIMESTAMP would be an INTERVAL.
        return f"FLOOR((CAST(SYS_EXTRACT_UTC(SYSTIMESTAMP) AS DATE) - CAST({column} AS DATE)) * 1440)"
    if dialect == "mssql":
        return f"DATEDIFF(MINUTE, {column}, SYSUTCDATETIME())"
    raise NotImplementedError(f"sync_pending_age: no UTC clock expression for the {dialect} dialect")


def upgrade() -> None:
    # The migration context knows the dialect both online and offline (--sql),
    # where there is no connection to ask.
    dialect = op.get_context().dialect.name
    waiting_since = "COALESCE(first_failed_at, updated_at)"

    # What needs a look: one row per record that is failed, invalid or dead.
    op.execute(
        "CREATE VIEW sync_problem_records AS\n"
        "SELECT lsh, status, attempts, generic_failures, last_http_status, last_error, last_answer,\n"
        "       visit_type, settlement_date, first_failed_at, next_attempt_at, updated_at\n"
        "FROM sync_outbox\n"
        "WHERE status IN ('failed', 'invalid', 'dead')"
    )
    # How many rows reached each status on each UTC day (the day of updated_at,
    # which is the moment the row took its current status).
    day = _day("updated_at", dialect)
    op.execute(
        "CREATE VIEW sync_daily_counts AS\n"
        f"SELECT {day} AS utc_day, status, COUNT(*) AS records\n"
        "FROM sync_outbox\n"
        f"GROUP BY {day}, status"
    )
    # What waits to be sent and for how long, measured like `crowd-sync status`:
    # since the first transient failure if it failed, else since its last change.
    op.execute(
        "CREATE VIEW sync_pending_age AS\n"
        "SELECT lsh, status, attempts, next_attempt_at, lease_owner, lease_until, last_error,\n"
        f"       {waiting_since} AS waiting_since,\n"
        f"       {_minutes_since(waiting_since, dialect)} AS waiting_minutes\n"
        "FROM sync_outbox\n"
        "WHERE status IN ('pending', 'failed')"
    )


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW {name}")
