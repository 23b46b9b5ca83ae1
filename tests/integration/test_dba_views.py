"""The DBA views (migration 0002) on real SQLite, MariaDB and PostgreSQL, and rendered for Oracle and SQL Server."""

from __future__ import annotations

import io
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import migrations
from sync.outbox.migrate import current_revision, render_offline
from sync.outbox.schema import sync_outbox
from sync.outbox.store import Store

VIEWS = ("sync_problem_records", "sync_daily_counts", "sync_pending_age")
# Outbox times are UTC; the daily counts are by the day of schedule.timezone (China, +08:00).
DAY1 = datetime(2026, 10, 30, 15, 59, 59, 999000)  # the last millisecond of a Beijing day...
DAY2 = datetime(2026, 10, 30, 16, 0, 0)  # ...and the first of the next (still 10-30 in UTC)


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def _row(lsh: str, status: str, updated_at: datetime, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "lsh": lsh, "status": status, "payload": "{}", "payload_hash": lsh, "card_no": "510100198506020036",
        "visit_type": "1", "settlement_date": date(2026, 10, 30), "attempts": 0, "generic_failures": 0,
        "first_seen_at": updated_at, "updated_at": updated_at, "sent_at": None, "first_failed_at": None,
        "next_attempt_at": None, "last_error": None, "last_http_status": None,
    }
    row.update(over)
    return row


def _alembic(conn: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["connection"] = conn
    return cfg


def _day(value: Any) -> str:
    """A view's day as text: SQLite hands back 'YYYY-MM-DD', the servers a date (Oracle: a datetime)."""
    return value[:10] if isinstance(value, str) else value.strftime("%Y-%m-%d")


def test_views_show_problems_daily_counts_and_waiting_time(store: Store) -> None:
    now = _utcnow()
    rows = [
        _row("S1", "sent", DAY1, sent_at=DAY1),
        _row("S2", "sent", DAY1, sent_at=DAY1),
        _row("S3", "sent", DAY2, sent_at=DAY2),
        _row("K1", "skipped", DAY2, last_error="label API: not in the key population"),
        _row("I1", "invalid", DAY2, attempts=1, last_http_status=200, last_error="参数校验错误：证件类型不能为空！"),
        _row("X1", "dead", DAY1, attempts=40, last_http_status=504, last_error="504 Gateway Time-out"),
        # waiting since its first failure, 90 minutes ago (its last change was 10 minutes ago)
        _row("F1", "failed", now - timedelta(minutes=10), attempts=3, last_http_status=504,
             first_failed_at=now - timedelta(minutes=90), next_attempt_at=now + timedelta(minutes=5),
             last_error="504 Gateway Time-out"),
        # waiting since it was enqueued, 30 minutes ago
        _row("P1", "pending", now - timedelta(minutes=30), next_attempt_at=now - timedelta(minutes=30)),
    ]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(sync_outbox), rows)

    with store.engine.connect() as conn:
        problems = {r.lsh: r for r in conn.execute(sa.text("SELECT * FROM sync_problem_records"))}
        daily = Counter(
            {(_day(r.local_day), r.status): int(r.records) for r in conn.execute(sa.text("SELECT * FROM sync_daily_counts"))}
        )
        waiting = {
            r.lsh: r for r in conn.execute(sa.text("SELECT * FROM sync_pending_age"))
        }
        view_columns = {v: set(conn.execute(sa.text(f"SELECT * FROM {v}")).keys()) for v in VIEWS}

    assert set(problems) == {"F1", "I1", "X1"}
    assert problems["I1"].last_error == "参数校验错误：证件类型不能为空！"  # Chinese survives
    assert (problems["X1"].status, problems["X1"].attempts, problems["X1"].last_http_status) == ("dead", 40, 504)

    expected = Counter(((r["updated_at"] + timedelta(hours=8)).strftime("%Y-%m-%d"), r["status"]) for r in rows)
    assert daily == expected
    assert daily[("2026-10-30", "sent")] == 2 and daily[("2026-10-31", "sent")] == 1

    assert set(waiting) == {"F1", "P1"}
    # Measured against the database's UTC clock; a loaded machine may add a minute or two.
    assert 89 <= int(waiting["F1"].waiting_minutes) <= 95
    assert 29 <= int(waiting["P1"].waiting_minutes) <= 35

    # Granting the views exposes no ID number and no payload.
    for view, columns in view_columns.items():
        assert not columns & {"card_no", "payload"}, view


def test_daily_counts_follow_the_zone_crowd_sync_keeps(store: Store) -> None:
    """07:30 in Beijing is 23:30 UTC the day before: it counts for its Beijing day, and a
    schedule.timezone of UTC (kept in sync_timezone) moves it back."""
    morning = datetime(2026, 10, 30, 23, 30)  # 2026-10-31 07:30 in Beijing
    with store.engine.begin() as conn:
        conn.execute(sa.insert(sync_outbox), [_row("M1", "sent", morning, sent_at=morning)])

    def days() -> list[tuple[str, str, int]]:
        with store.engine.connect() as conn:
            return [(_day(r.local_day), r.status, int(r.records))
                    for r in conn.execute(sa.text("SELECT * FROM sync_daily_counts"))]

    assert days() == [("2026-10-31", "sent", 1)]  # the migration starts at Asia/Shanghai, +480
    assert store.put_timezone("UTC", offset_minutes=0, now=_utcnow())
    assert days() == [("2026-10-30", "sent", 1)]
    assert store.put_timezone("Asia/Shanghai", offset_minutes=480, now=_utcnow())
    assert not store.put_timezone("Asia/Shanghai", offset_minutes=480, now=_utcnow())  # unchanged: no write
    assert days() == [("2026-10-31", "sent", 1)]


def test_downgrade_drops_the_views_and_upgrade_brings_them_back(store: Store) -> None:
    with store.engine.begin() as conn:
        command.downgrade(_alembic(conn), "0001")
    inspector = sa.inspect(store.engine)
    assert set(inspector.get_view_names()) & set(VIEWS) == set()
    assert inspector.has_table("sync_outbox")
    assert current_revision(store.engine) == "0001"

    with store.engine.begin() as conn:
        command.upgrade(_alembic(conn), "head")
    assert set(VIEWS) <= set(sa.inspect(store.engine).get_view_names())


@pytest.mark.parametrize(
    ("url", "day", "clock"),
    [
        ("oracle+oracledb://", "TRUNC(updated_at)", "SYS_EXTRACT_UTC(SYSTIMESTAMP)"),
        ("mssql+pymssql://", "CAST(updated_at AS DATE)", "SYSUTCDATETIME()"),
    ],
)
def test_offline_ddl_creates_the_views_for_oracle_and_sql_server(url: str, day: str, clock: str) -> None:
    sql = render_offline(url)
    for view in VIEWS:
        assert f"CREATE VIEW {view} AS" in sql
    assert f"GROUP BY {day}, status" in sql
    assert clock in sql
    # Since 0006 the daily counts are by local day, the offset read from sync_timezone.
    assert "FROM sync_outbox o JOIN sync_timezone z ON z.id = 1" in sql
    # The views come after the tables they read, and the version moves to 0002 after them.
    assert sql.index("CREATE TABLE sync_outbox") < sql.index("CREATE VIEW sync_problem_records")
    assert sql.index("CREATE VIEW sync_pending_age") < sql.index("version_num='0002'")


@pytest.mark.parametrize("url", ["oracle+oracledb://", "mssql+pymssql://"])
def test_offline_downgrade_drops_the_views(url: str) -> None:
    buf = io.StringIO()
    cfg = Config(output_buffer=buf)
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = url
    command.downgrade(cfg, "0002:0001", sql=True)
    for view in VIEWS:
        assert f"DROP VIEW {view}" in buf.getvalue()


@pytest.mark.parametrize(("db", "tag"), [("mariadb", "sql mysql"), ("postgres", "sql postgresql")])
def test_the_guides_month_query_gives_the_report_figures_on_servers(
    db: str, tag: str, request: pytest.FixtureRequest
) -> None:
    from sync.report import month_report
    from tests.unit.test_report import OCTOBER, _seed, guide_statements

    (sql,) = guide_statements(tag)
    s = Store(request.getfixturevalue(f"{db}_url"))
    try:
        s.migrate()
        _seed(s)
        with s.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql).all()
        r = month_report(s, OCTOBER)
    finally:
        s.dispose()
    assert [(str(t), int(n), int(z), int(w), fee, ins, owed) for t, n, z, w, fee, ins, owed in rows] == [
        (t, u.visits, u.zero_deposit, u.with_deposit, u.total_fee, u.ins_fee, u.deficient_fee)
        for t, u in sorted(r.uploaded.items()) if u.visits
    ]
