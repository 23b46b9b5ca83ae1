"""sync_attempt (each attempt of a visit), sync_timezone, and the daily counts by local day.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

- ``sync_attempt``: one row per attempt at a visit (an upload and the platform's answer,
  a local validation, a key-population decision, a crash), written in the same
  transaction as the outcome it led to; `crowd-sync show LSH` tells a visit's story from
  it. No ID number is kept in it. Rows older than ``outbox.keep_attempts_days`` are
  pruned by the service.
- ``sync_timezone``: one row, the zone people read times in (``schedule.timezone``) and
  its offset from UTC in minutes. crowd-sync keeps it up to date whenever it runs; it
  starts as Asia/Shanghai (+480), the setting's default.
- ``sync_daily_counts`` groups by the local day of that zone (column ``local_day``)
  instead of the UTC day: in China a record sent at 07:30 counts for that day, not the
  day before. The view reads the offset from ``sync_timezone``: a fixed offset, which is
  exact for zones without daylight saving time (all of China).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mssql, mysql, oracle

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = (
    sa.DateTime()
    .with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    .with_variant(oracle.TIMESTAMP(), "oracle")
    .with_variant(mssql.DATETIME2, "mssql")
)
Key = (
    sa.String(255)
    .with_variant(mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")
    .with_variant(mssql.NVARCHAR(255, collation="Latin1_General_100_BIN2"), "mssql")
)


def local_day(column: str, minutes: str, dialect: str) -> str:
    """The day of a naive-UTC timestamp column shifted by ``minutes`` (a column), as a DATE."""
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


def _utc_day(column: str, dialect: str) -> str:
    """As migration 0002 wrote it (for the downgrade)."""
    if dialect == "sqlite":
        return f"date({column})"
    if dialect == "oracle":
        return f"TRUNC({column})"
    return f"CAST({column} AS DATE)"


def upgrade() -> None:
    op.create_table(
        "sync_attempt",
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True, comment="attempt number / 编号"),
        sa.Column("lsh", Key, nullable=False, comment="visit serial number (sync_outbox.lsh) / 就诊流水号"),
        sa.Column("at", Timestamp, nullable=False, comment="UTC, when the attempt ended / 时间(UTC)"),
        sa.Column("kind", sa.String(16), nullable=False,
                  comment="upload (a request to the platform) | check (local validation) | decision "
                  "(key population) | crash / 类型"),
        sa.Column("outcome", sa.String(16), nullable=False,
                  comment="the status the visit took: sent | failed | invalid | dead | skipped / 结果"),
        sa.Column("http_status", sa.Integer, nullable=True, comment="HTTP status of the platform's answer / HTTP状态码"),
        sa.Column("answer", sa.Unicode(200), nullable=True,
                  comment="what the platform answered (新增成功 / 修改成功) / 平台应答"),
        sa.Column("error", sa.UnicodeText, nullable=True,
                  comment="why it failed, was refused or skipped; ID numbers masked / 错误"),
        sa.Index("ix_sync_attempt_lsh_at", "lsh", "at"),
        sa.Index("ix_sync_attempt_at", "at"),
        comment="each attempt at each visit: uploads and the platform's answers, local checks, decisions / 上传尝试记录",
    )
    timezone = op.create_table(
        "sync_timezone",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False, comment="always 1 / 固定为1"),
        sa.Column("zone", sa.String(64), nullable=False, comment="schedule.timezone / 时区"),
        sa.Column("utc_offset_minutes", sa.Integer, nullable=False,
                  comment="the zone's offset from UTC in minutes (480 = UTC+8) / 与UTC相差分钟数"),
        sa.Column("updated_at", Timestamp, nullable=True, comment="UTC, last change / 更新时间(UTC)"),
        comment="the zone people read times in; the DBA views count days in it / 本地时区",
    )
    op.bulk_insert(timezone, [{"id": 1, "zone": "Asia/Shanghai", "utc_offset_minutes": 480}])

    dialect = op.get_context().dialect.name
    day = local_day("o.updated_at", "z.utc_offset_minutes", dialect)
    op.execute("DROP VIEW sync_daily_counts")
    # How many rows reached each status on each local day (schedule.timezone's day of
    # updated_at, the moment the row took its current status).
    op.execute(
        "CREATE VIEW sync_daily_counts AS\n"
        f"SELECT {day} AS local_day, o.status AS status, COUNT(*) AS records\n"
        "FROM sync_outbox o JOIN sync_timezone z ON z.id = 1\n"
        f"GROUP BY {day}, o.status"
    )


def downgrade() -> None:
    dialect = op.get_context().dialect.name
    op.execute("DROP VIEW sync_daily_counts")
    day = _utc_day("updated_at", dialect)
    op.execute(
        "CREATE VIEW sync_daily_counts AS\n"
        f"SELECT {day} AS utc_day, status, COUNT(*) AS records\n"
        "FROM sync_outbox\n"
        f"GROUP BY {day}, status"
    )
    op.drop_table("sync_timezone")
    op.drop_table("sync_attempt")
