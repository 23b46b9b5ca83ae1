"""What a database error means to whoever called: wait and try again, or fix the settings.

One classification for both databases crowd-sync talks to (the HIS through ``his.py``,
the outbox through ``outbox/store.py``), across the drivers it supports:

- transient: lock waits, deadlocks, a killed or timed-out statement, a server going
  down or refusing connections for a while; waiting helps (exit 75);
- refused: the account, its password or the database name is wrong; waiting does
  not help, the settings must change (exit 2).

The messages are the driver's own, without the SQL text and parameters SQLAlchemy
appends, and with passwords, secrets and ID numbers redacted.
"""

from __future__ import annotations

import sqlalchemy as sa

from sync.logs import redact

# DisconnectionError is the pool's own signal of a dead connection; it is no DBAPIError.
DB_ERRORS = (sa.exc.DBAPIError, sa.exc.DisconnectionError)

# Database errors that pass by themselves: lock waits, deadlocks, a killed or
# timed-out statement, a server going down or refusing connections for a while.
_MYSQL_TRANSIENT = frozenset({1040, 1053, 1205, 1213, 1317, 1927, 2002, 2003, 2006, 2013, 2055, 3024, 4031})
_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57")
_TRANSIENT_TEXT = (
    "database is locked",  # SQLite: another process holds the write lock
    "ORA-03113", "ORA-03114", "ORA-03135", "ORA-12170", "ORA-12541", "ORA-12543", "ORA-01013",
    "DPY-4011", "DPY-6005",  # python-oracledb thin mode: connection closed / cannot connect
    "Adaptive Server connection failed", "Unable to connect", "Read from the server failed",
)
# Connection failures that will not pass by waiting: the account or database is wrong.
_MYSQL_AUTH = frozenset({1044, 1045, 1049, 1698})
_AUTH_TEXT = (
    "password authentication failed", "no pg_hba.conf entry", "does not exist",  # PostgreSQL
    "ORA-01017", "ORA-12514", "ORA-28000", "ORA-28001",  # Oracle: credentials, service name, locked, expired
    "Login failed",  # SQL Server 18456
)

# The optional dependency (pyproject extra) that brings each database driver.
DRIVER_EXTRAS = {
    "pymysql": "mysql",
    "oracledb": "oracle",
    "cx_oracle": "cx_oracle",
    "pymssql": "mssql",
    "psycopg2": "postgresql",
}


def message(exc: BaseException) -> str:
    """The driver's own message, redacted, on one line."""
    orig = getattr(exc, "orig", None)
    text = " ".join(str(orig).split()) if orig is not None else str(exc).split("\n")[0]
    return redact(text)[:500]


def mysql_code(exc: BaseException) -> int | None:
    """The MySQL/MariaDB error number, or None for any other driver."""
    orig = getattr(exc, "orig", None)
    # Only MySQL drivers: other drivers' numbers (SQL Server's) mean other things.
    if orig is None or not type(orig).__module__.startswith(("pymysql", "MySQLdb")):
        return None
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether waiting is likely to help: the same statement may well work a little later."""
    if isinstance(exc, sa.exc.DisconnectionError) or getattr(exc, "connection_invalidated", False):
        return True
    if mysql_code(exc) in _MYSQL_TRANSIENT:
        return True
    orig = getattr(exc, "orig", None)
    pgcode = getattr(orig, "pgcode", None)
    if isinstance(pgcode, str) and pgcode.startswith(_PG_TRANSIENT_CLASSES):
        return True
    text = str(orig if orig is not None else exc).lower()
    return any(t.lower() in text for t in _TRANSIENT_TEXT)


def is_refused(exc: BaseException) -> bool:
    """Whether the server refused the account, its password or the database name."""
    if mysql_code(exc) in _MYSQL_AUTH:
        return True
    text = message(exc).lower()
    return any(t.lower() in text for t in _AUTH_TEXT)


def install_hint(driver: str) -> str:
    """How to install a missing database driver."""
    extra = DRIVER_EXTRAS.get(driver.lower())
    if extra is None:
        return f"install the Python package of driver {driver!r}, or pick a driver that is installed"
    return (
        f"install the driver: ./run.sh install --extras {extra} (or pip install 'crowd-sync[{extra}]'); "
        "the offline bundle has it already"
    )
