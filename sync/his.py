"""Run the hospital's own query over a time window and stream canonical rows.

``his.query`` is the hospital's SELECT with ``:since`` and ``:until``; it returns the
canonical columns of the product contract under any letter case. It is run wrapped
as ``SELECT * FROM (<query>) q ORDER BY changed_at, lsh`` so that the caller can
advance its cursor batch by batch, through a server-side cursor so that memory
stays flat however large the window.

The HIS is somebody else's production database: connections are few, read-only
where the database makes that cheap, and a connection the network or the DBA cut
is dropped from the pool so that the next poll works without anyone stepping in.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import URL, Connection, Dialect, Engine, make_url

from sync import dberrors, hisconv
from sync.clock import MAX_OFFSET_S, DataProbe, HisClock
from sync.columns import Unreadable, check_columns
from sync.errors import ConfigError, TransientError
from sync.logs import redact, register_secret
from sync.settings import His, Schedule
from sync.settings import zone as tz_of
from sync.sqltext import escape_literal_colons

log = structlog.get_logger(__name__)

# A window that holds no rows: used to learn the query's columns without reading any.
_EMPTY_AT = datetime(2000, 1, 1)
# Long enough for a heavy window query on a busy HIS; a hung socket still ends.
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 600
# Columns whose values the cursor and the date rules need as date/datetime, even
# where the HIS keeps them as text (common) or the driver has no date type (SQLite).
_DATE_COLUMNS = frozenset({"changed_at", "enter_date", "leave_date", "settlement_date"})
_MONEY_COLUMNS = frozenset({"total_fee", "ins_fee", "total_prepayment", "deficient_fee"})
_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?$")

# DisconnectionError is the pool's own signal of a dead connection; sync.dberrors classifies both.
_DB_ERRORS = dberrors.DB_ERRORS
# What a driver raises on one row it cannot read: its own error (SQLite: "Could not decode
# to UTF-8 column"), or Python's while converting a value (psycopg2 decoding a SQL_ASCII
# database's bytes, a date beyond year 9999).
_READ_ERRORS = (*_DB_ERRORS, UnicodeDecodeError, ValueError, OverflowError)
# Rows read around one by one in a window (a query of a few statements each) before the
# window is given up: that many unreadable rows say his.query itself is at fault.
MAX_UNREADABLE_ROWS = 50

_QUERY_HINT = (
    "把 :since 和 :until 填上后在 HIS 上手工运行 his.query，并去掉末尾的 ORDER BY 或 LIMIT / "
    "his.query runs as SELECT * FROM (<his.query>) q ORDER BY changed_at, lsh; run it by hand against the HIS "
    "with :since and :until filled in, and leave out a final ORDER BY or LIMIT (SQL Server and Oracle also "
    "refuse a leading WITH inside a subquery: use a derived table instead)"
)


def polling_window(
    cursor_at: datetime | None,
    *,
    db_now: datetime,
    start_from: datetime,
    lookback_s: int,
    settle_delay_s: int,
) -> tuple[datetime, datetime] | None:
    """The ``[since, until)`` window of the next poll, or None when there is nothing to read yet.

    Each poll re-reads ``lookback_s`` behind the cursor because rows may commit
    with a ``changed_at`` older than rows already seen; rows younger than
    ``settle_delay_s`` by the HIS's own clock are left for the next poll because
    their transaction may still be open.
    """
    since = cursor_at - timedelta(seconds=lookback_s) if cursor_at is not None else start_from
    until = db_now - timedelta(seconds=settle_delay_s)
    if until <= since:
        return None
    return since, until


def clock_sql(dialect: Dialect) -> sa.TextClause:
    """The database's UTC clock and its session's own local time, in one statement.

    The UTC clock is what polling uses (in his.timezone): it does not depend on the server's
    time_zone, which is UTC on many installs while the HIS writes China time. The local time
    is only compared, to tell an operator what the server's time_zone is.
    """
    name = dialect.name
    if name in ("mysql", "mariadb"):
        text = "SELECT UTC_TIMESTAMP(6), NOW(6)"
    elif name == "postgresql":
        # clock_timestamp(), not now(): the time of the statement, not of the transaction's start.
        text = "SELECT clock_timestamp() AT TIME ZONE 'UTC', CAST(clock_timestamp() AS timestamp)"
    elif name == "oracle":
        # SYSDATE is the server OS's local time, what HIS triggers and defaults write into DATE columns.
        text = "SELECT SYS_EXTRACT_UTC(SYSTIMESTAMP), SYSDATE FROM DUAL"
    elif name == "mssql":
        text = "SELECT SYSUTCDATETIME(), SYSDATETIME()"
    elif name == "sqlite":
        text = "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now'), strftime('%Y-%m-%d %H:%M:%f', 'now', 'localtime')"
    else:
        text = "SELECT NULL, CURRENT_TIMESTAMP"  # no known UTC clock: the local one stands for the HIS clock
    return sa.text(text)


def window_sql(
    query: str,
    dialect: Dialect,
    *,
    order_by: Sequence[str] | None = None,
    after: bool = False,
    select: Sequence[str] | None = None,
    at_key: bool = False,
) -> sa.TextClause:
    """The hospital's query wrapped for one window.

    With ``order_by`` (the actual column names, as the result keys spell them: the
    cursor's ``changed_at, lsh``) the rows come back in cursor order; without it the
    statement reads no rows at all and only reveals the column names. The derived table
    has no ``AS`` before its alias because Oracle rejects one.

    Used to read around a row the driver cannot read: ``after`` keeps only the rows after
    the key ``(:cs_after_at, :cs_after_lsh)`` in cursor order (compared by the database,
    with its own collation, as its ORDER BY sorts); ``select`` names the columns to read
    instead of all; ``at_key`` keeps only the row at ``(:cs_key_at, :cs_key_lsh)``.
    """
    # A `:word` inside a string literal or a comment of the hospital's query is text, not a parameter.
    inner = escape_literal_colons(query.strip().rstrip(";").strip(), dialect.name)
    # Quoted only when needed: an Oracle key `lsh` stands for the folded LSH and must
    # stay unquoted, a PostgreSQL alias "LSH" must be quoted to be found again.
    quote = dialect.identifier_preparer.quote
    what = "*" if select is None else ", ".join(f"q.{quote(name)}" for name in select)
    if order_by is None:
        return sa.text(f"SELECT {what} FROM (\n{inner}\n) q WHERE 1 = 0")
    at, lsh = (quote(name) for name in order_by)
    where = ""
    if after:
        where = f"WHERE (q.{at} > :cs_after_at OR (q.{at} = :cs_after_at AND q.{lsh} > :cs_after_lsh)) "
    elif at_key:
        where = f"WHERE q.{at} = :cs_key_at AND q.{lsh} = :cs_key_lsh "
    return sa.text(f"SELECT {what} FROM (\n{inner}\n) q {where}ORDER BY {at}, {lsh}")


def newest_sql(query: str, dialect: Dialect, changed: str) -> sa.TextClause:
    """How many rows the window holds and the newest changed_at among them."""
    inner = escape_literal_colons(query.strip().rstrip(";").strip(), dialect.name)
    column = f"q.{dialect.identifier_preparer.quote(changed)}"
    return sa.text(f"SELECT COUNT(*), MAX({column}) FROM (\n{inner}\n) q")


class HisSource:
    """The hospital database, seen through ``his.query``."""

    def __init__(
        self, his: His, *, need_key_crowd: bool, zone: str | None = None, need_institution: bool = False
    ) -> None:
        self._his = his
        self._need_key_crowd = need_key_crowd
        self._need_institution = need_institution
        # The zone the HIS writes its datetimes in (Settings.his_timezone).
        self.zone = zone or his.timezone or str(Schedule.model_fields["timezone"].default)
        self._tz = tz_of(self.zone)
        self._url = _parse_url(his.url.get_secret_value())
        self.display_url = self._url.render_as_string(hide_password=True)
        self._engine = _create_engine(self._url, his)
        # Called with the seconds from sending the window query to its first row (or its empty
        # answer): the HIS database's own time for the query (metrics).
        self.on_query: Callable[[float], None] | None = None

    # -- public -----------------------------------------------------------------

    def now(self) -> datetime:
        """The HIS clock: the database's UTC clock in his.timezone, naive (as changed_at is)."""
        return self.clock().now

    def clock(self) -> HisClock:
        """One reading of the database's clock (see ``sync.clock``)."""
        with self._connect() as conn:
            before = datetime.now(UTC)
            try:
                utc, local = conn.execute(clock_sql(conn.dialect)).one()
            except _DB_ERRORS as exc:
                raise self._error(exc, doing="reading the database clock") from None
            after = datetime.now(UTC)
        server_local = _as_naive_datetime(local)
        if utc is None:
            now = server_local
            moment = now.replace(tzinfo=self._tz).astimezone(UTC)
        else:
            moment = _as_naive_datetime(utc).replace(tzinfo=UTC)
            now = moment.astimezone(self._tz).replace(tzinfo=None)
        return HisClock(now=now, utc=moment, server_local=server_local, host_utc=before + (after - before) / 2, zone=self.zone)

    def probe(self, clock: HisClock) -> DataProbe:
        """The newest visits around the HIS clock: the newest not ahead of it, and how many are
        (within a day). Two aggregates of his.query over about a day; see ``sync.clock``."""
        edge = clock.now + timedelta(seconds=MAX_OFFSET_S)
        start = min(clock.now, clock.server_local or clock.now) - timedelta(hours=1)
        with self._connect() as conn:
            columns = self._columns(conn)
            changed = _sort_keys(columns)[0]
            sql = newest_sql(self._his.query, conn.dialect, changed)
            try:
                _, newest = conn.execute(sql, {"since": start, "until": edge}).one()
                ahead, newest_ahead = conn.execute(sql, {"since": edge, "until": clock.now + timedelta(days=1)}).one()
            except _DB_ERRORS as exc:
                raise self._error(exc, doing="looking at the newest visits") from None
        return DataProbe(newest=_as_time(newest), ahead=int(ahead or 0), newest_ahead=_as_time(newest_ahead))

    def check(self) -> list[str]:
        """Connect, run the query over an empty window, validate its columns; return them."""
        with self._connect() as conn:
            columns = self._columns(conn)
            # The ordered form too, so a query the wrapping breaks is found now, not at the first poll.
            try:
                conn.execute(
                    window_sql(self._his.query, conn.dialect, order_by=_sort_keys(columns)),
                    {"since": _EMPTY_AT, "until": _EMPTY_AT},
                ).close()
            except _DB_ERRORS as exc:
                raise self._error(exc, doing="running his.query") from None
        log.info("his_checked", url=self.display_url, columns=len(columns))
        return columns

    def rows(self, since: datetime, until: datetime) -> Iterator[dict[str, Any]]:
        """Stream the rows of ``[since, until)`` ordered by ``changed_at, lsh``, keys in lower case.

        The columns are checked before the first row is yielded, so a bad query
        fails before any row is processed. A row the driver cannot read (bytes that are
        not text in the connection's character set, a value no Python type holds) comes
        out with ``sync.columns.Unreadable`` in place of each value it could not read, and
        the window goes on after it.
        """
        count = 0
        after: tuple[Any, Any] | None = None  # the last row's (changed_at, lsh) as the database gave them
        # After a failure the window is read again from the last row handed out, one row per
        # fetch: a driver fails a whole fetch of many rows, and the rows before the bad one
        # in that fetch must not be taken for it.
        careful = False
        unreadable = 0
        while True:
            failure: Exception | None = None
            with self._connect() as conn:
                columns = self._columns(conn)
                keys = [c.lower() for c in columns]
                at_i, lsh_i = keys.index("changed_at"), keys.index("lsh")
                dates, money = _DATE_COLUMNS.intersection(keys), _MONEY_COLUMNS.intersection(keys)
                stream = conn.execution_options(stream_results=True, yield_per=1 if careful else self._his.batch_size)
                params: dict[str, Any] = {"since": since, "until": until}
                if after is not None:
                    params.update(cs_after_at=after[0], cs_after_lsh=after[1])
                sent_at = time.perf_counter()
                try:
                    # Closed even when the caller stops early: an unbuffered MySQL result left
                    # open would poison the pooled connection for the next poll.
                    with stream.execute(
                        window_sql(self._his.query, conn.dialect, order_by=_sort_keys(columns), after=after is not None),
                        params,
                    ) as result:
                        rows = iter(result)
                        timed = self.on_query is None
                        while True:
                            try:
                                row = next(rows)
                            except StopIteration:
                                break
                            except _READ_ERRORS as exc:
                                if dberrors.is_transient(exc):
                                    raise
                                failure = exc  # this one row: read around it below
                                break
                            finally:
                                if not timed and self.on_query is not None:
                                    timed = True
                                    self.on_query(time.perf_counter() - sent_at)
                            count += 1
                            after = (row[at_i], row[lsh_i])
                            yield _canonical(dict(zip(keys, row, strict=True)), dates, money)
                except _DB_ERRORS as exc:
                    raise self._error(exc, doing="reading the window") from None
                if failure is not None:
                    conn.invalidate()  # whatever state the driver was left in, it is not reused
            if failure is None:
                break
            if not careful:
                careful = True
                continue
            unreadable += 1
            if unreadable > MAX_UNREADABLE_ROWS:
                log.error("his_rows_unreadable", rows=unreadable - 1, error=_read_error_text(failure))
                raise self._error(failure, doing=f"reading the window ({unreadable - 1} rows could not be read)")
            bad, key = self._unreadable_row(since, until, after, columns, failure)
            if key == after:  # no progress: the same row again (never expected; never loop)
                raise self._error(failure, doing="reading the window")
            after, careful = key, False
            count += 1
            yield _canonical(bad, dates, money)
        log.info("his_window_read", since=since.isoformat(), until=until.isoformat(), rows=count)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    # -- internals ---------------------------------------------------------------

    def _unreadable_row(
        self, since: datetime, until: datetime, after: tuple[Any, Any] | None, columns: list[str], failure: Exception
    ) -> tuple[dict[str, Any], tuple[Any, Any]]:
        """The row after ``after`` that could not be read, column by column: what can be read,
        and ``Unreadable`` where the driver fails; with its (changed_at, lsh) to go on after."""
        order = _sort_keys(columns)
        base: dict[str, Any] = {"since": since, "until": until}
        if after is not None:
            base.update(cs_after_at=after[0], cs_after_lsh=after[1])

        def first(select: list[str], *, at_key: tuple[Any, Any] | None = None) -> tuple[Any, ...] | None:
            with self._connect() as conn:
                try:
                    params = dict(base)
                    if at_key is not None:
                        params.update(cs_key_at=at_key[0], cs_key_lsh=at_key[1])
                    sql = window_sql(
                        self._his.query, conn.dialect, order_by=order, select=select,
                        after=at_key is None and after is not None, at_key=at_key is not None,
                    )
                    with conn.execution_options(stream_results=True).execute(sql, params) as result:
                        row = result.first()
                    return None if row is None else tuple(row)
                except Exception:
                    conn.invalidate()
                    raise

        reason = _read_error_text(failure)
        try:
            found = first(order)
        except _READ_ERRORS as exc:
            if dberrors.is_transient(exc):
                raise self._error(exc, doing="reading the window") from None
            # The key itself cannot be read: park the row under its time alone, and go on
            # after that time (other visits settled at that very instant come with it).
            try:
                found_at = first(order[:1])
            except _READ_ERRORS:
                raise self._error(failure, doing="reading the window") from None
            if found_at is None:
                raise self._error(failure, doing="reading the window") from None
            log.error("his_row_unreadable", changed_at=str(found_at[0]), columns=["lsh"], error=reason)
            return {"changed_at": found_at[0], "lsh": Unreadable(_read_error_text(exc))}, (found_at[0], None)
        if found is None:
            raise self._error(failure, doing="reading the window")
        key = (found[0], found[1])
        values: dict[str, Any] = {}
        unreadable: list[str] = []
        for column in columns:
            name = column.lower()
            if column in order:
                values[name] = key[order.index(column)]
                continue
            try:
                got = first([column], at_key=key)
                values[name] = None if got is None else got[0]
            except _READ_ERRORS as exc:
                if dberrors.is_transient(exc):
                    raise self._error(exc, doing="reading the window") from None
                values[name] = Unreadable(_read_error_text(exc))
                unreadable.append(name)
        log.error("his_row_unreadable", lsh=str(key[1]), changed_at=str(key[0]), columns=unreadable, error=reason)
        return values, key

    def _connect(self) -> Connection:
        try:
            return self._engine.connect()
        except _DB_ERRORS as exc:
            raise self._connect_error(exc) from None

    def _columns(self, conn: Connection) -> list[str]:
        try:
            result = conn.execute(window_sql(self._his.query, conn.dialect), {"since": _EMPTY_AT, "until": _EMPTY_AT})
            columns = list(result.keys())
            result.close()
        except _DB_ERRORS as exc:
            raise self._error(exc, doing="running his.query") from None
        check_columns(columns, need_key_crowd=self._need_key_crowd, need_institution=self._need_institution)
        return columns

    def _connect_error(self, exc: sa.exc.SQLAlchemyError) -> ConfigError | TransientError:
        message = dberrors.message(exc)
        if dberrors.is_refused(exc):
            log.error("his_connect_refused", url=self.display_url, error=message)
            return ConfigError(
                f"HIS 数据库拒绝连接 / the HIS database {self.display_url} refused the connection: {message}",
                hint="核对 his.url 中的用户名、密码和库名，以及该账号是否允许从本机连接 / check the user name, password and "
                "database name in his.url, and that this account may connect from this host",
            )
        log.warning("his_unreachable", url=self.display_url, error=message)
        return TransientError(
            f"连不上 HIS 数据库 / cannot reach the HIS database {self.display_url}: {message}",
            hint="核对 his.url 的主机和端口、数据库是否在运行、两台机器之间的防火墙 / check host and port in his.url, that "
            "the database is running, the firewall between the two hosts, and the credentials",
        )

    def _error(self, exc: BaseException, *, doing: str) -> ConfigError | TransientError:
        message = dberrors.message(exc)
        if dberrors.is_transient(exc):
            # The pool has already discarded an invalidated connection: the next poll reconnects.
            log.warning("his_connection_lost", url=self.display_url, doing=doing, error=message)
            return TransientError(
                f"HIS 数据库连接中断 / the HIS database connection failed while {doing}: {message}",
                hint="下次轮询自动重试；持续失败时检查到 HIS 的网络和数据库的超时设置 / retried at the next poll; if it keeps "
                "failing, check the network to the HIS and the database's timeouts",
            )
        log.error("his_query_rejected", url=self.display_url, doing=doing, error=message)
        return ConfigError(f"HIS 数据库拒绝执行 his.query / the HIS database rejected his.query: {message}", hint=_QUERY_HINT)


def _parse_url(raw: str) -> URL:
    try:
        url = make_url(raw.strip())
    except sa.exc.ArgumentError:
        raise ConfigError(
            "his.url 不是数据库 URL / his.url is not a database URL",
            hint="write it as dialect+driver://user:password@host:port/database, e.g. mysql+pymysql://reader:secret@10.0.0.5/his",
        ) from None
    register_secret(url.password if isinstance(url.password, str) else None)
    return url


def _create_engine(url: URL, his: His) -> Engine:
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    try:
        # Without an explicit +driver this loads the dialect to learn its default driver.
        driver = url.get_driver_name()
    except sa.exc.NoSuchModuleError:
        raise _unknown_dialect(shown, url.drivername) from None
    given = set(url.query)
    connect_args: dict[str, Any] = {}

    def default(key: str, value: Any) -> None:
        # A value written in the URL's query string wins over ours.
        if key not in given:
            connect_args[key] = value

    if backend in ("mysql", "mariadb"):
        if "charset" not in given:
            # Patients' names need 4-byte characters; the drivers' own default is narrower.
            url = url.update_query_dict({"charset": "utf8mb4"})
        if driver in ("pymysql", "mysqldb"):
            default("connect_timeout", _CONNECT_TIMEOUT_S)
            default("read_timeout", _READ_TIMEOUT_S)
        if driver == "pymysql" and (fast := hisconv.conversions()) is not None:
            default("conv", fast)
    elif backend == "postgresql" and driver in ("psycopg2", "psycopg"):
        default("connect_timeout", _CONNECT_TIMEOUT_S)
    elif backend == "oracle" and driver == "oracledb":
        default("tcp_connect_timeout", _CONNECT_TIMEOUT_S)
    elif backend == "mssql" and driver == "pymssql":
        default("login_timeout", _CONNECT_TIMEOUT_S)
        default("timeout", _READ_TIMEOUT_S)

    options: dict[str, Any] = {
        # A daemon outlives firewalls' idle cuts and MySQL's wait_timeout: test each
        # connection before use and renew it well before the server would drop it.
        "pool_pre_ping": True,
        "pool_recycle": his.pool_recycle_s,
        "connect_args": connect_args,
        # SQL parameters hold ID numbers and names: never in a log line or an error message.
        "hide_parameters": True,
    }
    if backend != "sqlite":
        # One query at a time is all a poll needs; stay light on the hospital's server.
        options.update(pool_size=2, max_overflow=2)
    try:
        engine = sa.create_engine(url, **options)
    except sa.exc.NoSuchModuleError:
        raise _unknown_dialect(shown, url.drivername) from None
    except ImportError as exc:
        if driver == "cx_oracle":
            hint = "install cx_Oracle, or use oracle+oracledb:// which needs no client libraries"
        else:
            hint = dberrors.install_hint(driver)
        raise ConfigError(f"his.url {shown}: 无法加载数据库驱动 / the database driver cannot be loaded ({exc})", hint=hint) from None
    except (sa.exc.ArgumentError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"his.url {shown} 不可用 / is not usable: {redact(str(exc))}",
            hint="check the URL's driver options (the part after ?)",
        ) from None
    if backend in ("mysql", "mariadb", "postgresql"):
        _make_read_only(engine, backend)
    if backend in ("mysql", "mariadb") and driver == "pymysql":
        sa.event.listen(engine, "handle_error", _end_lost_stream)
    return engine


def _end_lost_stream(ctx: sa.engine.ExceptionContext) -> None:
    """A connection lost while streaming (KILL, restart, network cut): end pymysql's result.

    pymysql keeps such an unbuffered result "active", and closing its cursor, or the
    garbage collector finalising it, then reads from the closed socket and raises
    inside ``__del__``: tracebacks on stderr after every lost poll.
    """
    # ctx.execution_context.cursor: SQLAlchemy 2.1 leaves ctx.cursor itself unset.
    cursor = getattr(ctx.execution_context, "cursor", None)
    result = getattr(cursor, "_result", None)
    if ctx.is_disconnect and getattr(result, "unbuffered_active", False):
        result.unbuffered_active = False  # type: ignore[union-attr]


def _unknown_dialect(shown: str, drivername: str) -> ConfigError:
    return ConfigError(
        f"his.url {shown}: 未知的数据库类型或驱动 / unknown database dialect or driver {drivername!r}",
        hint="use one of mysql+pymysql, postgresql+psycopg2, oracle+oracledb, mssql+pymssql, sqlite",
    )


def _make_read_only(engine: Engine, backend: str) -> None:
    """Ask the server to refuse writes on our sessions: a cheap guarantee we never touch the HIS."""
    statement = (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"
        if backend == "postgresql"
        else "SET SESSION TRANSACTION READ ONLY"  # MySQL >= 5.6.5, MariaDB >= 10.0
    )
    dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(statement)
        except dbapi_error as exc:
            # An old server without the statement still works; reading is all we do anyway.
            log.warning("his_read_only_unavailable", error=redact(str(exc)))
            dbapi_conn.rollback()
        else:
            dbapi_conn.commit()
        finally:
            cursor.close()


def _sort_keys(columns: Sequence[str]) -> list[str]:
    by_lower = {c.lower(): c for c in columns}
    return [by_lower["changed_at"], by_lower["lsh"]]


def _canonical(
    row: dict[str, Any], dates: Iterable[str] = _DATE_COLUMNS, money: Iterable[str] = _MONEY_COLUMNS
) -> dict[str, Any]:
    """``dates`` and ``money``: the date and money columns among the row's keys (the same for
    every row of a result, so found once)."""
    for key in dates:
        value = row.get(key)
        if isinstance(value, str) and _ISO_DATETIME.match(text := value.strip()):
            # 2024-02-30 or 25:00:00 has the shape of a date but is none: left as text so that
            # records.build parks this one record with the reason, instead of the error
            # failing the whole window (and every later poll of it).
            try:  # not contextlib.suppress: this runs for every date of every row
                parsed = datetime.fromisoformat(text) if len(text) > 10 else date.fromisoformat(text)
            except ValueError:
                continue
            row[key] = parsed
    for key in money:
        value = row.get(key)
        if isinstance(value, float):
            # FLOAT/DOUBLE columns and SQLite's NUMERIC: the shortest repr is the stored value.
            row[key] = Decimal(repr(value))
    if isinstance(row.get("changed_at"), date) and not isinstance(row["changed_at"], datetime):
        d = row["changed_at"]
        row["changed_at"] = datetime(d.year, d.month, d.day)
    return row


def _as_time(value: Any) -> datetime | None:
    """A changed_at as his.query returns it (datetime, date or ISO text), as a naive datetime."""
    if value is None:
        return None
    got = _canonical({"changed_at": value}, ("changed_at",), ())["changed_at"]
    return got if isinstance(got, datetime) else None


def _as_naive_datetime(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip())
    if not isinstance(value, datetime):
        raise TypeError(f"the database clock returned {type(value).__name__}, not a datetime")
    # An aware value's wall clock is the session's local time, which is what DATETIME columns hold.
    return value.replace(tzinfo=None)


def _read_error_text(exc: BaseException) -> str:
    if isinstance(exc, sa.exc.SQLAlchemyError):
        return dberrors.message(exc)
    return redact(f"{type(exc).__name__}: {exc}")[:300]
