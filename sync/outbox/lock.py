"""One crowd-sync per outbox: the instance lock, per database dialect.

Every variant is a lock the operating system or the database server drops when
the holding process dies, SIGKILL included, so a restart by systemd never finds
a stale lock:

- SQLite file: ``fcntl.flock`` on ``<database file>.lock`` (in-memory SQLite: a
  lock inside this process, since no other process can see that database);
- MySQL/MariaDB: ``GET_LOCK('crowd_sync:<database>', 0)`` on a dedicated connection;
- PostgreSQL: ``pg_try_advisory_lock(<64-bit key of 'crowd_sync:<database>'>)`` on a
  dedicated connection;
- SQL Server: ``sp_getapplock`` owned by a dedicated session; Oracle: ``SELECT ...
  FOR UPDATE NOWAIT`` of a ``sync_state`` row in a dedicated transaction. These two
  are best effort and not exercised by the test suite.

Who holds the lock (pid, host, since, command) is recorded in ``sync_state`` by
the store, so a refused second instance can say which process to look at.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy as sa
import structlog

from sync.errors import ConfigError, TransientError
from sync.files import open_private

log = structlog.get_logger(__name__)

# MySQL lock names are limited to 64 characters.
_MYSQL_NAME_MAX = 64
# A year: MySQL closes idle sessions after wait_timeout (8 h by default), which
# would silently drop a lock held by an idle daemon connection.
_MYSQL_IDLE_S = 31_536_000

_memory_locks: set[str] = set()
_memory_guard = threading.Lock()


class AlreadyRunning(ConfigError):
    """Another crowd-sync process holds the instance lock of this outbox."""


def lock_name(url: sa.URL) -> str:
    """``crowd_sync:<database>``: one name per outbox database."""
    return f"crowd_sync:{url.database or ''}"


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory locks."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "the holder has not recorded itself yet"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started_at', '?')}"
        f" (command {holder.get('command', '?')})"
    )


class InstanceLock:
    """Context manager holding the instance lock for the life of the process.

    ``read_holder`` tells who holds the lock when it is refused; ``on_acquired``
    and ``on_released`` let the store record and clear this process as the holder.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        command: str,
        read_holder: Callable[[], dict[str, Any] | None],
        on_acquired: Callable[[], None],
        on_released: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.command = command
        self.name = lock_name(engine.url)
        self._read_holder = read_holder
        self._on_acquired = on_acquired
        self._on_released = on_released
        self._fd: int | None = None
        self._path: Path | None = None
        self._conn: sa.Connection | None = None
        self._memory_key: str | None = None
        self._held = False

    # -- public ---------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> None:
        """Take the lock at once or raise ``AlreadyRunning`` naming the running process."""
        if self._held:
            return
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            got = self._acquire_sqlite()
        elif dialect in ("mysql", "mariadb"):
            got = self._acquire_on_connection(self._try_mysql)
        elif dialect == "postgresql":
            got = self._acquire_on_connection(self._try_postgres)
        elif dialect == "mssql":
            got = self._acquire_on_connection(self._try_mssql)
        elif dialect == "oracle":
            got = self._acquire_on_connection(self._try_oracle)
        else:
            log.warning("instance_lock_unsupported", dialect=dialect)
            got = True
        if not got:
            try:
                holder = self._read_holder()
            except sa.exc.SQLAlchemyError:
                holder = None  # no schema yet: the refusal still stands
            raise AlreadyRunning(
                f"another crowd-sync is already running on this outbox (lock {self.name}): {describe_holder(holder)}",
                hint="stop that process first (e.g. `systemctl stop crowd-sync`), or wait until it has finished",
            )
        self._held = True
        log.info("instance_lock_acquired", lock=self.name, command=self.command)
        try:
            self._on_acquired()
        except sa.exc.SQLAlchemyError as exc:
            # The lock is what matters; the record of who holds it is a courtesy
            # (and needs the schema, which may not exist yet).
            log.warning("instance_record_failed", lock=self.name, error=str(exc.__class__.__name__))

    def ensure(self) -> None:
        """Return only while the lock is ours; called before each cycle and each dispatch.

        A lock lost meanwhile (its server session killed or timed out, its lock file deleted)
        is taken again if it is free; ``AlreadyRunning`` if another process took it, so that
        this one stops instead of sending beside it; ``TransientError`` if the outbox cannot
        be asked now (nothing is sent until it can).
        """
        if self.still_held():
            return
        if self._held:
            log.error(
                "instance_lock_lost", lock=self.name, command=self.command,
                fix="sending stops until the lock is ours again; check the outbox server's connection limits "
                "and timeouts (a DBA's KILL, wait_timeout, a restart)",
            )
            self.release()
        try:
            self.acquire()
        except AlreadyRunning:
            log.error("instance_lock_taken", lock=self.name, command=self.command)
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise TransientError(
                f"实例锁丢失且暂时无法重新获取 / the instance lock {self.name} was lost and cannot be taken again now: {type(exc).__name__}",
                hint="重新获取前不发送任何记录；检查 outbox 数据库能否访问 / nothing is sent until it is; check that the outbox database is reachable",
            ) from None
        log.warning("instance_lock_reacquired", lock=self.name, command=self.command)

    def still_held(self) -> bool:
        """Whether the lock is still ours (a server-side lock dies with its connection)."""
        if not self._held:
            return False
        if self._fd is not None and self._path is not None:
            # flock holds the file we opened: a lock file deleted (or replaced) since is
            # one another process can create and lock again.
            try:
                ours, there = os.fstat(self._fd), os.stat(self._path)
            except OSError:
                return False
            return (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino)
        if self._conn is None:
            return True
        dialect = self.engine.dialect.name
        # Ask the server whether this session holds the lock: a dropped connection
        # would be replaced silently by one that does not.
        if dialect in ("mysql", "mariadb"):
            query, params = "SELECT IS_USED_LOCK(:name) = CONNECTION_ID()", {"name": self.name[:_MYSQL_NAME_MAX]}
        elif dialect == "postgresql":
            query, params = (
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()",
                {},
            )
        elif dialect == "mssql":
            query, params = "SELECT CASE WHEN APPLOCK_MODE('public', :name, 'Session') = 'Exclusive' THEN 1 ELSE 0 END", {
                "name": self.name
            }
        else:
            query, params = "SELECT 1 FROM dual", {}
        try:
            answer = self._conn.execute(sa.text(query), params).scalar()
            if dialect != "oracle":
                self._conn.commit()
        except sa.exc.DBAPIError:
            return False
        return bool(answer)

    def release(self) -> None:
        if not self._held:
            return
        with contextlib.suppress(Exception):
            self._on_released()
        self._held = False
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self._path = None
        if self._memory_key is not None:
            with _memory_guard:
                _memory_locks.discard(self._memory_key)
            self._memory_key = None
        if self._conn is not None:
            # Closing the session is what releases GET_LOCK, the advisory lock,
            # the applock and Oracle's row lock alike; invalidate so the pool
            # never hands the session out again.
            with contextlib.suppress(Exception):
                self._conn.invalidate()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        log.info("instance_lock_released", lock=self.name)

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # -- per dialect ------------------------------------------------------------
    def _acquire_sqlite(self) -> bool:
        database = self.engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            key = f"memory:{id(self.engine)}"
            with _memory_guard:
                if key in _memory_locks:
                    return False
                _memory_locks.add(key)
            self._memory_key = key
            return True
        path = Path(database).resolve().with_name(Path(database).name + ".lock")
        fd = open_private(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        self._path = path
        return True

    def _acquire_on_connection(self, attempt: Callable[[sa.Connection], bool]) -> bool:
        conn = self.engine.connect()
        try:
            got = attempt(conn)
        except Exception:
            conn.invalidate()
            conn.close()
            raise
        if not got:
            conn.invalidate()
            conn.close()
            return False
        self._conn = conn
        return True

    def _try_mysql(self, conn: sa.Connection) -> bool:
        conn.exec_driver_sql(f"SET SESSION wait_timeout = {_MYSQL_IDLE_S}")
        got = conn.execute(sa.text("SELECT GET_LOCK(:name, 0)"), {"name": self.name[:_MYSQL_NAME_MAX]}).scalar()
        conn.commit()
        return bool(got == 1)

    def _try_postgres(self, conn: sa.Connection) -> bool:
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": advisory_key(self.name)}).scalar()
        # Session-level advisory locks outlive the transaction: end it so the
        # dedicated connection does not sit "idle in transaction".
        conn.commit()
        return bool(got)

    def _try_mssql(self, conn: sa.Connection) -> bool:
        result = conn.execute(
            sa.text(
                "DECLARE @r int; "
                "EXEC @r = sp_getapplock @Resource = :name, @LockMode = 'Exclusive', "
                "@LockOwner = 'Session', @LockTimeout = 0; SELECT @r"
            ),
            {"name": self.name},
        ).scalar()
        conn.commit()
        return result is not None and int(result) >= 0

    def _try_oracle(self, conn: sa.Connection) -> bool:
        from sync.outbox.schema import sync_state

        # The locked row must exist; create it in its own committed transaction.
        with contextlib.suppress(sa.exc.IntegrityError), self.engine.begin() as setup:
            exists = setup.execute(sa.select(sync_state.c.name).where(sync_state.c.name == "instance_lock")).first()
            if exists is None:
                setup.execute(sa.insert(sync_state).values(name="instance_lock"))
        try:
            conn.execute(
                sa.select(sync_state.c.name).where(sync_state.c.name == "instance_lock").with_for_update(nowait=True)
            ).first()
        except sa.exc.DBAPIError:
            # ORA-00054: resource busy; the transaction stays open on success only.
            return False
        return True


# -- the token renewal lock ---------------------------------------------------------------------


def renewal_lock(
    engine: sa.Engine, *, wait_s: float, scope: str = ""
) -> contextlib.AbstractContextManager[None] | None:
    """A lock that one process at a time holds while it logs in, outside any outbox transaction:
    a file lock beside a SQLite outbox, a named lock of the server elsewhere. None where there is
    no such lock (Oracle, whose users cannot be assumed to have DBMS_LOCK): the caller then
    locks the token row instead, which on Oracle blocks no reader. Raises ``TimeoutError``
    when another process holds it longer than ``wait_s``. ``scope``: whose login (each
    institution's token is renewed apart; empty for the first, as before)."""
    dialect = engine.dialect.name
    # The scope first: MySQL cuts long lock names at the end.
    name = (f"{scope}:" if scope else "") + "crowd_sync_token:" + (engine.url.database or "")
    if dialect == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return contextlib.nullcontext()  # no other process can open this database
        path = Path(database).expanduser().resolve()
        suffix = f".{hashlib.sha256(scope.encode()).hexdigest()[:12]}" if scope else ""
        return _file_lock(path.with_name(path.name + ".token-lock" + suffix), wait_s)
    if dialect in ("mysql", "mariadb"):
        return _server_lock(
            engine, wait_s,
            # Waits up to a second on the server each time: fewer round trips than polling.
            take=("SELECT GET_LOCK(:name, 1)", {"name": name[:_MYSQL_NAME_MAX]}),
            free=("SELECT RELEASE_LOCK(:name)", {"name": name[:_MYSQL_NAME_MAX]}),
        )
    if dialect == "postgresql":
        key = advisory_key(name)
        return _server_lock(
            engine, wait_s,
            take=("SELECT pg_try_advisory_lock(:key)", {"key": key}),
            free=("SELECT pg_advisory_unlock(:key)", {"key": key}),
        )
    if dialect == "mssql":
        return _server_lock(
            engine, wait_s,
            take=(
                "DECLARE @r int; EXEC @r = sp_getapplock @Resource = :name, @LockMode = 'Exclusive', "
                "@LockOwner = 'Session', @LockTimeout = 0; SELECT CASE WHEN @r >= 0 THEN 1 ELSE 0 END",
                {"name": name},
            ),
            free=("EXEC sp_releaseapplock @Resource = :name, @LockOwner = 'Session'; SELECT 1", {"name": name}),
        )
    return None


_POLL_S = 0.05


@contextlib.contextmanager
def _file_lock(path: Path, wait_s: float) -> Iterator[None]:
    fd = open_private(path)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} held by another process for over {wait_s:g} s") from None
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _server_lock(
    engine: sa.Engine, wait_s: float, *, take: tuple[str, dict[str, Any]], free: tuple[str, dict[str, Any]]
) -> Iterator[None]:
    """A session-level named lock on a connection of its own. Each statement is committed at
    once: the connection holds no transaction, hence no lock on any table, while it waits."""
    with engine.connect() as conn:
        deadline = time.monotonic() + wait_s
        while True:
            got = conn.execute(sa.text(take[0]), take[1]).scalar()
            conn.commit()
            if got in (1, True):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the lock {take[1]} held by another process for over {wait_s:g} s")
            time.sleep(_POLL_S)
        try:
            yield
        finally:
            try:
                conn.execute(sa.text(free[0]), free[1]).scalar()
                conn.commit()
            except sa.exc.DBAPIError:
                # The server drops a session's named locks with the session: make sure it goes.
                conn.invalidate()


# -- is the lock held? (for `status`) --------------------------------------------------------------


def holder_alive(engine: sa.Engine) -> bool | None:
    """Whether some process holds this outbox's instance lock, asked of the lock itself and
    without taking it (taking it, even for a moment, could turn away a service starting
    just then). None when it cannot be told (an in-memory SQLite outbox, Oracle, SQL
    Server, no /proc/locks)."""
    dialect = engine.dialect.name
    name = lock_name(engine.url)
    try:
        if dialect == "sqlite":
            return _flock_held(engine.url.database)
        if dialect in ("mysql", "mariadb"):
            with engine.connect() as conn:
                holder = conn.execute(sa.text("SELECT IS_USED_LOCK(:name)"), {"name": name[:_MYSQL_NAME_MAX]}).scalar()
            return holder is not None
        if dialect == "postgresql":
            # A bigint advisory lock shows in pg_locks as classid (high 32 bits), objid (low), objsubid 1.
            key = advisory_key(name) & 0xFFFFFFFFFFFFFFFF
            with engine.connect() as conn:
                n = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                        "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database() "
                        "AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"
                    ),
                    {"hi": key >> 32, "lo": key & 0xFFFFFFFF},
                ).scalar()
            return bool(n)
    except sa.exc.DBAPIError:
        return None
    return None


def _flock_held(database: str | None) -> bool | None:
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).resolve().with_name(Path(database).name + ".lock")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False  # never locked here (the lock file is made by the first run)
    except OSError:
        return None
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF" (blocked waiters are "-> FLOCK ...")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            return True
    return False
