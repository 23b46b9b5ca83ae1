"""The HIS misbehaving under a running pipeline, on the real MariaDB: a connection a
DBA kills in the middle of a poll, and every connection dropped as a server restart
drops them. The outbox is SQLite and the platform the in-process simulator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync.app import make_client, make_pipeline
from sync.errors import TransientError
from sync.outbox.schema import sync_outbox, sync_run
from sync.outbox.store import Store
from sync.upstream.simulator import SimConfig, Simulator
from tests.support import HIS_QUERY, His, capture_all_logs, expected_payload, his_now, make_visit, write_settings

# Each row costs the server `delay` seconds, so a poll is still streaming when it is killed.
# The index lets MariaDB send rows in cursor order as it finds them instead of sorting first.
SLOW_QUERY = HIS_QUERY.replace(
    "FROM his_settlement", "FROM his_settlement FORCE INDEX (ix_his_changed_serial)"
).rstrip() + " AND SLEEP((SELECT delay FROM his_knob)) = 0\n"
ROW_DELAY_S = 0.01


class Setup:
    def __init__(self, tmp: Path, his_url: str, sim: Simulator, *, lookback_s: int) -> None:
        self.sim = sim
        self.his = His(his_url)
        self.database = sa.make_url(his_url).database or ""
        with self.his.engine.begin() as conn:
            conn.exec_driver_sql("CREATE INDEX ix_his_changed_serial ON his_settlement (changed, serial_no)")
            conn.exec_driver_sql("CREATE TABLE his_knob (delay DOUBLE NOT NULL)")
            conn.exec_driver_sql(f"INSERT INTO his_knob VALUES ({ROW_DELAY_S})")
        self.settings = write_settings(
            tmp / "settings.yaml", his_url=his_url, outbox_url=f"sqlite:///{tmp / 'outbox.db'}", base_url=sim.url,
            overrides={"his": {"query": SLOW_QUERY, "batch_size": 20, "lookback_s": lookback_s}},
        )
        self.store = Store(self.settings.outbox.url.get_secret_value(), lease_s=60)
        self.store.ensure_schema()
        self.client = make_client(self.settings, self.store)
        self.pipeline = make_pipeline(self.settings, self.store, client=self.client)
        # The DBA's own session: excluded from every KILL by CONNECTION_ID().
        self.admin = sa.create_engine(his_url, isolation_level="AUTOCOMMIT")
        self.base = his_now() - timedelta(minutes=50)

    def visits(self, first: int, last: int, *, changed: datetime | None = None) -> list[dict[str, Any]]:
        """Visits inserted into the HIS: settled 5 s apart in the last hour, or all at ``changed``."""
        rows = [
            make_visit(n, changed=changed or self.base + timedelta(seconds=5 * n)) for n in range(first, last + 1)
        ]
        self.his.insert(rows)
        # Our own inserting connection is not the pipeline's: leave only the pipeline's to kill.
        self.his.engine.dispose()
        return rows

    def kill(self, *, only_running: bool) -> int:
        """KILL the HIS database's sessions: the one running a query, or all of them (a restart)."""
        sql = "SELECT id FROM information_schema.processlist WHERE db = :db AND id <> CONNECTION_ID()"
        if only_running:
            sql += " AND command = 'Query'"
        with self.admin.connect() as conn:
            ids = conn.execute(sa.text(sql), {"db": self.database}).scalars().all()
            for session_id in ids:
                conn.exec_driver_sql(f"KILL CONNECTION {int(session_id)}")
        return len(ids)

    def fast(self) -> None:
        """The HIS answers at full speed again."""
        with self.his.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE his_knob SET delay = 0")
        self.his.engine.dispose()

    def outbox_rows(self) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(sync_outbox)).scalar_one())

    def kill_when_outbox_holds(self, rows: int, *, only_running: bool) -> tuple[threading.Thread, list[int]]:
        """A DBA watching: once the poll has recorded ``rows`` rows, kill its session(s)."""
        killed: list[int] = []

        def watch() -> None:
            for _ in range(3000):
                if self.outbox_rows() >= rows:
                    killed.append(self.kill(only_running=only_running))
                    return
                threading.Event().wait(0.005)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread, killed

    def last_run(self) -> dict[str, Any]:
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(sync_run).order_by(sync_run.c.id.desc())).mappings().first()
        assert row is not None
        return dict(row)

    def close(self) -> None:
        self.pipeline.close()
        self.store.dispose()
        self.his.dispose()
        self.admin.dispose()


@pytest.fixture
def make(tmp_path: Path, mariadb_url: str) -> Iterator[Callable[[int], Setup]]:
    made: list[Setup] = []
    with Simulator(SimConfig()) as sim:

        def factory(lookback_s: int) -> Setup:
            made.append(Setup(tmp_path, mariadb_url, sim, lookback_s=lookback_s))
            return made[-1]

        try:
            yield factory
        finally:
            for s in made:
                s.close()


def _assert_exactly_once(s: Setup, visits: list[dict[str, Any]]) -> None:
    missing = [v["serial_no"] for v in visits if s.sim.records.get(v["serial_no"]) != expected_payload(v)]
    assert not missing, f"{len(missing)} of {len(visits)} visits missing or different upstream: {missing[:5]}"
    assert s.sim.counters["updates"] == 0, f"{s.sim.counters['updates']} visits were sent twice"
    assert s.sim.counters["uploads"] == len(visits), f"{s.sim.counters['uploads']} uploads for {len(visits)} visits"


def test_a_session_killed_mid_poll_fails_that_cycle_only_and_nothing_is_sent_twice_or_skipped(
    make: Callable[[int], Setup],
) -> None:
    # No lookback: the next poll starts exactly at the cursor, so a cursor moved past rows
    # never recorded would lose them for good.
    s = make(0)
    visits = s.visits(1, 60)
    s.pipeline.cycle()
    assert s.sim.counters["creates"] == 60

    # 240 visits settled in one second, after the cursor: only (changed_at, lsh) orders them.
    at = s.his.now().replace(microsecond=0)
    visits += s.visits(61, 300, changed=at)
    while s.his.now() <= at:
        time.sleep(0.1)
    watcher, killed = s.kill_when_outbox_holds(60 + 40, only_running=True)
    with capture_all_logs() as logged, pytest.raises(TransientError) as failed:
        s.pipeline.cycle()
    watcher.join(timeout=30)

    assert killed == [1], f"sessions killed: {killed}"
    assert "HIS database connection" in str(failed.value)
    assert any(e["event"] == "his_connection_lost" for e in logged), [e["event"] for e in logged]
    run = s.last_run()
    assert run["error"] and "HIS" in run["error"] and run["finished_at"] is not None, run
    recorded = s.outbox_rows()
    assert 100 <= recorded < 300, f"{recorded} rows recorded before the kill"
    # The cursor covers exactly what was recorded, not the window the cycle meant to read.
    assert s.store.queue.get_cursor() == (at, f"LSH{recorded:06d}"), (s.store.queue.get_cursor(), recorded)

    # No operator action: the next cycle reconnects, reads the rest and sends each visit once.
    s.fast()
    stats = s.pipeline.cycle()

    assert stats.error is None and stats.sent == 240, stats
    _assert_exactly_once(s, visits)
    with s.store.engine.connect() as conn:
        leased = conn.execute(
            sa.select(sa.func.count()).select_from(sync_outbox).where(sync_outbox.c.lease_owner.is_not(None))
        ).scalar_one()
    assert leased == 0


def test_every_session_dropped_as_by_a_restart_between_and_during_cycles(make: Callable[[int], Setup]) -> None:
    # Every poll re-reads the whole hour: a row read again must never be sent again.
    s = make(3600)
    visits = s.visits(1, 40)
    s.pipeline.cycle()

    # Between two cycles: the pooled sessions are dead when the next poll takes one.
    assert s.kill(only_running=False) >= 1
    visits += s.visits(41, 80)
    stats = s.pipeline.cycle()
    assert stats.error is None and stats.sent == 40, stats

    # During one: every session goes while the poll streams.
    visits += s.visits(81, 300)
    watcher, killed = s.kill_when_outbox_holds(80 + 40, only_running=False)
    with pytest.raises(TransientError, match="HIS database"):
        s.pipeline.cycle()
    watcher.join(timeout=30)
    assert killed and killed[0] >= 1, killed

    s.fast()
    stats = s.pipeline.cycle()

    assert stats.error is None, stats
    _assert_exactly_once(s, visits)
