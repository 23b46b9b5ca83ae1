"""Shared fixtures: real MariaDB and PostgreSQL databases, created per test session; the
built-in platform simulator; the process's logging set-up put back after a test changed it.

Integration tests use the machine's servers for real. When a server is absent
they are skipped with the reason, except in CI (CI=true) where absence fails.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
import structlog

from sync.upstream.simulator import SimConfig, Simulator

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Code under test that logs before any ``logs.configure`` (pipelines built in-process) goes through
# structlog's default set-up, whose console renderer draws each traceback with rich: locals,
# highlighted source, a second or more per traceback. The product's own console format renders
# them as plain text (sync/logs.py); so does this process. Only the exception formatter changes.
structlog.configure(
    processors=[
        *structlog.get_config()["processors"][:-1],
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
    ]
)

MARIADB_ADMIN = os.environ.get("CROWD_SYNC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
POSTGRES_ADMIN = os.environ.get("CROWD_SYNC_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _unavailable(what: str, how: str) -> None:
    message = f"{what} is not reachable on 127.0.0.1; start it with: {how}"
    if IN_CI:
        pytest.fail(f"CI needs the real server: {message}")
    pytest.skip(message)


def _fresh_database(
    admin_url: str, dialect: str, *, collation: str = "utf8mb4_unicode_ci", encoding: str = "UTF8"
) -> Iterator[str]:
    name = f"cs_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if dialect == "mysql":
                conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE {collation}")
            else:
                locale = " LC_COLLATE 'C' LC_CTYPE 'C'" if encoding == "SQL_ASCII" else ""
                conn.exec_driver_sql(f"CREATE DATABASE {name} ENCODING '{encoding}'{locale} TEMPLATE template0")
        url = sa.engine.make_url(admin_url).set(database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if dialect == "mysql":
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """URL of an empty MariaDB database, dropped after the test."""
    if not _port_open("127.0.0.1", 3306):
        _unavailable(
            "MariaDB", "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql"
        )
    yield from _fresh_database(MARIADB_ADMIN, "mysql")


@pytest.fixture
def mariadb_general_ci_url() -> Iterator[str]:
    """An empty MariaDB database with the server's default collation utf8mb4_general_ci, which
    compares text case-insensitively (as most installs' databases do)."""
    if not _port_open("127.0.0.1", 3306):
        _unavailable(
            "MariaDB", "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql"
        )
    yield from _fresh_database(MARIADB_ADMIN, "mysql", collation="utf8mb4_general_ci")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of an empty PostgreSQL database, dropped after the test."""
    if not _port_open("127.0.0.1", 5432):
        _unavailable(
            "PostgreSQL", "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        )
    yield from _fresh_database(POSTGRES_ADMIN, "postgresql")


@pytest.fixture
def postgres_sql_ascii_url() -> Iterator[str]:
    """An empty PostgreSQL database created with ENCODING 'SQL_ASCII', as old HIS installs are:
    the server stores and returns bytes unchecked, whatever their encoding."""
    if not _port_open("127.0.0.1", 5432):
        _unavailable(
            "PostgreSQL", "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        )
    yield from _fresh_database(POSTGRES_ADMIN, "postgresql", encoding="SQL_ASCII")


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    """URL of an empty SQLite database file in the test's temporary directory."""
    return f"sqlite:///{os.path.join(tmp_path, 'outbox.db')}"


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """The same test on SQLite, MariaDB and PostgreSQL."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """The built-in platform simulator on loopback, with the document's test institution."""
    with Simulator(SimConfig()) as s:
        yield s


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``cli.main`` configures logging for a process; put this process's set-up back afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
