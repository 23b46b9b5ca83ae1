"""What crowd-sync leaves on disk and in a debug log: its files readable by its own user only
whatever the umask, no SQL parameters in any log line, no names in the label cache."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from sync.app import make_pipeline
from sync.logs import configure
from sync.outbox.store import Store
from sync.upstream.simulator import SimConfig, Simulator
from tests.e2e.test_cli import crowd_sync
from tests.support import His, his_now, make_visit, write_settings

ID_LABELLED = "510104199001011230"
NAME = "欧阳明月"
LABEL_NAME = "农村低保对象（测试）"


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        s.add_person(ID_LABELLED, xm=NAME, jjxBq=[{"code": "J01.02", "name": LABEL_NAME, "remark": None,
                                                   "attr1": "0", "attr2": None}])
        yield s


def test_the_outbox_its_journal_and_lock_are_private_under_umask_022(tmp_path: Path) -> None:
    with umask(0o022):
        store = Store(f"sqlite:///{tmp_path / 'var' / 'data' / 'outbox.db'}")
        try:
            store.ensure_schema()
            with store.instance_lock(command="once"):
                store.state.set_config_error(message="m", hint="h", now=datetime(2026, 1, 1))
                data = tmp_path / "var" / "data"
                wal, shm = data / "outbox.db-wal", data / "outbox.db-shm"
                assert wal.exists() and shm.exists()  # WAL mode: both live while the outbox is open
                files = {p.name: mode(p) for p in (data / "outbox.db", wal, shm, data / "outbox.db.lock")}
        finally:
            store.dispose()
    assert files == dict.fromkeys(("outbox.db", "outbox.db-wal", "outbox.db-shm", "outbox.db.lock"), 0o600)
    assert (mode(tmp_path / "var"), mode(tmp_path / "var" / "data")) == (0o700, 0o700)


def test_a_hand_run_under_umask_022_creates_nothing_readable_by_others(tmp_path: Path, sim: Simulator) -> None:
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    his.insert([make_visit(1, changed=his_now() - timedelta(minutes=5))])
    his.dispose()
    write_settings(tmp_path / "settings.yaml", his_url="sqlite:///his.db", outbox_url="sqlite:///state/outbox.db",
                   base_url=sim.url)
    month = (his_now() - timedelta(minutes=5)).strftime("%Y-%m")
    with umask(0o022):
        once = crowd_sync("once", "--config", "settings.yaml", cwd=tmp_path)
        report = crowd_sync("report", "--month", month, "--csv", "report.csv", "--config", "settings.yaml", cwd=tmp_path)
    assert once.returncode == 0, once.stderr
    assert report.returncode == 0, report.stderr
    assert mode(tmp_path / "state") == 0o700
    created = [tmp_path / "state" / "outbox.db", tmp_path / "state" / "outbox.db.lock", tmp_path / "report.csv"]
    assert {p.name: mode(p) for p in created} == {p.name: 0o600 for p in created}


def test_a_debug_log_shows_no_sql_parameters_and_the_label_cache_no_name(tmp_path: Path, sim: Simulator) -> None:
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    his.insert([make_visit(1, changed=his_now() - timedelta(minutes=5), id_no=ID_LABELLED)])
    his.dispose()
    settings = write_settings(
        tmp_path / "settings.yaml", his_url=f"sqlite:///{tmp_path / 'his.db'}",
        outbox_url=f"sqlite:///{tmp_path / 'outbox.db'}", base_url=sim.url,
        overrides={"key_crowd": {"source": "lookup"}, "log": {"level": "debug"}},
    )
    stream = io.StringIO()
    configure(level="debug", fmt="json", stream=stream)
    store = Store(settings.outbox.url.get_secret_value())
    try:
        store.ensure_schema()
        pipeline = make_pipeline(settings, store)
        try:
            stats = pipeline.cycle()
        finally:
            pipeline.close()
        with store.engine.connect() as conn:
            cached = " ".join(str(v) for row in conn.exec_driver_sql("SELECT * FROM sync_label_cache") for v in row)
    finally:
        store.dispose()
        configure(level="warning", fmt="json")
    text = stream.getvalue()
    assert stats.sent == 1 and stats.lookups == 1, stats
    assert "INSERT INTO sync_label_cache" in text  # the statements are logged at debug...
    assert "SQL parameters hidden" in text  # ...their parameters never
    for private in (NAME, LABEL_NAME):
        assert private not in text, private
    assert "J01.02" in cached
    for private in (NAME, LABEL_NAME, ID_LABELLED):
        assert private not in cached, private
