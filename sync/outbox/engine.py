"""The outbox's engines: dialect quirks, SQLite pragmas, file permissions, the raw-insert fast path.

Also how values are stored: every timestamp is naive UTC (``utc``), except the HIS's
own clock, kept as its wall time (``wall``); see ``sync.outbox.schema``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import StaticPool

from sync import dberrors
from sync.errors import ConfigError, TransientError
from sync.files import private_dir, touch_private
from sync.outbox.model import Incoming, Status
from sync.outbox.schema import sync_outbox

# Bound parameters per IN list: well under every dialect's limit (Oracle: 1000,
# SQL Server: 2100 parameters per statement).
CHUNK = 500
# Connections the pool keeps: upstream.concurrency (at most 64) upload threads, plus the
# claiming thread, the poll's batch writer and the token renewal.
POOL_SIZE = 70

T = TypeVar("T")


# -- stored values ---------------------------------------------------------------


def utc(value: datetime) -> datetime:
    """Naive UTC, whatever was handed in (naive values are taken as UTC already)."""
    if value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def wall(value: datetime | None) -> datetime | None:
    """The HIS clock as stored: naive, wall time kept."""
    # Checked first: replace() costs more than the test, and this runs for every enqueued row.
    if value is None or (type(value) is datetime and value.tzinfo is None):
        return value
    return value.replace(tzinfo=None)


def fit(value: str | None, size: int) -> str | None:
    """Metadata columns are a convenience for the DBA; never fail a batch on their length."""
    return None if value is None else value[:size]


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in slices of at most ``size``: one IN list each."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- engines ------------------------------------------------------------------------


def make_engine(url: str, *, create: bool = True) -> sa.Engine:
    """The outbox engine. ``create=False``: a SQLite file that does not exist is refused, not created."""
    try:
        parsed = sa.make_url(url.strip())
    except sa.exc.ArgumentError:
        raise ConfigError(
            "outbox.url 不是数据库 URL / outbox.url is not a database URL",
            hint="write it as sqlite:////var/lib/crowd-sync/outbox.db, or dialect+driver://user:password@host:port/database",
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        return _engine_for(parsed, create=create)
    except sa.exc.NoSuchModuleError:
        raise ConfigError(
            f"outbox.url {shown}: 未知的数据库类型或驱动 / unknown database dialect or driver {parsed.drivername!r}",
            hint="use one of sqlite, mysql+pymysql, postgresql+psycopg2, oracle+oracledb, mssql+pymssql",
        ) from None
    except ImportError as exc:
        raise ConfigError(
            f"outbox.url {shown}: 无法加载数据库驱动 / the database driver cannot be loaded ({exc})",
            hint=dberrors.install_hint(parsed.get_driver_name()),
        ) from None


# SQLite errors about the file itself (its directory, its permissions, its contents, the disk),
# as against the schema or the statement: someone must fix the file, waiting does not help.
_SQLITE_FILE_ERRORS = (
    "unable to open database file", "readonly database", "file is not a database", "disk i/o error",
    "database disk image is malformed", "database or disk is full",
)


def describe_error(exc: BaseException, url: str) -> ConfigError | TransientError | None:
    """What a database error of the outbox at ``url`` means to the operator.

    ``TransientError`` when waiting helps (server down or unreachable, lock waits),
    ``ConfigError`` when outbox.url, the account or the file must be fixed, None when it is
    neither (a bug, or a schema changed by hand): the caller reports that as unexpected.
    """
    if not isinstance(exc, dberrors.DB_ERRORS):
        return None
    try:
        parsed = sa.make_url(url.strip())
    except sa.exc.ArgumentError:
        return None
    shown = parsed.render_as_string(hide_password=True)
    text = dberrors.message(exc)
    # Only while connecting: "does not exist" later means a table, not the database.
    if getattr(exc, "statement", None) is None and dberrors.is_refused(exc):
        return ConfigError(
            f"outbox 数据库拒绝连接 / the outbox database {shown} refused the connection: {text}",
            hint="核对 outbox.url 中的用户名、密码和库名 / check the user name, password and database name in outbox.url, and that this account may "
            "connect from this host",
        )
    sqlite = parsed.get_backend_name() == "sqlite"
    if dberrors.is_transient(exc) or (
        not sqlite and isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.DisconnectionError)
    ):
        return TransientError(
            f"outbox 数据库暂时连不上 / the outbox database {shown} is not reachable now: {text}",
            hint="检查数据库是否在运行、能否从本机访问；服务会自动重试 / check that the database server is running and reachable from this host (host and port in "
            "outbox.url, the firewall); run the command again later, the service retries by itself",
        )
    if sqlite and any(t in text.lower() for t in _SQLITE_FILE_ERRORS):
        path = Path(parsed.database or "").expanduser()
        return ConfigError(
            f"outbox 数据库文件不可用 / the outbox database file {path} cannot be used: {text}",
            hint="核对 outbox.url；文件及其目录须可被运行 crowd-sync 的用户读写 / check outbox.url; the file and its directory must be readable and writable by the user that "
            f"runs crowd-sync (ls -ld {path.parent} {path}; the service runs as crowd-sync), and the file must be "
            "a crowd-sync outbox",
        )
    return None


def _missing_parent(path: Path) -> str:
    """Why the file's directory is not there either, if it is not."""
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is None or (existing == path.parent and existing.is_dir()):
        return ""
    if not existing.is_dir():
        return f" ({existing} is a file, not a directory)"
    return f" (nor does its directory {path.parent})"


def _is_memory_sqlite(url: sa.URL) -> bool:
    db = url.database
    return url.get_backend_name() == "sqlite" and (not db or db == ":memory:")


def _engine_for(parsed: sa.URL, *, create: bool) -> sa.Engine:
    if parsed.get_backend_name() != "sqlite":
        # pre_ping and recycle: the outbox connection idles between polls, and
        # servers and firewalls cut idle connections.
        # pool_size: every upload thread records its outcome in a transaction of its own.
        # With fewer pooled connections than threads, the ones beyond are opened and closed
        # per record (a login to the server each time); the pool only keeps what was used.
        return sa.create_engine(
            parsed, pool_pre_ping=True, pool_recycle=1800, pool_size=POOL_SIZE, hide_parameters=True
        )
    memory = _is_memory_sqlite(parsed)
    if memory:
        # One shared connection, or every pool connection would see its own empty database.
        engine = sa.create_engine(
            parsed, poolclass=StaticPool, connect_args={"check_same_thread": False}, hide_parameters=True
        )
    else:
        assert parsed.database is not None
        path = Path(parsed.database)  # as SQLite opens it (no ~ expansion)
        if not create and not path.is_file():
            raise ConfigError(
                f"outbox 数据库文件不存在 / the outbox database file {path} does not exist" + _missing_parent(path),
                hint="核对 outbox.url；只读命令不会新建 outbox，服务首次运行或 `crowd-sync migrate` 会建 / check outbox.url (a relative path is relative to the settings file's directory, "
                "the service's is sqlite:////var/lib/crowd-sync/outbox.db); this command only reads the outbox "
                "and never creates one: the service creates it at its first run, or `crowd-sync migrate` does",
            )
        if create:
            try:
                private_dir(path.parent)
                if not path.parent.is_dir():
                    # private_dir leaves what exists alone: a file standing where a directory should.
                    raise NotADirectoryError(errno.ENOTDIR, "a part of the path is a file", str(path.parent))
            except OSError as exc:
                raise ConfigError(
                    f"无法创建 outbox 目录 / the outbox directory {path.parent} cannot be created: {exc.strerror or exc}",
                    hint="核对 outbox.url：路径中可能有一段是文件，或运行用户无写权限 / check outbox.url: a part of that path may be a file, or the user running crowd-sync "
                    "may not write there (the service runs as crowd-sync in /var/lib/crowd-sync)",
                ) from None
        engine = sa.create_engine(parsed, connect_args={"timeout": 30}, pool_size=POOL_SIZE, hide_parameters=True)
        if create and not parsed.database.startswith("file:"):  # a URI filename is SQLite's own business

            @event.listens_for(engine, "do_connect")
            def _create_private(*_args: Any) -> None:
                # Created 0600 before SQLite opens it: the file holds full ID numbers and the
                # live token, and SQLite gives its -wal and -shm files the database's permissions.
                touch_private(path)

    # The pysqlite recipe from the SQLAlchemy documentation: let SQLAlchemy emit
    # BEGIN itself, and make it BEGIN IMMEDIATE, so a writer takes the write lock
    # at the start of its transaction and others queue on busy_timeout instead of
    # failing with "database is locked" when upgrading a read lock.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                # In WAL mode NORMAL still never corrupts the database; a power cut may lose
                # the last commits, which is harmless here: rows and cursor are lost together
                # and read again, and a lost "sent" only resends an upsert. FULL would fsync
                # on every commit, and dispatch commits once per uploaded record.
                cursor.execute("PRAGMA synchronous=NORMAL")
                # A back-fill writes hundreds of thousands of rows whose indexes (card_no above
                # all) take them in random order: copying the WAL into the database every
                # 40 MB rather than every 4 MB (SQLite's default) writes each page once for
                # many commits. The file is cut back to 64 MB after a checkpoint.
                cursor.execute("PRAGMA wal_autocheckpoint=10000")
                cursor.execute("PRAGMA journal_size_limit=67108864")
            cursor.execute("PRAGMA busy_timeout=30000")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def skip_locked_ok(dialect: sa.Dialect) -> bool:
    """Whether ``FOR UPDATE SKIP LOCKED`` exists (MariaDB from 10.6, MySQL from 8.0)."""
    name = dialect.name
    if name in ("postgresql", "oracle", "mssql"):
        return True
    if name in ("mysql", "mariadb"):
        version = dialect.server_version_info or (0,)
        if getattr(dialect, "is_mariadb", False):
            return tuple(version[:2]) >= (10, 6)
        return tuple(version[:1]) >= (8,)
    return False


def by_institution(keys: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(institution, lsh) keys grouped by institution: ``IN`` lists of one column work on
    every dialect (SQL Server has no tuple ``IN``)."""
    out: dict[str, list[str]] = {}
    for institution, lsh in keys:
        out.setdefault(institution, []).append(lsh)
    return out


# -- the raw-insert fast path ---------------------------------------------------------


# The columns a new outbox row gets from ``enqueue``, in the order of ``RawInsert`` rows.
_INSERT_COLUMNS: tuple[str, ...] = (
    "institution", "lsh", "status", "payload", "payload_hash", "key_crowd", "card_type", "card_no", "visit_type",
    "settlement_date", "attempts", "generic_failures", "first_failed_at", "next_attempt_at", "last_error",
    "last_http_status", "first_seen_at", "updated_at", "source_changed_at",
)


_PROBE_AT = datetime(2024, 2, 3, 4, 5, 6, 78)


def _same(value: Any) -> Any:
    return value


def _iso_stamp(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(" ", "microseconds")


def _iso_day(value: date | None) -> str | None:
    return None if value is None else date.isoformat(value)  # date's own, also for a datetime


@dataclass(frozen=True, kw_only=True)
class RawInsert:
    """New outbox rows through the driver's own executemany, with the values already in
    the form SQLAlchemy would bind them (its bind processors, the batch's one timestamp
    processed once): the same rows as ``sa.insert(sync_outbox)``, a third of the cost."""

    sql: str
    stamp: Callable[[Any], Any]
    day: Callable[[Any], Any]

    @classmethod
    def for_dialect(cls, dialect: sa.Dialect) -> RawInsert:
        stmt = sa.insert(sync_outbox).values({name: sa.bindparam(name) for name in _INSERT_COLUMNS})
        compiled = stmt.compile(dialect=dialect)
        # A positional statement (qmark) whose parameters come in _INSERT_COLUMNS order.
        assert list(compiled.positiontup or ()) == list(_INSERT_COLUMNS), compiled.positiontup

        def processor(column: sa.Column[Any], iso: Callable[[Any], Any]) -> Callable[[Any], Any]:
            bind = column.type.dialect_impl(dialect).bind_processor(dialect) or _same
            # SQLite's default storage formats are ISO 8601 with a space: isoformat, three times
            # faster than the processor's %-formatting. Used only if it writes the same text.
            return iso if bind(_PROBE_AT) == iso(_PROBE_AT) and bind(None) is None else bind

        return cls(
            sql=str(compiled),
            stamp=processor(sync_outbox.c.updated_at, _iso_stamp),
            day=processor(sync_outbox.c.settlement_date, _iso_day),
        )

    def execute(self, conn: sa.Connection, items: Sequence[Incoming], now: datetime) -> None:
        stamp, day = self.stamp, self.day
        at = stamp(now)
        rows: list[tuple[Any, ...]] = []
        for item in items:
            status = Status(item.status)
            rows.append((
                item.institution, item.lsh, status.value, item.payload_json, item.payload_hash, fit(item.key_crowd, 1),
                fit(item.card_type, 8), fit(item.card_no, 64), fit(item.visit_type, 1),
                day(item.settlement_date), 0, 0, None, at if status is Status.PENDING else None, item.reason,
                None, at, at, stamp(wall(item.source_changed_at)),
            ))
        conn.exec_driver_sql(self.sql, rows)

