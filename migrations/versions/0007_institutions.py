"""Several institutions in one outbox (a county medical alliance, 医共体): the key is (institution, lsh).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

``lsh`` is unique only within one institution (the document: "此字段只能保证院内唯一"), so
two members of an alliance sharing one HIS may have equal ones. This revision:

- adds ``institution`` to ``sync_outbox`` (the code of the visit's institution,
  ``institutions[].code``) and makes the primary key ``(institution, lsh)``; ``lsh``
  keeps an index of its own (``crowd-sync show LSH``);
- adds ``institution`` to ``sync_attempt`` and ``sync_token`` (one login token per
  institution: each has its own account);
- names the per-institution rows of ``sync_state`` (``config_error``, ``app_key_form``)
  after their institution (``config_error:CODE``);
- recreates the DBA views with the ``institution`` column.

Existing rows get the code of the institution the outbox served: ``crowd-sync migrate``
passes the first institution of the settings (``institution.code``, or ``default``
when the single-institution form names none). Nothing is sent again: every row keeps its
status and payload hash. Offline (``--sql``) the code is ``default`` unless one is given.

SQLite cannot change a primary key in place: the table is copied (Alembic's batch mode)
with the views dropped around the copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CODE = sa.String(40)
OUTBOX_COMMENT = "code of the visit's institution (institutions[].code; lsh is unique only within one) / 机构编码"
VIEWS = ("sync_problem_records", "sync_daily_counts", "sync_pending_age")
PER_INSTITUTION_STATE = ("config_error", "app_key_form")


def _code() -> str:
    code = context.config.attributes.get("institution") or "default"
    return str(code).replace("'", "''")


def _minutes_since(column: str, dialect: str) -> str:
    """As migration 0002 (whole minutes from a naive-UTC timestamp column to now, UTC)."""
    if dialect == "sqlite":
        return f"CAST((julianday('now') - julianday({column})) * 1440 AS INTEGER)"
    if dialect in ("mysql", "mariadb"):
        return f"TIMESTAMPDIFF(MINUTE, {column}, UTC_TIMESTAMP())"
    if dialect == "postgresql":
        return f"CAST(FLOOR(EXTRACT(EPOCH FROM ((now() AT TIME ZONE 'UTC') - {column})) / 60) AS INTEGER)"
    if dialect == "oracle":
        return f"FLOOR((CAST(SYS_EXTRACT_UTC(SYSTIMESTAMP) AS DATE) - CAST({column} AS DATE)) * 1440)"
    if dialect == "mssql":
        return f"DATEDIFF(MINUTE, {column}, SYSUTCDATETIME())"
    raise NotImplementedError(f"sync_pending_age: no UTC clock expression for the {dialect} dialect")


def _local_day(column: str, minutes: str, dialect: str) -> str:
    """As migration 0006."""
    if dialect == "sqlite":
        return f"date({column}, {minutes} || ' minutes')"
    if dialect in ("mysql", "mariadb"):
        return f"CAST(DATE_ADD({column}, INTERVAL {minutes} MINUTE) AS DATE)"
    if dialect == "postgresql":
        return f"CAST({column} + {minutes} * INTERVAL '1 minute' AS DATE)"
    if dialect == "oracle":
        return f"TRUNC(CAST({column} AS DATE) + {minutes} / 1440)"
    if dialect == "mssql":
        return f"CAST(DATEADD(MINUTE, {minutes}, {column}) AS DATE)"
    raise NotImplementedError(f"sync_daily_counts: no date arithmetic for the {dialect} dialect")


def _create_views(dialect: str, *, with_institution: bool) -> None:
    inst = "institution, " if with_institution else ""
    op.execute(
        "CREATE VIEW sync_problem_records AS\n"
        f"SELECT {inst}lsh, status, attempts, generic_failures, last_http_status, last_error, last_answer,\n"
        "       visit_type, settlement_date, first_failed_at, next_attempt_at, updated_at\n"
        "FROM sync_outbox\n"
        "WHERE status IN ('failed', 'invalid', 'dead')"
    )
    day = _local_day("o.updated_at", "z.utc_offset_minutes", dialect)
    o_inst = "o.institution AS institution, " if with_institution else ""
    g_inst = "o.institution, " if with_institution else ""
    op.execute(
        "CREATE VIEW sync_daily_counts AS\n"
        f"SELECT {day} AS local_day, {o_inst}o.status AS status, COUNT(*) AS records\n"
        "FROM sync_outbox o JOIN sync_timezone z ON z.id = 1\n"
        f"GROUP BY {day}, {g_inst}o.status"
    )
    waiting_since = "COALESCE(first_failed_at, updated_at)"
    op.execute(
        "CREATE VIEW sync_pending_age AS\n"
        f"SELECT {inst}lsh, status, attempts, next_attempt_at, lease_owner, lease_until, last_error,\n"
        f"       {waiting_since} AS waiting_since,\n"
        f"       {_minutes_since(waiting_since, dialect)} AS waiting_minutes\n"
        "FROM sync_outbox\n"
        "WHERE status IN ('pending', 'failed')"
    )


def _drop_views() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW {name}")


def upgrade() -> None:
    dialect = op.get_context().dialect.name
    code = _code()
    _drop_views()
    # Added with the code as its default, so that every existing row gets it; the default is
    # dropped afterwards: crowd-sync always names the institution.
    column = sa.Column("institution", CODE, nullable=False, server_default=sa.text(f"'{code}'"),
                       comment=OUTBOX_COMMENT)
    if dialect == "sqlite":
        with op.batch_alter_table("sync_outbox", recreate="always") as batch:
            batch.add_column(column)
            batch.drop_constraint("pk_sync_outbox", type_="primary")
            batch.create_primary_key("pk_sync_outbox", ["institution", "lsh"])
        with op.batch_alter_table("sync_outbox", recreate="always") as batch:
            batch.alter_column("institution", existing_type=CODE, existing_nullable=False, server_default=None)
    else:
        op.add_column("sync_outbox", column)
        op.alter_column("sync_outbox", "institution", existing_type=CODE, existing_nullable=False,
                        server_default=None, existing_comment=OUTBOX_COMMENT)
        op.drop_constraint("pk_sync_outbox", "sync_outbox", type_="primary")
        op.create_primary_key("pk_sync_outbox", "sync_outbox", ["institution", "lsh"])
    op.create_index("ix_sync_outbox_lsh", "sync_outbox", ["lsh"])
    op.create_index("ix_sync_outbox_institution_status", "sync_outbox", ["institution", "status"])
    _create_views(dialect, with_institution=True)

    op.add_column("sync_attempt", sa.Column("institution", CODE, nullable=True,
                                            comment="code of the visit's institution / 机构编码"))
    op.execute(f"UPDATE sync_attempt SET institution = '{code}'")
    op.add_column("sync_token", sa.Column("institution", CODE, nullable=True,
                                          comment="whose token: each institution logs in with its own account / 机构编码"))
    op.execute(f"UPDATE sync_token SET institution = '{code}' WHERE id = 1")
    for name in PER_INSTITUTION_STATE:
        op.execute(f"UPDATE sync_state SET name = '{name}:{code}' WHERE name = '{name}'")


def downgrade() -> None:
    dialect = op.get_context().dialect.name
    code = _code()
    for name in PER_INSTITUTION_STATE:
        op.execute(f"UPDATE sync_state SET name = '{name}' WHERE name = '{name}:{code}'")
    op.execute("DELETE FROM sync_token WHERE id <> 1")
    op.drop_column("sync_token", "institution")
    op.drop_column("sync_attempt", "institution")
    _drop_views()
    op.drop_index("ix_sync_outbox_institution_status", "sync_outbox")
    op.drop_index("ix_sync_outbox_lsh", "sync_outbox")
    # Only one institution's rows fit the old key.
    op.execute(f"DELETE FROM sync_outbox WHERE institution <> '{code}'")
    if dialect == "sqlite":
        with op.batch_alter_table("sync_outbox", recreate="always") as batch:
            batch.drop_constraint("pk_sync_outbox", type_="primary")
            batch.create_primary_key("pk_sync_outbox", ["lsh"])
            batch.drop_column("institution")
    else:
        op.drop_constraint("pk_sync_outbox", "sync_outbox", type_="primary")
        op.create_primary_key("pk_sync_outbox", "sync_outbox", ["lsh"])
        op.drop_column("sync_outbox", "institution")
    _create_views(dialect, with_institution=False)
