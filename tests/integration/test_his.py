"""The HIS source against real databases: SQLite, MariaDB and PostgreSQL.

The schema is shaped like a hospital's: a settlement table joined to a patient
table, nothing named as the platform names it, and the hospital's query aliasing
its columns to the canonical names.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from structlog.testing import capture_logs

from sync.columns import Unreadable
from sync.errors import ConfigError, TransientError
from sync.his import HisSource, clock_sql, window_sql
from sync.settings import His

metadata = sa.MetaData()
patients = sa.Table(
    "gy_brxx",
    metadata,
    sa.Column("brid", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("xm", sa.String(50)),
    sa.Column("zjlx", sa.String(2)),
    sa.Column("zjhm", sa.String(40)),
)
settlements = sa.Table(
    "js_jsxx",
    metadata,
    sa.Column("jsid", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("jsh", sa.String(50), nullable=False),
    sa.Column("brid", sa.Integer, nullable=False),
    sa.Column("mzzyh", sa.String(50)),
    sa.Column("jzlx", sa.Integer),
    sa.Column("ryrq", sa.DateTime),
    sa.Column("cyrq", sa.DateTime, nullable=True),
    sa.Column("zdmc", sa.String(200)),
    sa.Column("zddm", sa.String(100)),
    sa.Column("zfy", sa.Numeric(10, 2)),
    sa.Column("ybzf", sa.Numeric(10, 2)),
    sa.Column("yjj", sa.Numeric(10, 2)),
    sa.Column("qfje", sa.Numeric(10, 2)),
    sa.Column("jssj", sa.DateTime),
    sa.Column("xgsj", sa.DateTime, nullable=False),
    sa.Column("zfbz", sa.Integer, nullable=False, server_default="0"),  # 1 = voided settlement
)
knobs = sa.Table("test_knob", metadata, sa.Column("delay", sa.Float, nullable=False))

SELECT_LIST = {
    "lsh": "js.jsh",
    "code": "js.mzzyh",
    "card_type": "br.zjlx",
    "card_no": "br.zjhm",
    "visit_type": "js.jzlx",
    "enter_date": "js.ryrq",
    "leave_date": "js.cyrq",
    "icd_name": "js.zdmc",
    "icd_code": "js.zddm",
    "total_fee": "js.zfy",
    "ins_fee": "js.ybzf",
    "total_prepayment": "js.yjj",
    "deficient_fee": "js.qfje",
    "settlement_date": "js.jssj",
    "changed_at": "js.xgsj",
}
FROM_WHERE = (
    "FROM js_jsxx js JOIN gy_brxx br ON br.brid = js.brid\n"
    "WHERE js.xgsj >= :since AND js.xgsj < :until AND js.zfbz = 0"
)


def his_query(select_list: dict[str, str] | None = None, *, where_extra: str = "") -> str:
    items = select_list if select_list is not None else SELECT_LIST
    columns = ",\n  ".join(f"{expr} AS {alias}" for alias, expr in items.items())
    return f"SELECT\n  {columns}\n{FROM_WHERE}{where_extra}"


def source(url: str, query: str | None = None, *, batch_size: int = 1000) -> HisSource:
    his = His(url=SecretStr(url), query=query or his_query(), batch_size=batch_size)
    return HisSource(his, need_key_crowd=False)


T0 = datetime(2024, 5, 20, 8, 0, 0)
PATIENTS = [
    {"brid": 1, "xm": "张三", "zjlx": "10", "zjhm": "510100198506020036"},
    {"brid": 2, "xm": "李𠀀", "zjlx": "10", "zjhm": "510100198506020132"},  # a 4-byte character
]


def settlement(jsid: int, changed_at: datetime, *, jsh: str | None = None, voided: bool = False) -> dict[str, Any]:
    return {
        "jsid": jsid,
        "jsh": jsh or f"JS{jsid:08d}",
        "brid": 1 + jsid % 2,
        "mzzyh": f"ZY{jsid:06d}",
        "jzlx": 1,
        "ryrq": changed_at - timedelta(days=5),
        "cyrq": changed_at - timedelta(hours=2),
        "zdmc": "社区获得性肺炎",
        "zddm": "J18.900",
        "zfy": Decimal("3456.78"),
        "ybzf": Decimal("2800.10"),
        "yjj": Decimal("0.00"),
        "qfje": Decimal("656.68"),
        "jssj": changed_at,
        "xgsj": changed_at,
        "zfbz": 1 if voided else 0,
    }


@pytest.fixture
def his_db(any_db_url: str) -> Iterator[tuple[str, sa.Engine]]:
    engine = sa.create_engine(any_db_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert(), PATIENTS)
    yield any_db_url, engine
    engine.dispose()


def insert(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(settlements.insert(), rows)


def test_the_window_returns_exactly_its_rows_in_cursor_order(his_db: tuple[str, sa.Engine]) -> None:
    url, engine = his_db
    since, until = T0, T0 + timedelta(hours=1)
    insert(
        engine,
        [
            settlement(1, since - timedelta(seconds=1)),  # before the window
            settlement(2, since),  # first instant: in
            settlement(3, since + timedelta(minutes=30)),
            settlement(4, since + timedelta(minutes=10)),
            settlement(5, until - timedelta(seconds=1)),  # last second: in
            settlement(6, until),  # the end is exclusive: next window
            settlement(7, since + timedelta(minutes=20), voided=True),  # the hospital's own filter
        ],
    )
    src = source(url)
    try:
        rows = list(src.rows(since, until))
    finally:
        src.dispose()

    assert [r["lsh"] for r in rows] == ["JS00000002", "JS00000004", "JS00000003", "JS00000005"]
    first = rows[0]
    assert first["changed_at"] == since
    assert first["changed_at"].tzinfo is None
    assert isinstance(first["lsh"], str)
    assert first["card_no"] == "510100198506020036"
    assert isinstance(first["total_fee"], Decimal)
    assert first["total_fee"] == Decimal("3456.78")
    assert first["deficient_fee"] == Decimal("656.68")
    assert first["icd_name"] == "社区获得性肺炎"
    assert first["leave_date"] == since - timedelta(hours=2)
    assert set(first) == set(SELECT_LIST)


def test_rows_sharing_one_changed_at_are_all_returned_ordered_by_lsh(his_db: tuple[str, sa.Engine]) -> None:
    url, engine = his_db
    same = T0 + timedelta(minutes=5)
    insert(engine, [settlement(i, same, jsh=jsh) for i, jsh in ((1, "C-3"), (2, "A-1"), (3, "B-2"))])
    src = source(url, batch_size=1)
    try:
        rows = list(src.rows(T0, T0 + timedelta(hours=1)))
    finally:
        src.dispose()
    assert [r["lsh"] for r in rows] == ["A-1", "B-2", "C-3"]


def test_upper_case_column_names_are_accepted(his_db: tuple[str, sa.Engine]) -> None:
    url, engine = his_db
    insert(engine, [settlement(1, T0 + timedelta(minutes=2)), settlement(2, T0 + timedelta(minutes=1))])
    # PostgreSQL folds unquoted names to lower case; quoting keeps them upper, as Oracle returns them.
    quote = '"' if engine.dialect.name == "postgresql" else ""
    upper = {f"{quote}{alias.upper()}{quote}": expr for alias, expr in SELECT_LIST.items()}
    src = source(url, his_query(upper))
    try:
        assert [c.lower() for c in src.check()] == list(SELECT_LIST)
        rows = list(src.rows(T0, T0 + timedelta(hours=1)))
    finally:
        src.dispose()
    assert [r["lsh"] for r in rows] == ["JS00000002", "JS00000001"]
    assert set(rows[0]) == set(SELECT_LIST)


def test_wrong_columns_fail_before_any_row_naming_each_column(his_db: tuple[str, sa.Engine]) -> None:
    url, engine = his_db
    insert(engine, [settlement(1, T0 + timedelta(minutes=1))])
    wrong = {k: v for k, v in SELECT_LIST.items() if k != "icd_code"} | {"patient_name": "br.xm"}
    src = source(url, his_query(wrong))
    try:
        with pytest.raises(ConfigError) as checked:
            src.check()
        rows = src.rows(T0, T0 + timedelta(hours=1))
        with pytest.raises(ConfigError) as streamed:
            next(rows)
    finally:
        src.dispose()
    for error in (checked.value, streamed.value):
        assert "icd_code" in str(error)
        assert "patient_name" in str(error)


def test_percent_signs_and_colons_in_the_query_are_the_hospitals_own(his_db: tuple[str, sa.Engine]) -> None:
    url, engine = his_db
    insert(engine, [settlement(1, T0 + timedelta(minutes=1)), settlement(2, T0 + timedelta(minutes=2))])
    with engine.begin() as conn:
        conn.execute(settlements.update().where(settlements.c.jsid == 2).values(zddm="K35.800"))
    # LIKE patterns and time literals must reach the database untouched by the driver's paramstyle.
    src = source(url, his_query(where_extra=" AND js.zddm LIKE 'J%' AND '10:30' <> ''"))
    try:
        assert [r["lsh"] for r in src.rows(T0, T0 + timedelta(hours=1))] == ["JS00000001"]
    finally:
        src.dispose()


def test_check_returns_the_columns_of_a_good_query(his_db: tuple[str, sa.Engine]) -> None:
    url, _engine = his_db
    src = source(url)
    try:
        assert src.check() == list(SELECT_LIST)
    finally:
        src.dispose()


def test_a_query_the_database_rejects_is_a_config_error_naming_the_database_error(
    his_db: tuple[str, sa.Engine],
) -> None:
    url, _engine = his_db
    src = source(url, his_query().replace("js_jsxx", "js_jsxx_typo"))
    try:
        with pytest.raises(ConfigError) as raised:
            src.check()
        with pytest.raises(ConfigError):
            next(src.rows(T0, T0 + timedelta(hours=1)))
    finally:
        src.dispose()
    assert "js_jsxx_typo" in str(raised.value)
    assert "his.query" in str(raised.value)


def test_now_is_the_database_utc_clock_in_his_timezone_whatever_the_server_zone(his_db: tuple[str, sa.Engine]) -> None:
    """The HIS clock is the database's UTC clock in his.timezone: a server left on UTC (or on
    any zone) while the HIS writes China time no longer puts the poll hours behind the data."""
    url, engine = his_db
    utc_sql = {
        "mysql": "SELECT UTC_TIMESTAMP(6)",
        "postgresql": "SELECT now() AT TIME ZONE 'UTC'",
        "sqlite": "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')",
    }[engine.dialect.name]
    if engine.dialect.name != "sqlite":
        # The session's own zone as far from China time as it gets; the HIS clock must not follow it.
        sep = "&" if "?" in url else "?"
        init = "init_command=SET time_zone%3D'-11:00'" if engine.dialect.name == "mysql" else "options=-c%20TimeZone%3DPacific/Pago_Pago"
        url = f"{url}{sep}{init}"
    his = His(url=SecretStr(url), query=his_query(), timezone="Asia/Shanghai")
    src = HisSource(his, need_key_crowd=False)
    try:
        reading = src.clock()
    finally:
        src.dispose()
    with engine.connect() as conn:
        reference = conn.exec_driver_sql(utc_sql).scalar_one()
    if isinstance(reference, str):
        reference = datetime.fromisoformat(reference)
    china = reference + timedelta(hours=8)
    assert reading.now.tzinfo is None and reading.zone == "Asia/Shanghai"
    assert abs(reading.now - china) < timedelta(seconds=5)
    assert abs(reading.offset_s) < 5  # the database and this host agree
    if engine.dialect.name != "sqlite":
        assert reading.server_offset_s is not None and abs(reading.server_offset_s + 19 * 3600) < 5


@pytest.fixture(params=["mariadb", "postgres"])
def server_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert(), PATIENTS)
    engine.dispose()
    return url


def test_ten_thousand_rows_stream_through_with_flat_memory(server_url: str) -> None:
    engine = sa.create_engine(server_url)
    insert(engine, [settlement(i, T0 + timedelta(seconds=i)) for i in range(10_000)])
    engine.dispose()
    src = source(server_url, batch_size=500)
    window = (T0, T0 + timedelta(days=1))
    try:
        list(src.rows(*window))  # warm up: connection, driver imports, statement caches

        tracemalloc.start()
        try:
            count, last = 0, None
            for row in src.rows(*window):
                assert last is None or row["changed_at"] > last
                last = row["changed_at"]
                count += 1
            _, streamed_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            held = list(src.rows(*window))
            _, held_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert count == len(held) == 10_000
        # A server-side cursor holds one batch at a time, not the window.
        assert streamed_peak < held_peak / 4, (streamed_peak, held_peak)

        # A caller that stops early does not pay for the rest, and the next poll is normal.
        started = time.monotonic()
        for _row in src.rows(*window):
            break
        assert time.monotonic() - started < 5
        assert sum(1 for _ in src.rows(*window)) == 10_000
    finally:
        src.dispose()


def test_the_his_session_refuses_writes(server_url: str) -> None:
    src = source(server_url)
    try:
        with src._engine.connect() as conn, pytest.raises(sa.exc.DBAPIError, match=r"(?i)read.only"):
            conn.exec_driver_sql("UPDATE js_jsxx SET zfbz = 1")
    finally:
        src.dispose()


def _kill_sessions(admin_url: str, database: str) -> int:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            mine = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
            ids = conn.execute(
                sa.text("SELECT id FROM information_schema.processlist WHERE db = :db AND id <> :me"),
                {"db": database, "me": mine},
            ).scalars().all()
            for session_id in ids:
                conn.exec_driver_sql(f"KILL CONNECTION {int(session_id)}")
            return len(ids)
    finally:
        admin.dispose()


def test_killed_idle_connections_do_not_break_the_next_poll(mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert(), PATIENTS)
    insert(engine, [settlement(1, T0 + timedelta(minutes=1))])
    engine.dispose()
    src = source(mariadb_url)
    try:
        assert len(list(src.rows(T0, T0 + timedelta(hours=1)))) == 1
        src.now()
        # What a DBA's KILL, a server restart or a firewall's idle cut does to the pool.
        assert _kill_sessions(mariadb_url, sa.make_url(mariadb_url).database or "") >= 1
        assert src.now().tzinfo is None
        assert len(list(src.rows(T0, T0 + timedelta(hours=1)))) == 1
    finally:
        src.dispose()


def test_a_connection_killed_mid_query_is_transient_and_the_next_poll_works(mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert(), PATIENTS)
        conn.execute(knobs.insert(), {"delay": 0.5})
    insert(engine, [settlement(i, T0 + timedelta(minutes=i)) for i in range(1, 5)])
    engine.dispose()  # only the source's sessions are left to kill
    # Each row costs `delay` seconds, so the query is still running when the DBA kills it.
    slow = his_query(where_extra=" AND SLEEP((SELECT delay FROM test_knob)) = 0")
    src = source(mariadb_url, slow)
    outcome: list[BaseException | int] = []

    def poll() -> None:
        try:
            outcome.append(len(list(src.rows(T0, T0 + timedelta(hours=1)))))
        except BaseException as exc:
            outcome.append(exc)

    try:
        worker = threading.Thread(target=poll)
        worker.start()
        time.sleep(0.7)
        assert _kill_sessions(mariadb_url, sa.make_url(mariadb_url).database or "") >= 1
        worker.join(timeout=20)
        assert not worker.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], TransientError), outcome[0]

        with engine.begin() as conn:
            conn.execute(knobs.update().values(delay=0))
        assert len(list(src.rows(T0, T0 + timedelta(hours=1)))) == 4
    finally:
        src.dispose()
        engine.dispose()


def test_an_unreachable_database_is_transient_and_hides_the_password() -> None:
    src = source("mysql+pymysql://reader:S3cret-HIS-pw@127.0.0.1:9/his")
    try:
        with pytest.raises(TransientError) as raised:
            src.check()
    finally:
        src.dispose()
    text = str(raised.value)
    assert "S3cret-HIS-pw" not in text
    assert "127.0.0.1:9" in text
    assert "firewall" in raised.value.hint


def test_rejected_credentials_are_a_config_error(mariadb_url: str) -> None:
    url = sa.make_url(mariadb_url).set(username="no_such_reader", password="Wr0ng-pw-123")
    src = source(url.render_as_string(hide_password=False))
    try:
        with pytest.raises(ConfigError) as raised:
            src.now()
    finally:
        src.dispose()
    assert "Wr0ng-pw-123" not in str(raised.value)
    assert "his.url" in raised.value.hint


def test_a_password_in_the_url_never_reaches_an_error(postgres_url: str) -> None:
    # Trust authentication ignores the password, so the connection works and the query fails.
    url = sa.make_url(postgres_url).set(password="Pg-S3cret-pw")
    src = source(url.render_as_string(hide_password=False), his_query().replace("js_jsxx", "missing_table"))
    try:
        with capture_logs() as logged, pytest.raises(ConfigError) as raised:
            src.check()
    finally:
        src.dispose()
    assert "missing_table" in str(raised.value)
    assert "Pg-S3cret-pw" not in str(raised.value)
    assert logged
    assert "Pg-S3cret-pw" not in repr(logged)
    assert "Pg-S3cret-pw" not in src.display_url


# -- databases without a server here: what can be checked without one ------------------


def test_oracle_thin_mode_engine_and_sql() -> None:
    src = source("oracle+oracledb://reader:pw@his-db:1521/?service_name=HIS")
    try:
        dialect = src._engine.dialect
        assert dialect.name == "oracle"
        ordered = str(window_sql(his_query(), dialect, order_by=["changed_at", "lsh"]).compile(dialect=dialect))
        assert ordered.rstrip().endswith(") q ORDER BY changed_at, lsh")
        assert " AS q" not in ordered.upper()
        assert ":since" in ordered
        assert ":until" in ordered
        probe = str(window_sql(his_query(), dialect).compile(dialect=dialect))
        assert probe.rstrip().endswith(") q WHERE 1 = 0")
        assert str(clock_sql(dialect).compile(dialect=dialect)) == "SELECT SYS_EXTRACT_UTC(SYSTIMESTAMP), SYSDATE FROM DUAL"
        # A quoted mixed-case alias keeps its quotes; a folded one stays bare.
        mixed = str(window_sql("SELECT 1", dialect, order_by=["Changed_At", "lsh"]).compile(dialect=dialect))
        assert 'ORDER BY "Changed_At", lsh' in mixed
    finally:
        src.dispose()


def test_sql_server_engine_and_sql() -> None:
    src = source("mssql+pymssql://reader:pw@his-db:1433/his")
    try:
        dialect = src._engine.dialect
        assert dialect.driver == "pymssql"
        ordered = str(window_sql(his_query(), dialect, order_by=["changed_at", "lsh"]).compile(dialect=dialect))
        assert ordered.rstrip().endswith(") q ORDER BY changed_at, lsh")
        assert "%(since)s" in ordered
        assert "%(until)s" in ordered
        assert str(clock_sql(dialect).compile(dialect=dialect)) == "SELECT SYSUTCDATETIME(), SYSDATETIME()"
    finally:
        src.dispose()


def test_cx_oracle_url_without_the_driver_says_what_to_install() -> None:
    with pytest.raises(ConfigError) as raised:
        source("oracle+cx_oracle://reader:pw@his-db:1521/?service_name=HIS")
    assert "oracle+oracledb://" in str(raised.value)
    assert "cx_Oracle" in str(raised.value)


def test_an_unknown_dialect_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dialect"):
        source("informix://reader:pw@his-db/his")


def test_a_value_the_driver_cannot_decode_is_isolated_to_its_row(postgres_sql_ascii_url: str) -> None:
    """A SQL_ASCII database returns a clerk's Latin-1 text as bytes psycopg2 cannot decode."""
    sql_ascii_url = postgres_sql_ascii_url
    engine = sa.create_engine(sql_ascii_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert(), [{**p, "xm": "Zhang"} for p in PATIENTS])
    rows = [settlement(i, T0 + timedelta(minutes=i)) for i in range(1, 8)]
    for r in rows:
        r["zdmc"] = "Pneumonia"
    insert(engine, rows)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE js_jsxx SET zdmc = E'Maladie de M\\xe9ni\\xe8re' WHERE jsid = 4")
    engine.dispose()
    src = source(sql_ascii_url, batch_size=100)
    try:
        got = list(src.rows(T0, T0 + timedelta(hours=1)))
    finally:
        src.dispose()
    assert [r["lsh"] for r in got] == [f"JS{i:08d}" for i in range(1, 8)]
    bad = got[3]
    assert isinstance(bad["icd_name"], Unreadable) and "UnicodeDecodeError" in bad["icd_name"].reason
    assert bad["total_fee"] == Decimal("3456.78") and bad["changed_at"] == T0 + timedelta(minutes=4)
    assert all(r["icd_name"] == "Pneumonia" for r in got if r is not bad)
