"""The instance lock's server session dies under a running daemon (a DBA's KILL, a server
restart, a timeout): the daemon notices before it sends anything, takes the lock again if it
is free, and stops if another crowd-sync took it meanwhile, so that two never send side by side.
On the real MariaDB and PostgreSQL; the HIS is SQLite and the platform the simulator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync.app import make_pipeline
from sync.daemon import Daemon
from sync.outbox.lock import AlreadyRunning, InstanceLock, advisory_key
from sync.outbox.store import Store
from sync.upstream.simulator import SimConfig, Simulator
from tests.support import His, capture_all_logs, his_now, make_visit, write_settings


@pytest.fixture(params=["mariadb", "postgres"])
def outbox_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    store = Store(url)
    store.migrate()
    store.dispose()
    return url


def kill_lock_session(url: str, lock: InstanceLock) -> None:
    """What a DBA's KILL (or a restart, or an idle timeout) does to the lock's session."""
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if admin.dialect.name in ("mysql", "mariadb"):
                session = conn.execute(sa.text("SELECT IS_USED_LOCK(:n)"), {"n": lock.name}).scalar()
                assert session is not None
                conn.exec_driver_sql(f"KILL CONNECTION {int(session)}")
            else:
                key = advisory_key(lock.name)
                pids = conn.execute(
                    sa.text(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND ((classid::bigint << 32) | objid::bigint) = (:key & x'ffffffffffffffff'::bigint)"
                    ),
                    {"key": key},
                ).scalars().all()
                assert len(pids) == 1, pids
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pids[0]})
    finally:
        admin.dispose()


class Instance:
    """One crowd-sync daemon on the shared outbox."""

    def __init__(self, tmp: Path, name: str, outbox_url: str, sim: Simulator) -> None:
        self.settings = write_settings(
            tmp / f"{name}.yaml", his_url=f"sqlite:///{tmp / 'his.db'}", outbox_url=outbox_url, base_url=sim.url,
        )
        self.store = Store(outbox_url)
        self.lock = self.store.instance_lock(command="run")
        self.lock.acquire()
        self.pipeline = make_pipeline(self.settings, self.store)
        self.daemon = Daemon(self.settings, self.pipeline, lock=self.lock)

    def close(self) -> None:
        self.pipeline.close()
        self.lock.release()
        self.store.dispose()


@pytest.fixture
def world(tmp_path: Path, outbox_url: str) -> Iterator[tuple[Simulator, His, Callable[[str], Instance]]]:
    made: list[Instance] = []
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    with Simulator(SimConfig()) as sim:

        def instance(name: str) -> Instance:
            made.append(Instance(tmp_path, name, outbox_url, sim))
            return made[-1]

        yield sim, his, instance
        for i in made:
            i.close()
    his.dispose()


def _visits(his: His, first: int, last: int) -> None:
    base = his_now() - timedelta(minutes=5)
    his.insert(make_visit(n, changed=base + timedelta(seconds=n)) for n in range(first, last + 1))


def test_a_lost_lock_taken_by_another_instance_stops_this_one_before_it_sends(
    world: tuple[Simulator, His, Callable[[str], Instance]], outbox_url: str
) -> None:
    sim, his, instance = world
    first = instance("first")
    _visits(his, 1, 5)
    first.daemon._cycle()
    assert len(sim.records) == 5

    kill_lock_session(outbox_url, first.lock)
    second = instance("second")  # the lock was free: a second crowd-sync (a restart elsewhere) takes it
    _visits(his, 6, 10)
    uploads = sim.counters["uploads"]
    with capture_all_logs() as logs:
        first.daemon._cycle()

    assert sim.counters["uploads"] == uploads  # the first sent nothing beside the second
    assert isinstance(first.daemon.fatal, AlreadyRunning)
    assert first.daemon._stop.is_set()  # run() returns and the command exits 2, naming the holder
    events = [e["event"] for e in logs]
    assert "instance_lock_lost" in events and "instance_lock_taken" in events

    second.daemon._cycle()
    assert len(sim.records) == 10


def test_a_lost_lock_nobody_took_is_taken_again_and_sending_goes_on(
    world: tuple[Simulator, His, Callable[[str], Instance]], outbox_url: str
) -> None:
    sim, his, instance = world
    only = instance("only")
    _visits(his, 1, 3)
    only.daemon._cycle()

    kill_lock_session(outbox_url, only.lock)
    _visits(his, 4, 6)
    with capture_all_logs() as logs:
        only.daemon._cycle()

    assert len(sim.records) == 6
    assert only.daemon.fatal is None and only.lock.still_held()
    events = [e["event"] for e in logs]
    assert "instance_lock_lost" in events and "instance_lock_reacquired" in events
    with pytest.raises(AlreadyRunning):  # and it is really held: nobody else gets it
        instance("late")
