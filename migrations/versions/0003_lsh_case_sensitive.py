"""sync_outbox.lsh and sync_cursor.lsh compared case-sensitively on every dialect.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

The platform's upsert key is case-sensitive: ``ZY001a`` and ``ZY001A`` are two visits.
MySQL/MariaDB's default collations (utf8mb4_general_ci, utf8mb4_unicode_ci,
utf8mb4_0900_ai_ci) and SQL Server's usual ones (Chinese_PRC_CI_AS,
SQL_Latin1_General_CP1_CI_AS) compare text case-insensitively: the second visit then
collides with the first on the primary key, every poll fails on it, and the visits
behind it are never enqueued. This revision gives both columns a binary collation:

- MySQL/MariaDB: ``VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin``;
- SQL Server: ``NVARCHAR(255) COLLATE Latin1_General_100_BIN2`` (NVARCHAR, so that the
  collation's code page never narrows what the column holds); the primary key is
  dropped and recreated around the change, as SQL Server requires;
- PostgreSQL and SQLite: nothing to do, their default collations are case-sensitive
  (deterministic);
- Oracle: nothing to do, VARCHAR2 compares in binary unless the schema was created
  with a case-insensitive DEFAULT_COLLATION (see docs/dba.md for the check).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mssql, mysql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OUTBOX_LSH = (
    "visit serial number, the platform's upsert key (the platform allows 50 characters; longer ones are kept "
    "to be reported invalid) / 就诊流水号"
)
CURSOR_LSH = "lsh of the last row read, to break ties / 已读取到的流水号"
MYSQL_KEY = mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin")
MSSQL_KEY = mssql.NVARCHAR(255, collation="Latin1_General_100_BIN2")


def _alter(key: sa.types.TypeEngine[str], old: sa.types.TypeEngine[str]) -> None:
    op.alter_column(
        "sync_outbox", "lsh", type_=key, existing_type=old, existing_nullable=False, existing_comment=OUTBOX_LSH
    )
    op.alter_column(
        "sync_cursor", "lsh", type_=key, existing_type=old, existing_nullable=True, existing_comment=CURSOR_LSH
    )


def upgrade() -> None:
    dialect = op.get_context().dialect.name
    if dialect in ("mysql", "mariadb"):
        _alter(MYSQL_KEY, sa.String(255))
    elif dialect == "mssql":
        op.drop_constraint("pk_sync_outbox", "sync_outbox", type_="primary")
        _alter(MSSQL_KEY, sa.String(255))
        op.create_primary_key("pk_sync_outbox", "sync_outbox", ["lsh"])


def downgrade() -> None:
    dialect = op.get_context().dialect.name
    if dialect in ("mysql", "mariadb"):
        _alter(sa.String(255), MYSQL_KEY)
    elif dialect == "mssql":
        op.drop_constraint("pk_sync_outbox", "sync_outbox", type_="primary")
        _alter(sa.String(255), MSSQL_KEY)
        op.create_primary_key("pk_sync_outbox", "sync_outbox", ["lsh"])
