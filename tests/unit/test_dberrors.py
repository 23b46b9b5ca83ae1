"""What the outbox's database errors mean to the operator: real errors from real drivers."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync.errors import ConfigError, TransientError
from sync.outbox.engine import describe_error
from sync.outbox.store import Store


def _error_of(url: str, statement: str = "SELECT 1") -> Exception:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(statement)
    except sa.exc.SQLAlchemyError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("no error")


@pytest.fixture(name="closed_port")
def closed_port_fixture() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_a_server_that_is_down_is_transient_and_named_without_its_password(closed_port: int) -> None:
    url = f"mysql+pymysql://crowd:Pw-in-url-1@127.0.0.1:{closed_port}/outbox"
    described = describe_error(_error_of(url), url)
    assert isinstance(described, TransientError)
    assert f"127.0.0.1:{closed_port}/outbox" in described.message and "Pw-in-url-1" not in str(described)
    assert "outbox.url" in described.hint


def test_a_sqlite_file_that_cannot_be_opened_is_a_configuration_error(tmp_path: Path) -> None:
    # What a directory without write permission gives too: "unable to open database file".
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'outbox.db'}"
    described = describe_error(_error_of(url), url)
    assert isinstance(described, ConfigError)
    assert str(tmp_path / "no-such-dir" / "outbox.db") in described.message
    assert "ls -ld" in described.hint


def test_a_locked_sqlite_file_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
        with pytest.raises(sa.exc.OperationalError) as raised, engine.connect() as conn:
            conn.exec_driver_sql("SELECT * FROM sqlite_master")
        engine.dispose()
    finally:
        holder.close()
    assert isinstance(describe_error(raised.value, f"sqlite:///{path}"), TransientError)


def test_a_schema_changed_by_hand_is_left_to_the_unexpected_error_path(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    assert describe_error(_error_of(url, "SELECT * FROM sync_outbox"), url) is None  # no such table
    assert describe_error(ValueError("not a database error"), url) is None


def test_a_read_only_store_never_creates_the_file_or_its_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Store(f"sqlite:///{tmp_path / 'state' / 'outbox.db'}", create=False)
    assert not (tmp_path / "state").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        Store(f"sqlite:///{tmp_path / 'file' / 'outbox.db'}", create=False)
