"""The outbox store: the only code that reads or writes the local database.

Rows move ``pending -> sent`` (or ``failed``/``invalid``/``dead``/``skipped``)
under a lease, so several workers, threads or processes can dispatch from the
same outbox without sending a row twice at once. ``enqueue`` is idempotent on
``(lsh, payload_hash)`` and moves the poll cursor in the same transaction.

Every timestamp handed in is UTC; aware values are converted and stored naive
(see ``sync.outbox.schema``). ``source_changed_at`` and the cursor are the HIS's
own clock and stored as given.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.pool import StaticPool

import migrations
from sync import dberrors
from sync.crashpoints import crash_point
from sync.errors import ConfigError, TransientError
from sync.files import private_dir, touch_private
from sync.outbox import history
from sync.outbox.lock import AlreadyRunning, InstanceLock, renewal_lock
from sync.outbox.schema import (
    sync_cursor,
    sync_label_cache,
    sync_outbox,
    sync_run,
    sync_state,
    sync_token,
)
from sync.upstream.keyform import KeyFormMemory
from sync.upstream.signing import KEY_FORMS, KeyForm
from sync.upstream.tokens import Token, TokenStore

__all__ = [
    "AlreadyRunning",
    "Claimed",
    "DbTokenStore",
    "EnqueueResult",
    "Incoming",
    "InstanceLock",
    "Outcome",
    "Status",
    "Store",
    "Summary",
    "current_revision",
    "describe_error",
    "head_revision",
    "render_offline",
    "upgrade",
]

log = structlog.get_logger(__name__)

VERSION_TABLE = "sync_schema_version"
CURSOR_NAME = "his"
# Bound parameters per IN list: well under every dialect's limit (Oracle: 1000,
# SQL Server: 2100 parameters per statement).
_CHUNK = 500
_MIGRATE_HINT = "run `crowd-sync migrate`"
# Connections the pool keeps: upstream.concurrency (at most 64) upload threads, plus the
# claiming thread, the poll's batch writer and the token renewal.
_POOL_SIZE = 70

T = TypeVar("T")


class Status(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    INVALID = "invalid"
    DEAD = "dead"
    SKIPPED = "skipped"


_DUE = (Status.PENDING.value, Status.FAILED.value)
# sync_state row kept while the platform is unreachable (dispatch probes it with back-off).
PLATFORM_DOWN = "platform_down"


@dataclass(frozen=True, kw_only=True)
class Incoming:
    """One visit read from the HIS, after local validation."""

    lsh: str
    payload_json: str
    payload_hash: str
    status: Status  # PENDING, SKIPPED or INVALID
    key_crowd: str | None
    reason: str | None  # becomes last_error for SKIPPED and INVALID
    source_changed_at: datetime | None
    card_type: str | None
    card_no: str | None
    visit_type: str | None
    settlement_date: date | None


@dataclass(frozen=True, kw_only=True)
class EnqueueResult:
    inserted: int
    changed: int
    unchanged: int
    # Of the rows written (inserted or changed), how many were parked at once.
    invalid: int = 0
    skipped: int = 0


@dataclass(frozen=True, kw_only=True)
class Claimed:
    """A row leased to one worker for uploading."""

    lsh: str
    payload_json: str
    payload_hash: str
    key_crowd: str | None
    card_type: str | None
    card_no: str | None
    attempts: int
    generic_failures: int
    first_failed_at: datetime | None
    lease_owner: str


@dataclass(frozen=True, kw_only=True, eq=False)
class Outcome:
    """What became of one claimed row, ready to be written by ``Store.record``."""

    claimed: Claimed
    values: Mapping[str, Any]  # the columns to set (SQL expressions allowed)


@dataclass(frozen=True, kw_only=True)
class Summary:
    """What ``crowd-sync status`` shows.

    ``oldest_pending_at``: among pending and failed rows, the earliest moment one
    has been waiting since: its first transient failure if it has failed, else
    its last change (enqueued, changed or requeued). None when nothing waits.
    """

    counts: dict[str, int]  # every Status value, as plain text
    oldest_pending_at: datetime | None
    last_sent_at: datetime | None
    last_run: dict[str, Any] | None
    last_successful_run: dict[str, Any] | None
    config_error: dict[str, Any] | None
    leased: int
    # {form, accepted_at}: the reading of the app key the platform last accepted (upstream.app_key_form: auto).
    key_form: dict[str, Any] | None = None
    # While the platform is unreachable: {since, reason, probes, next_probe_at} (ISO text, UTC).
    platform_down: dict[str, Any] | None = None


# -- helpers -------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    """Naive UTC, whatever was handed in (naive values are taken as UTC already)."""
    if value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _wall(value: datetime | None) -> datetime | None:
    """The HIS clock as stored: naive, wall time kept."""
    # Checked first: replace() costs more than the test, and this runs for every enqueued row.
    if value is None or (type(value) is datetime and value.tzinfo is None):
        return value
    return value.replace(tzinfo=None)


def _fit(value: str | None, size: int) -> str | None:
    """Metadata columns are a convenience for the DBA; never fail a batch on their length."""
    return None if value is None else value[:size]


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# The label lists of the label API's answer (document 3.1.2), in the order the decision reads them.
LABEL_LISTS = ("rkxBq", "jjxBq", "jkBq", "glztBq")


def _label_codes(data_json: str | None) -> str | None:
    """The label API's ``data`` JSON reduced to its label codes per list (what the label cache
    keeps); None when the platform returned no data."""
    if data_json is None:
        return None
    try:
        data = json.loads(data_json)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return None
    codes: dict[str, list[str]] = {}
    for name in LABEL_LISTS:
        items = data.get(name)
        codes[name] = [
            str(item.get("code") or "") for item in (items if isinstance(items, list) else []) if isinstance(item, dict)
        ]
    return json.dumps(codes, separators=(",", ":"))


def _labels_as_data(labels: str | None) -> str | None:
    """A cached ``labels`` value back in the shape of the label API's ``data`` (codes only)."""
    if labels is None:
        return None
    try:
        codes = json.loads(labels)
    except ValueError:
        return None
    if not isinstance(codes, dict):
        return None
    return json.dumps(
        {name: [{"code": c} for c in codes.get(name) or []] for name in LABEL_LISTS}, ensure_ascii=False
    )


def card_hash(card_no: str) -> str:
    """The label cache key: sha256 of the ID number, so the cache need not repeat it."""
    return hashlib.sha256(card_no.strip().upper().encode("utf-8")).hexdigest()


# The columns a new outbox row gets from ``enqueue``, in the order of ``_RawInsert`` rows.
_INSERT_COLUMNS: tuple[str, ...] = (
    "lsh", "status", "payload", "payload_hash", "key_crowd", "card_type", "card_no", "visit_type",
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
class _RawInsert:
    """New outbox rows through the driver's own executemany, with the values already in
    the form SQLAlchemy would bind them (its bind processors, the batch's one timestamp
    processed once): the same rows as ``sa.insert(sync_outbox)``, a third of the cost."""

    sql: str
    stamp: Callable[[Any], Any]
    day: Callable[[Any], Any]

    @classmethod
    def for_dialect(cls, dialect: sa.Dialect) -> _RawInsert:
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
                item.lsh, status.value, item.payload_json, item.payload_hash, _fit(item.key_crowd, 1),
                _fit(item.card_type, 8), _fit(item.card_no, 64), _fit(item.visit_type, 1),
                day(item.settlement_date), 0, 0, None, at if status is Status.PENDING else None, item.reason,
                None, at, at, stamp(_wall(item.source_changed_at)),
            ))
        conn.exec_driver_sql(self.sql, rows)


def _is_memory_sqlite(url: sa.URL) -> bool:
    db = url.database
    return url.get_backend_name() == "sqlite" and (not db or db == ":memory:")


# -- migrations ----------------------------------------------------------------


def _alembic_config(output: io.StringIO | None = None) -> Config:
    cfg = Config(output_buffer=output) if output is not None else Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return cfg


def head_revision() -> str:
    """The schema revision this version of crowd-sync needs."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _known_revisions() -> set[str]:
    return {rev.revision for rev in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def _current_on(conn: sa.Connection) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def current_revision(engine: sa.Engine) -> str | None:
    """The database's schema revision; None for a database Alembic never touched."""
    with engine.connect() as conn:
        return _current_on(conn)


def _upgrade_on(conn: sa.Connection) -> None:
    cfg = _alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


def upgrade(engine_or_url: sa.Engine | str) -> None:
    """Bring the outbox database to the head revision."""
    if isinstance(engine_or_url, str):
        store = Store(engine_or_url)
        try:
            store.migrate()
        finally:
            store.dispose()
        return
    with engine_or_url.begin() as conn:
        _upgrade_on(conn)


def render_offline(dialect_url: str) -> str:
    """The DDL of every migration as SQL text for a DBA to run by hand (Alembic ``--sql``)."""
    buf = io.StringIO()
    cfg = _alembic_config(buf)
    cfg.attributes["url"] = dialect_url
    command.upgrade(cfg, "head", sql=True)
    return buf.getvalue()


# -- engine ----------------------------------------------------------------------


def _make_engine(url: str, *, create: bool = True) -> sa.Engine:
    """The outbox engine. ``create=False``: a SQLite file that does not exist is refused, not created."""
    try:
        parsed = sa.make_url(url.strip())
    except sa.exc.ArgumentError:
        raise ConfigError(
            "outbox.url is not a database URL",
            hint="write it as sqlite:////var/lib/crowd-sync/outbox.db, or dialect+driver://user:password@host:port/database",
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        return _engine_for(parsed, create=create)
    except sa.exc.NoSuchModuleError:
        raise ConfigError(
            f"outbox.url {shown}: unknown database dialect or driver {parsed.drivername!r}",
            hint="use one of sqlite, mysql+pymysql, postgresql+psycopg2, oracle+oracledb, mssql+pymssql",
        ) from None
    except ImportError as exc:
        raise ConfigError(
            f"outbox.url {shown}: the database driver cannot be loaded ({exc})",
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
            f"the outbox database {shown} refused the connection: {text}",
            hint="check the user name, password and database name in outbox.url, and that this account may "
            "connect from this host",
        )
    sqlite = parsed.get_backend_name() == "sqlite"
    if dberrors.is_transient(exc) or (
        not sqlite and isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.DisconnectionError)
    ):
        return TransientError(
            f"the outbox database {shown} is not reachable now: {text}",
            hint="check that the database server is running and reachable from this host (host and port in "
            "outbox.url, the firewall); run the command again later, the service retries by itself",
        )
    if sqlite and any(t in text.lower() for t in _SQLITE_FILE_ERRORS):
        path = Path(parsed.database or "").expanduser()
        return ConfigError(
            f"the outbox database file {path} cannot be used: {text}",
            hint="check outbox.url; the file and its directory must be readable and writable by the user that "
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


def _engine_for(parsed: sa.URL, *, create: bool) -> sa.Engine:
    if parsed.get_backend_name() != "sqlite":
        # pre_ping and recycle: the outbox connection idles between polls, and
        # servers and firewalls cut idle connections.
        # pool_size: every upload thread records its outcome in a transaction of its own.
        # With fewer pooled connections than threads, the ones beyond are opened and closed
        # per record (a login to the server each time); the pool only keeps what was used.
        return sa.create_engine(
            parsed, pool_pre_ping=True, pool_recycle=1800, pool_size=_POOL_SIZE, hide_parameters=True
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
                f"the outbox database file {path} does not exist" + _missing_parent(path),
                hint="check outbox.url (a relative path is relative to the settings file's directory, "
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
                    f"the outbox directory {path.parent} cannot be created: {exc.strerror or exc}",
                    hint="check outbox.url: a part of that path may be a file, or the user running crowd-sync "
                    "may not write there (the service runs as crowd-sync in /var/lib/crowd-sync)",
                ) from None
        engine = sa.create_engine(parsed, connect_args={"timeout": 30}, pool_size=_POOL_SIZE, hide_parameters=True)
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
            cursor.execute("PRAGMA busy_timeout=30000")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _skip_locked_ok(dialect: sa.Dialect) -> bool:
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


def _row_dict(row: sa.Row[Any] | None) -> dict[str, Any] | None:
    return None if row is None else dict(row._mapping)


class Store:
    """The outbox database."""

    def __init__(self, url: str, *, lease_s: int = 300, create: bool = True) -> None:
        """``create=False`` (commands that only read): never create or migrate the outbox."""
        self.engine: sa.Engine = _make_engine(url, create=create)
        self.create = create
        self.url_for_humans: str = self.engine.url.render_as_string(hide_password=True)
        self.lease_s = lease_s
        self._dialect = self.engine.dialect.name
        self._token_store: DbTokenStore | None = None
        # SQLite has one writer at a time, and a connection that finds the lock taken polls
        # it with sleeps of 1 to 100 ms (busy_timeout). The upload threads of this process
        # queue on this lock instead, so each outcome is recorded as soon as the file is free.
        self._outcome_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if self._dialect == "sqlite" else contextlib.nullcontext()
        )

    # -- schema --------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Refuse to run against a schema other than head (a fresh SQLite file is created,
        unless this store only reads)."""
        head = head_revision()
        with self.engine.begin() as conn:
            current = _current_on(conn)
            if current == head:
                return
            if current is None:
                has_tables = sa.inspect(conn).has_table(sync_outbox.name)
                if self._dialect == "sqlite" and not has_tables and self.create:
                    _upgrade_on(conn)
                    log.info("outbox_created", url=self.url_for_humans, revision=head)
                    return
                if has_tables:
                    raise ConfigError(
                        f"the outbox database {self.url_for_humans} has crowd-sync tables but no schema version "
                        f"in {VERSION_TABLE}, this version needs {head}",
                        hint=f"if the schema is complete, record it with `alembic stamp {head}`; "
                        "otherwise point outbox.url at an empty database and run `crowd-sync migrate`",
                    )
            elif current not in _known_revisions():
                raise ConfigError(
                    f"the outbox schema is at {current}, newer than this version of crowd-sync knows (it needs {head})",
                    hint="upgrade crowd-sync to the version that migrated this database",
                )
        raise ConfigError(
            f"the outbox schema is at {current or 'none (empty database)'}, this version needs {head}",
            hint=_MIGRATE_HINT,
        )

    def migrate(self) -> tuple[str | None, str]:
        """Upgrade to head; returns the revisions before and after."""
        with self.engine.begin() as conn:
            before = _current_on(conn)
            _upgrade_on(conn)
        after = current_revision(self.engine)
        assert after is not None
        log.info("outbox_migrated", url=self.url_for_humans, before=before, after=after)
        return before, after

    def dispose(self) -> None:
        self.engine.dispose()

    # -- cursor --------------------------------------------------------------------
    def get_cursor(self) -> tuple[datetime, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sync_cursor.c.changed_at, sync_cursor.c.lsh).where(sync_cursor.c.name == CURSOR_NAME)
            ).first()
        if row is None or row.changed_at is None:
            return None
        return row.changed_at, row.lsh or ""

    def rewind_cursor(self, cursor: tuple[datetime, str], *, now: datetime) -> None:
        """Set the cursor back (it was found ahead of the HIS clock); ``enqueue`` only moves it forward."""
        with self.engine.begin() as conn:
            updated = conn.execute(
                sa.update(sync_cursor)
                .where(sync_cursor.c.name == CURSOR_NAME)
                .values(changed_at=_wall(cursor[0]), lsh=cursor[1], updated_at=_utc(now))
            ).rowcount
            if not updated:
                conn.execute(
                    sa.insert(sync_cursor).values(
                        name=CURSOR_NAME, changed_at=_wall(cursor[0]), lsh=cursor[1], updated_at=_utc(now)
                    )
                )

    def clear_cursor(self) -> None:
        """Forget the cursor: the next poll back-fills from his.start_from."""
        with self.engine.begin() as conn:
            conn.execute(sa.delete(sync_cursor).where(sync_cursor.c.name == CURSOR_NAME))

    def newest_source_changed_at(self, *, not_after: datetime) -> datetime | None:
        """The newest HIS change time (HIS clock) of any visit read, not after ``not_after``."""
        o = sync_outbox
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(sa.func.max(o.c.source_changed_at)).where(o.c.source_changed_at <= _wall(not_after))
            ).scalar()
        return value if isinstance(value, datetime) else None

    def _move_cursor(self, conn: sa.Connection, cursor: tuple[datetime, str], now: datetime) -> None:
        changed_at, lsh = _wall(cursor[0]), cursor[1]
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

    # -- enqueue -------------------------------------------------------------------
    def enqueue(
        self, items: Sequence[Incoming], *, now: datetime, cursor: tuple[datetime, str] | None = None
    ) -> EnqueueResult:
        """Record a batch of visits (and the cursor covering them) in one transaction.

        Idempotent on ``(lsh, payload_hash)``: an unchanged row is not written at all.
        A changed row starts over: its new status, attempts reset, due now if pending.
        """
        now = _utc(now)
        latest: dict[str, Incoming] = {}
        for item in items:
            if len(item.lsh) > sync_outbox.c.lsh.type.length:  # type: ignore[attr-defined]
                log.warning("lsh_too_long_to_store", lsh=item.lsh[:60], length=len(item.lsh))
                continue
            latest[item.lsh] = item  # duplicates inside a batch: the last wins
        inserts: list[Incoming] = []
        updates: list[dict[str, Any]] = []
        with self.engine.begin() as conn:
            known: dict[str, str] = {}
            for chunk in _chunks(list(latest)):
                rows = conn.execute(
                    sa.select(sync_outbox.c.lsh, sync_outbox.c.payload_hash).where(sync_outbox.c.lsh.in_(chunk))
                )
                known.update({r.lsh: r.payload_hash for r in rows})
            for lsh, item in latest.items():
                if lsh not in known:
                    inserts.append(item)
                elif known[lsh] != item.payload_hash:
                    updates.append({**self._incoming_values(item, now), "b_lsh": lsh})
            if inserts:
                self._insert(conn, inserts, now)
            crash_point("mid_enqueue")
            if updates:
                stmt = (
                    sa.update(sync_outbox)
                    .where(sync_outbox.c.lsh == sa.bindparam("b_lsh"))
                    .values({k: sa.bindparam(k) for k in updates[0] if k != "b_lsh"})
                )
                conn.execute(stmt, updates)
            if cursor is not None:
                self._move_cursor(conn, cursor, now)
            # Rows parked at once (local validation, the key_crowd column) start their story here.
            history.insert_attempts(conn, [
                history.attempt_row(i.lsh, {"status": Status(i.status).value, "last_error": i.reason, "updated_at": now})
                for i in inserts if i.status is not Status.PENDING
            ] + [
                history.attempt_row(v["b_lsh"], v) for v in updates if v["status"] != Status.PENDING.value
            ])
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
            [{**self._incoming_values(item, now), "lsh": item.lsh, "first_seen_at": now} for item in items],
        )

    @functools.cached_property
    def _raw_insert(self) -> _RawInsert | None:
        # SQLite only: there SQLAlchemy's executemany processes every parameter of every row
        # in Python (half the cost of a back-fill's INSERT), where the driver loops in C.
        # Other drivers keep SQLAlchemy's path, which batches rows into multi-row INSERTs.
        return _RawInsert.for_dialect(self.engine.dialect) if self._dialect == "sqlite" else None

    @staticmethod
    def _incoming_values(item: Incoming, now: datetime) -> dict[str, Any]:
        status = Status(item.status)
        return {
            "status": status.value,
            "payload": item.payload_json,
            "payload_hash": item.payload_hash,
            "key_crowd": _fit(item.key_crowd, 1),
            "card_type": _fit(item.card_type, 8),
            "card_no": _fit(item.card_no, 64),
            "visit_type": _fit(item.visit_type, 1),
            "settlement_date": item.settlement_date,
            "source_changed_at": _wall(item.source_changed_at),
            "attempts": 0,
            "generic_failures": 0,
            "crashes": 0,
            "first_failed_at": None,
            "next_attempt_at": now if status is Status.PENDING else None,
            "last_error": item.reason,
            "last_http_status": None,
            "updated_at": now,
        }

    # -- dispatch --------------------------------------------------------------------
    def claim_due(self, *, now: datetime, limit: int, owner: str) -> list[Claimed]:
        """Lease up to ``limit`` due rows to ``owner``, oldest due first.

        Concurrent claimers never get the same row: ``FOR UPDATE SKIP LOCKED`` where
        the dialect has it, SQLite's BEGIN IMMEDIATE elsewhere, and the UPDATE only
        takes rows that are still free.
        """
        now = _utc(now)
        if limit <= 0:
            return []
        o = sync_outbox
        free = sa.or_(o.c.lease_until.is_(None), o.c.lease_until < now)
        due = sa.and_(o.c.status.in_(_DUE), o.c.next_attempt_at <= now, free)
        until = now + timedelta(seconds=self.lease_s)
        with self._claim_connection() as conn, conn.begin():
            if self._dialect == "oracle":
                # Oracle refuses FOR UPDATE together with FETCH FIRST (ORA-02014):
                # pick candidates first, then lock those still free.
                candidates = conn.scalars(sa.select(o.c.lsh).where(due).order_by(o.c.next_attempt_at).limit(limit)).all()
                lshs = conn.scalars(
                    sa.select(o.c.lsh).where(o.c.lsh.in_(candidates), due).with_for_update(skip_locked=True)
                ).all() if candidates else []
            else:
                query = sa.select(o.c.lsh).where(due).order_by(o.c.next_attempt_at, o.c.lsh).limit(limit)
                if self._dialect != "sqlite":
                    query = query.with_for_update(skip_locked=_skip_locked_ok(self.engine.dialect))
                lshs = conn.scalars(query).all()
            if not lshs:
                return []
            conn.execute(
                sa.update(o).where(o.c.lsh.in_(lshs), free).values(lease_owner=owner, lease_until=until)
            )
            rows = conn.execute(
                sa.select(
                    o.c.lsh, o.c.payload, o.c.payload_hash, o.c.key_crowd, o.c.card_type, o.c.card_no,
                    o.c.attempts, o.c.generic_failures, o.c.first_failed_at, o.c.next_attempt_at,
                ).where(o.c.lsh.in_(lshs), o.c.lease_owner == owner)
            ).all()
        rows = sorted(rows, key=lambda r: (r.next_attempt_at, r.lsh))
        claims = [
            Claimed(
                lsh=r.lsh, payload_json=r.payload, payload_hash=r.payload_hash, key_crowd=r.key_crowd,
                card_type=r.card_type, card_no=r.card_no, attempts=r.attempts, generic_failures=r.generic_failures,
                first_failed_at=r.first_failed_at, lease_owner=owner,
            )
            for r in rows
        ]
        if claims:
            log.debug("outbox_claimed", count=len(claims), owner=owner)
        return claims

    @contextmanager
    def _claim_connection(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            if self._dialect in ("mysql", "mariadb"):
                # InnoDB's default REPEATABLE READ takes gap locks on the scanned
                # index range, holding up enqueues and other claimers; READ COMMITTED
                # locks only the rows it returns.
                conn = conn.execution_options(isolation_level="READ COMMITTED")
            yield conn

    def record(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Write outcomes in one transaction, each as if alone: only if the row is still ours
        and its payload unchanged; our lease is dropped either way. True per outcome written.

        One commit for many outcomes: the upload threads hand them to one writer instead of
        each holding its slot through a transaction of its own.
        """
        if not outcomes:
            return []
        o = sync_outbox
        written: list[bool] = []
        # Each attempt stays in the history even when its outcome is dropped: it happened.
        tried = [history.attempt_row(item.claimed.lsh, item.values) for item in outcomes]
        with self._outcome_lock, self.engine.begin() as conn:
            for item in outcomes:
                c = item.claimed
                ours = sa.and_(o.c.lsh == c.lsh, o.c.lease_owner == c.lease_owner)
                done = conn.execute(
                    sa.update(o)
                    .where(ours, o.c.payload_hash == c.payload_hash)
                    .values(**item.values, lease_owner=None, lease_until=None)
                ).rowcount
                if not done:
                    # The source changed while uploading (or the lease ran out and the
                    # row went elsewhere): the row keeps its new state, due as it was.
                    conn.execute(sa.update(o).where(ours).values(lease_owner=None, lease_until=None))
                written.append(bool(done))
            history.insert_attempts(conn, tried)
        for item, done in zip(outcomes, written, strict=True):
            if not done:
                log.info("outbox_outcome_dropped", lsh=item.claimed.lsh, reason="payload changed or lease lost")
        return written

    def _finish(self, c: Claimed, values: dict[str, Any]) -> bool:
        """Write the outcome if the row is still ours and unchanged; always drop our lease."""
        return self.record([Outcome(claimed=c, values=values)])[0]

    def sent_outcome(
        self, c: Claimed, *, sent_json: str, key_crowd: str, answer: str, http_status: int | None, now: datetime,
        payload_hash: str | None = None,
    ) -> Outcome:
        """The platform accepted ``c`` (see ``mark_sent``)."""
        now = _utc(now)
        new_hash = payload_hash or c.payload_hash
        return Outcome(
            claimed=c,
            values={
                "status": Status.SENT.value, "sent_at": now, "sent_hash": new_hash, "payload_hash": new_hash,
                "payload": sent_json,
                "key_crowd": _fit(key_crowd, 1), "last_answer": _fit(answer, 200), "last_http_status": http_status,
                "last_error": None, "next_attempt_at": None, "updated_at": now,
            },
        )

    def mark_sent(
        self, c: Claimed, *, sent_json: str, key_crowd: str, answer: str, http_status: int | None, now: datetime,
        payload_hash: str | None = None,
    ) -> bool:
        """The platform accepted ``c``; False when the row changed meanwhile (it stays pending).

        ``payload_hash`` replaces the stored hash when the sent payload was rebuilt at
        dispatch (a requeued record parked invalid by local validation), so the next
        read of the unchanged HIS row finds it current instead of sending it again.
        """
        outcome = self.sent_outcome(
            c, sent_json=sent_json, key_crowd=key_crowd, answer=answer, http_status=http_status, now=now,
            payload_hash=payload_hash,
        )
        return self.record([outcome])[0]

    def failed_outcome(
        self, c: Claimed, *, error: str, http_status: int | None, now: datetime, next_attempt_at: datetime,
        generic: bool,
    ) -> Outcome:
        """A transient failure: try again at ``next_attempt_at``."""
        now = _utc(now)
        o = sync_outbox
        return Outcome(
            claimed=c,
            values={
                "status": Status.FAILED.value, "last_error": error, "last_http_status": http_status,
                "next_attempt_at": _utc(next_attempt_at), "attempts": o.c.attempts + 1,
                "generic_failures": o.c.generic_failures + (1 if generic else 0),
                "first_failed_at": sa.func.coalesce(o.c.first_failed_at, now), "updated_at": now,
            },
        )

    def mark_failed(
        self, c: Claimed, *, error: str, http_status: int | None, now: datetime, next_attempt_at: datetime,
        generic: bool,
    ) -> None:
        """A transient failure: try again at ``next_attempt_at``."""
        self.record([
            self.failed_outcome(
                c, error=error, http_status=http_status, now=now, next_attempt_at=next_attempt_at, generic=generic
            )
        ])

    def dead_outcome(self, c: Claimed, *, error: str, http_status: int | None, now: datetime) -> Outcome:
        """Given up after failing for too long: tried again only on ``retry``."""
        return self._parked(c, Status.DEAD, error=error, http_status=http_status, now=now, attempt=True)

    def invalid_outcome(self, c: Claimed, *, error: str, http_status: int | None, now: datetime) -> Outcome:
        """Rejected by validation: tried again when the source row changes or on ``retry``."""
        return self._parked(c, Status.INVALID, error=error, http_status=http_status, now=now, attempt=True)

    def mark_dead(self, c: Claimed, *, error: str, http_status: int | None, now: datetime) -> None:
        """Given up after failing for too long: tried again only on ``retry``."""
        self.record([self.dead_outcome(c, error=error, http_status=http_status, now=now)])

    def mark_invalid(self, c: Claimed, *, error: str, http_status: int | None, now: datetime) -> None:
        """Rejected by validation: tried again when the source row changes or on ``retry``."""
        self.record([self.invalid_outcome(c, error=error, http_status=http_status, now=now)])

    def mark_skipped(self, c: Claimed, *, reason: str, now: datetime, key_crowd: str | None = "0") -> None:
        """Not in the key population: not uploaded, re-checked by the nightly reconcile.

        ``key_crowd``: what is known ("0"), or None to keep the column as it is (nothing known).
        """
        self.record([
            self._parked(c, Status.SKIPPED, error=reason, http_status=None, now=now, attempt=False, key_crowd=key_crowd)
        ])

    def _parked(
        self, c: Claimed, status: Status, *, error: str, http_status: int | None, now: datetime, attempt: bool,
        key_crowd: str | None = None,
    ) -> Outcome:
        now = _utc(now)
        values: dict[str, Any] = {
            "status": status.value, "last_error": error, "last_http_status": http_status,
            "next_attempt_at": None, "updated_at": now,
        }
        if attempt:
            values["attempts"] = sync_outbox.c.attempts + 1
        if key_crowd is not None:
            values["key_crowd"] = key_crowd
        return Outcome(claimed=c, values=values)

    def record_crash(
        self, c: Claimed, *, error: str, now: datetime, next_attempt_at: datetime, limit: int
    ) -> Status | None:
        """Uploading ``c`` raised where nothing should (a payload edited into broken JSON, a
        bug): ``failed`` until its ``limit``-th crash, then ``invalid`` with ``error``, so a
        poison record stops being tried every cycle. None when the row is no longer ours."""
        now = _utc(now)
        o = sync_outbox
        ours = sa.and_(o.c.lsh == c.lsh, o.c.lease_owner == c.lease_owner, o.c.payload_hash == c.payload_hash)
        with self._outcome_lock, self.engine.begin() as conn:
            crashes = conn.execute(sa.select(o.c.crashes).where(ours)).scalar()
            if crashes is None:
                conn.execute(
                    sa.update(o).where(o.c.lsh == c.lsh, o.c.lease_owner == c.lease_owner)
                    .values(lease_owner=None, lease_until=None)
                )
                return None
            crashes = int(crashes) + 1
            status = Status.INVALID if crashes >= limit else Status.FAILED
            conn.execute(
                sa.update(o).where(ours).values(
                    status=status.value, crashes=crashes, attempts=o.c.attempts + 1, last_error=error,
                    last_http_status=None, updated_at=now, lease_owner=None, lease_until=None,
                    next_attempt_at=None if status is Status.INVALID else _utc(next_attempt_at),
                    first_failed_at=sa.func.coalesce(o.c.first_failed_at, now),
                )
            )
            history.insert_attempts(
                conn, [history.attempt_row(c.lsh, {"status": status.value, "last_error": error, "updated_at": now},
                                           kind="crash")]
            )
        return status

    def release(self, claims: Iterable[Claimed], *, now: datetime) -> None:
        """Drop leases and change nothing else (configuration pause, shutdown)."""
        by_owner: dict[str, list[str]] = {}
        for c in claims:
            by_owner.setdefault(c.lease_owner, []).append(c.lsh)
        if not by_owner:
            return
        o = sync_outbox
        with self.engine.begin() as conn:
            for owner, lshs in by_owner.items():
                for chunk in _chunks(lshs):
                    conn.execute(
                        sa.update(o)
                        .where(o.c.lsh.in_(chunk), o.c.lease_owner == owner)
                        .values(lease_owner=None, lease_until=None)
                    )

    def postpone(self, lshs: Sequence[str], *, until: datetime) -> None:
        """Due rows among ``lshs`` that are free become due only at ``until`` (nothing else
        changes: no attempt is counted). A failed probe of the platform rotates this way."""
        until = _utc(until)
        o = sync_outbox
        with self.engine.begin() as conn:
            for chunk in _chunks(list(lshs)):
                conn.execute(
                    sa.update(o)
                    .where(
                        o.c.lsh.in_(chunk), o.c.status.in_(_DUE), o.c.lease_owner.is_(None),
                        o.c.next_attempt_at < until,
                    )
                    .values(next_attempt_at=until)
                )

    def release_other_leases(self, owner: str) -> int:
        """Drop every lease held by anyone but ``owner``.

        Only for the holder of the instance lock: it is the only process sending, so any
        other lease belongs to a process that died (a crash, SIGKILL, a power cut) and its
        rows would otherwise wait for ``lease_s``. Their uploads may have reached the
        platform; sending them again is harmless (upsert by lsh).
        """
        o = sync_outbox
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    sa.update(o)
                    .where(o.c.lease_owner.is_not(None), o.c.lease_owner != owner)
                    .values(lease_owner=None, lease_until=None)
                ).rowcount
            )

    def release_owner(self, owner: str) -> int:
        """Drop every lease ``owner`` holds (a restarted worker reusing its name)."""
        o = sync_outbox
        with self.engine.begin() as conn:
            return int(
                conn.execute(sa.update(o).where(o.c.lease_owner == owner).values(lease_owner=None, lease_until=None))
                .rowcount
            )

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
        now = _utc(now)
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
        with self.engine.begin() as conn:
            if lshs is None:
                cards = conn.scalars(sa.select(o.c.card_no).where(skipped, *conds).distinct()).all()
                total = conn.execute(sa.update(o).where(*conds).values(values)).rowcount
            else:
                cards = []
                for chunk in _chunks(list(lshs)):
                    cards += conn.scalars(sa.select(o.c.card_no).where(o.c.lsh.in_(chunk), skipped, *conds)).all()
                    total += conn.execute(sa.update(o).where(o.c.lsh.in_(chunk), *conds).values(values)).rowcount
            hashes = sorted({card_hash(c) for c in cards if c})
            for chunk in _chunks(hashes):
                conn.execute(sa.delete(sync_label_cache).where(sync_label_cache.c.card_hash.in_(chunk)))
        log.info("outbox_requeued", count=total)
        return int(total)

    def recheck_skipped(self, *, now: datetime, changed_since: datetime) -> int:
        """Skipped visits of resident ID cards changed since ``changed_since`` (HIS clock) go back
        to pending with the key-population decision forgotten, so the label API is asked again.
        (Other cards are decided by the HIS's key_crowd column: a label lookup cannot change them.)"""
        now = _utc(now)
        o = sync_outbox
        with self.engine.begin() as conn:
            n = conn.execute(
                sa.update(o)
                .where(
                    o.c.status == Status.SKIPPED.value, o.c.source_changed_at >= _wall(changed_since),
                    o.c.card_type == "10",
                )
                .values(
                    status=Status.PENDING.value, key_crowd=None, attempts=0, generic_failures=0,
                    first_failed_at=None, next_attempt_at=now, updated_at=now,
                )
            ).rowcount
        return int(n)

    def next_due_at(self) -> datetime | None:
        """When the next pending or failed row falls due (a leased row: not before its lease ends)."""
        o = sync_outbox
        due_at = sa.case((o.c.lease_until > o.c.next_attempt_at, o.c.lease_until), else_=o.c.next_attempt_at)
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.min(due_at)).where(o.c.status.in_(_DUE))).scalar()
        return value if isinstance(value, datetime) or value is None else None

    # -- runs ----------------------------------------------------------------------------
    def start_run(self, kind: str, *, now: datetime) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.insert(sync_run).values(kind=kind, started_at=_utc(now), host=socket.gethostname()[:255], pid=os.getpid())
            )
            pk = result.inserted_primary_key
        assert pk is not None
        return int(pk[0])

    def finish_run(
        self, run_id: int, *, now: datetime, rows_read: int = 0, enqueued: int = 0, sent: int = 0, failed: int = 0,
        invalid: int = 0, skipped: int = 0, dead: int = 0, error: str | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(sync_run)
                .where(sync_run.c.id == run_id)
                .values(
                    finished_at=_utc(now), rows_read=rows_read, enqueued=enqueued, sent=sent, failed=failed,
                    invalid=invalid, skipped=skipped, dead=dead, error=error,
                )
            )

    # -- status ----------------------------------------------------------------------------
    def summary(self, *, now: datetime) -> Summary:
        now = _utc(now)
        o = sync_outbox
        with self.engine.connect() as conn:
            counts = {s.value: 0 for s in Status}
            for status, n in conn.execute(sa.select(o.c.status, sa.func.count()).group_by(o.c.status)):
                counts[str(status)] = int(n)
            oldest = conn.execute(
                sa.select(sa.func.min(sa.func.coalesce(o.c.first_failed_at, o.c.updated_at))).where(o.c.status.in_(_DUE))
            ).scalar()
            last_sent = conn.execute(sa.select(sa.func.max(o.c.sent_at))).scalar()
            leased = conn.execute(sa.select(sa.func.count()).select_from(o).where(o.c.lease_until > now)).scalar()
            last_run = conn.execute(sa.select(sync_run).order_by(sync_run.c.id.desc()).limit(1)).first()
            last_ok = conn.execute(
                sa.select(sync_run)
                .where(sync_run.c.finished_at.is_not(None), sync_run.c.error.is_(None))
                .order_by(sync_run.c.id.desc())
                .limit(1)
            ).first()
            config_error = self._get_state(conn, "config_error")
            key_form = self._get_state(conn, KEY_FORM_STATE)
            platform_down = self._get_state(conn, PLATFORM_DOWN)
        return Summary(
            counts=counts, oldest_pending_at=oldest, last_sent_at=last_sent, last_run=_row_dict(last_run),
            last_successful_run=_row_dict(last_ok), config_error=config_error, leased=int(leased or 0),
            key_form=key_form, platform_down=platform_down,
        )

    # -- sync_state ----------------------------------------------------------------------------
    @staticmethod
    def _get_state(conn: sa.Connection, name: str) -> dict[str, Any] | None:
        value = conn.execute(sa.select(sync_state.c.value).where(sync_state.c.name == name)).scalar()
        if not value:
            return None
        try:
            data = json.loads(value)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _put_state(self, name: str, value: dict[str, Any] | None, *, now: datetime) -> None:
        text = None if value is None else json.dumps(value, ensure_ascii=False, default=str)
        for attempt in (1, 2):
            try:
                with self.engine.begin() as conn:
                    updated = conn.execute(
                        sa.update(sync_state).where(sync_state.c.name == name).values(value=text, updated_at=_utc(now))
                    ).rowcount
                    if not updated:
                        conn.execute(sa.insert(sync_state).values(name=name, value=text, updated_at=_utc(now)))
                return
            except sa.exc.IntegrityError:
                # Another process inserted the same name first: update it instead.
                if attempt == 2:
                    raise

    def put_his_clock(self, reading: dict[str, Any], *, now: datetime) -> None:
        """Keep the last reading of the HIS clock (``sync.clock.state``) for status and /healthz."""
        self._put_state("his_clock", reading, now=now)

    def get_his_clock(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return self._get_state(conn, "his_clock")

    def set_config_error(self, *, message: str, hint: str, now: datetime) -> None:
        """Hold sending back until the configuration is fixed; ``since`` keeps the first occurrence."""
        previous = self.get_config_error()
        since = previous.get("since") if previous else None
        self._put_state(
            "config_error",
            {"message": message, "hint": hint, "since": since or _utc(now).isoformat(timespec="seconds")},
            now=now,
        )

    def get_platform_down(self) -> dict[str, Any] | None:
        """``{since, reason, probes, next_probe_at}`` (ISO text, UTC) while the platform is unreachable."""
        with self.engine.connect() as conn:
            return self._get_state(conn, PLATFORM_DOWN)

    def set_platform_down(self, *, reason: str, now: datetime, next_probe_at: datetime) -> dict[str, Any]:
        """Record that the platform did not answer (first time or a failed probe): ``since`` keeps the
        first occurrence, ``probes`` counts the failed probes since."""
        previous = self.get_platform_down()
        state = {
            "since": (previous or {}).get("since") or _utc(now).isoformat(timespec="seconds"),
            "reason": reason,
            "probes": int((previous or {}).get("probes") or 0) + (1 if previous else 0),
            "last_failure_at": _utc(now).isoformat(timespec="seconds"),
            "next_probe_at": _utc(next_probe_at).isoformat(timespec="milliseconds"),
        }
        self._put_state(PLATFORM_DOWN, state, now=now)
        return state

    def clear_platform_down(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(sync_state).where(sync_state.c.name == PLATFORM_DOWN))

    def clear_config_error(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(sync_state).where(sync_state.c.name == "config_error"))

    def get_config_error(self) -> dict[str, Any] | None:
        """``{message, hint, since}`` (since: ISO text, UTC) while sending is held back, else None."""
        with self.engine.connect() as conn:
            return self._get_state(conn, "config_error")

    # -- the reading of the app key ---------------------------------------------------------
    def get_key_form(self) -> KeyForm | None:
        """The reading of the app key the platform last accepted, shared by every process."""
        with self.engine.connect() as conn:
            value = self._get_state(conn, KEY_FORM_STATE)
        form = value.get("form") if value else None
        return next((f for f in KEY_FORMS if f == form), None)

    def put_key_form(self, form: KeyForm, *, now: datetime) -> None:
        self._put_state(KEY_FORM_STATE, {"form": form, "accepted_at": _utc(now).isoformat(timespec="seconds")}, now=now)

    def key_form_memory(self) -> KeyFormMemory:
        """For ``Client(key_forms=...)``: the accepted reading kept in ``sync_state``."""
        return _StateKeyFormMemory(self)

    # -- label cache --------------------------------------------------------------------------
    def cache_get(self, card_nos: Sequence[str], *, now: datetime, ttl_s: float) -> dict[str, tuple[str | None]]:
        """Fresh cached labels: card_no -> (label data JSON holding the label codes only, or None
        when the platform returned no data)."""
        by_hash = {card_hash(c): c for c in card_nos}
        fresh_from = _utc(now) - timedelta(seconds=ttl_s)
        t = sync_label_cache
        found: dict[str, tuple[str | None]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(by_hash)):
                rows = conn.execute(
                    sa.select(t.c.card_hash, t.c.labels).where(t.c.card_hash.in_(chunk), t.c.fetched_at >= fresh_from)
                )
                for r in rows:
                    found[by_hash[r.card_hash]] = (_labels_as_data(r.labels),)
        return found

    def cache_put(self, entries: Mapping[str, str | None], *, now: datetime) -> None:
        """Remember labels (card_no -> the label API's data JSON, or None): only the label codes
        are kept, never the name, the ID number or the counties the answer also holds."""
        if not entries:
            return
        now = _utc(now)
        rows: dict[str, dict[str, Any]] = {}
        for card, data in entries.items():
            labels = _label_codes(data)
            rows[card_hash(card)] = {
                "card_hash": card_hash(card), "labels": labels,
                "key_crowd": "1" if labels and any(json.loads(labels).values()) else "0", "fetched_at": now,
            }
        t = sync_label_cache
        for attempt in (1, 2):
            try:
                with self.engine.begin() as conn:
                    # Delete then insert: the same two statements on every dialect.
                    for chunk in _chunks(list(rows)):
                        conn.execute(sa.delete(t).where(t.c.card_hash.in_(chunk)))
                    conn.execute(sa.insert(t), list(rows.values()))
                return
            except sa.exc.IntegrityError:
                # Another process cached the same person at the same moment.
                if attempt == 2:
                    raise

    # -- token ---------------------------------------------------------------------------------
    def token_store(self) -> TokenStore:
        """The login token shared through ``sync_token`` by every thread and process."""
        if self._token_store is None:
            self._token_store = DbTokenStore(self.engine)
        return self._token_store

    # -- single instance -------------------------------------------------------------------------
    def instance_lock(self, *, command: str) -> InstanceLock:
        """Context manager: one crowd-sync per outbox; raises ``AlreadyRunning`` naming the holder."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}

        def read_holder() -> dict[str, Any] | None:
            with self.engine.connect() as conn:
                return self._get_state(conn, "instance")

        def on_acquired() -> None:
            started = datetime.now(UTC).replace(tzinfo=None)
            self._put_state("instance", {**me, "started_at": started.isoformat(timespec="seconds") + "Z"}, now=started)

        def on_released() -> None:
            holder = read_holder()
            if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                with self.engine.begin() as conn:
                    conn.execute(sa.delete(sync_state).where(sync_state.c.name == "instance"))

        return InstanceLock(
            self.engine, command=command, read_holder=read_holder, on_acquired=on_acquired, on_released=on_released
        )

    # -- what people read: failures, one visit's story, the history's retention ------------------
    # (sync.outbox.history holds the queries; `failures`, `show`, `status` and the daemon use these.)
    def problems(self, statuses: Sequence[str], *, since: datetime | None = None) -> list[dict[str, Any]]:
        """Rows in ``statuses`` changed at or after ``since`` (UTC), oldest change first."""
        with self.engine.connect() as conn:
            return history.problems(conn, statuses, since=None if since is None else _utc(since))

    def visit(self, lsh: str) -> dict[str, Any] | None:
        """The whole outbox row of one visit; None when the outbox has none."""
        with self.engine.connect() as conn:
            return history.visit(conn, lsh)

    def attempts(self, lsh: str) -> list[dict[str, Any]]:
        """Each attempt kept for one visit, oldest first (``sync_attempt``)."""
        with self.engine.connect() as conn:
            return history.attempts(conn, lsh)

    def cached_labels(self, card_no: str) -> dict[str, Any] | None:
        """What the label cache holds for one person (codes, key_crowd, fetched_at)."""
        with self.engine.connect() as conn:
            return history.label_cache(conn, card_hash(card_no))

    def count_due(self, *, now: datetime) -> int:
        """Pending and failed rows due by ``now``: what a dispatch has before it."""
        o = sync_outbox
        with self.engine.connect() as conn:
            n = conn.execute(
                sa.select(sa.func.count()).select_from(o).where(o.c.status.in_(_DUE), o.c.next_attempt_at <= _utc(now))
            ).scalar()
        return int(n or 0)

    def prune_history(self, *, now: datetime, keep_runs_days: int, keep_attempts_days: int) -> tuple[int, int]:
        """Delete sync_run and sync_attempt rows past their retention; (runs, attempts) deleted."""
        with self.engine.begin() as conn:
            return history.prune(
                conn, now=_utc(now), keep_runs_days=keep_runs_days, keep_attempts_days=keep_attempts_days
            )

    def put_timezone(self, zone: str, *, offset_minutes: int, now: datetime) -> bool:
        """Keep sync_timezone (read by the DBA views) equal to schedule.timezone."""
        with self.engine.begin() as conn:
            return history.put_timezone(conn, zone=zone, offset_minutes=offset_minutes, now=_utc(now))

    def instance_holder(self) -> dict[str, Any] | None:
        """The process recorded as holding the instance lock (pid, host, command, started_at)."""
        with self.engine.connect() as conn:
            return self._get_state(conn, "instance")

    def put_schedule(self, value: dict[str, Any], *, now: datetime) -> None:
        """The daemon's next poll and next reconcile, for `status`."""
        self._put_state("schedule", value, now=now)

    def get_schedule(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return self._get_state(conn, "schedule")


KEY_FORM_STATE = "app_key_form"


class _StateKeyFormMemory:
    """``sync.upstream.keyform.KeyFormMemory`` on the outbox's ``app_key_form`` state row."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def recall(self) -> KeyForm | None:
        return self._store.get_key_form()

    def remember(self, form: KeyForm) -> None:
        try:
            self._store.put_key_form(form, now=datetime.now(UTC))
        except sa.exc.SQLAlchemyError as exc:
            # Not worth failing an upload for: without it, the next process tries both readings again.
            log.warning(
                "app_key_form_not_saved", form=form, error=type(exc).__name__,
                consequence="the next process to log in tries both readings of the app key again",
            )


class DbTokenStore:
    """``sync.upstream.tokens.TokenStore`` on the single ``sync_token`` row.

    Single flight across threads (a lock in the process) and across processes (a lock
    beside the outbox: a file lock next to a SQLite outbox, a named lock of the database
    server elsewhere), so concurrent renewals cause exactly one login. No outbox
    transaction is open while the login waits on the network: a slow platform never holds
    up the poll or the recording of outcomes (SQLite has a single writer).
    """

    # Longer than any one login (upstream.timeout_s is at most 600 s).
    RENEWAL_WAIT_S = 900.0

    def __init__(self, engine: sa.Engine, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._clock = clock or (lambda: datetime.now(UTC))

    @staticmethod
    def _token(row: sa.Row[Any] | None) -> Token | None:
        if row is None or not row.token or row.expires_at is None:
            return None
        return Token(
            value=row.token,
            obtained_at=(row.obtained_at or row.expires_at).replace(tzinfo=UTC),
            expires_at=row.expires_at.replace(tzinfo=UTC),
        )

    def _select(self) -> sa.Select[Any]:
        t = sync_token
        return sa.select(t.c.token, t.c.obtained_at, t.c.expires_at).where(t.c.id == 1)

    def current(self) -> Token | None:
        with self._engine.connect() as conn:
            return self._token(conn.execute(self._select()).first())

    def renew(self, stale: str | None, login: Callable[[], Token]) -> Token:
        with self._lock:
            guard = renewal_lock(self._engine, wait_s=self.RENEWAL_WAIT_S)
            if guard is None:
                return self._renew_holding_the_row(stale, login)
            try:
                with guard:
                    tok = self.current()
                    if tok is not None and tok.value != stale and tok.valid_at(self._clock()):
                        return tok  # another process renewed it while we waited
                    tok = login()
                    with self._engine.begin() as conn:
                        self._store(conn, tok)
                    return tok
            except TimeoutError as exc:
                raise TransientError(
                    f"the platform login is held up: {exc}",
                    hint="another crowd-sync process is logging in; it is retried at the next cycle",
                ) from None

    def _renew_holding_the_row(self, stale: str | None, login: Callable[[], Token]) -> Token:
        """Where no named lock exists (Oracle): the token row stays locked during the login,
        which holds up other renewers only (Oracle's readers never wait for a row lock)."""
        with self._engine.begin() as conn:
            row = conn.execute(self._select().with_for_update()).first()
            tok = self._token(row)
            if tok is not None and tok.value != stale and tok.valid_at(self._clock()):
                return tok
            tok = login()
            self._store(conn, tok)
            return tok

    def _store(self, conn: sa.Connection, tok: Token) -> None:
        values = {
            "token": tok.value, "obtained_at": _utc(tok.obtained_at), "expires_at": _utc(tok.expires_at),
            "updated_at": _utc(self._clock()),
        }
        if not conn.execute(sa.update(sync_token).where(sync_token.c.id == 1).values(values)).rowcount:
            # The migration inserts the row; recreate it if someone deleted it.
            conn.execute(sa.insert(sync_token).values(id=1, **values))
        log.info("token_stored", expires_at=tok.expires_at.isoformat())

    def discard(self, value: str) -> None:
        with self._lock, self._engine.begin() as conn:
            conn.execute(
                sa.update(sync_token)
                .where(sync_token.c.id == 1, sync_token.c.token == value)
                .values(token=None, obtained_at=None, expires_at=None, updated_at=_utc(self._clock()))
            )
