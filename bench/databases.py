"""Scratch databases for the benchmark: SQLite files in a temporary directory and MariaDB
databases created here and dropped at the end (the seeded vendor HIS is kept: bench/vendor.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import sqlalchemy as sa

MARIADB = "mysql+pymysql://root@127.0.0.1:3306"
PREFIX = "crowd_sync_bench_"


def mariadb_url(database: str) -> str:
    return f"{MARIADB}/{database}?charset=utf8mb4"


class Databases:
    """Fresh databases for each measurement."""

    def __init__(self, *, mariadb: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="crowd-sync-bench-"))
        self.mariadb = mariadb
        self._created: list[str] = []
        self._server = sa.create_engine(MARIADB + "/", isolation_level="AUTOCOMMIT") if mariadb else None

    def url(self, backend: str, name: str) -> str:
        """A new, empty database ``name`` on ``backend`` (sqlite or mariadb)."""
        if backend == "sqlite":
            path = self.dir / f"{name}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return f"sqlite:///{path}"
        if self._server is None:
            raise RuntimeError("MariaDB is off for this run (--no-mariadb)")
        db = PREFIX + name
        with self._server.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db}")
            conn.exec_driver_sql(f"CREATE DATABASE {db} CHARACTER SET utf8mb4")
        self._created.append(db)
        return mariadb_url(db)

    def close(self) -> None:
        if self._server is not None:
            with self._server.connect() as conn:
                for db in self._created:
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db}")
            self._server.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)
