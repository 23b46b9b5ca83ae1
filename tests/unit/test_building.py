"""Building a large window in a worker process changes nothing the outbox holds, and
losing the worker (or the process that reads) loses nothing and leaves nothing behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from datetime import date, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from sync import building, intake
from sync.app import make_pipeline
from sync.columns import normalize_row
from sync.outbox.schema import sync_cursor, sync_outbox
from sync.outbox.store import Store
from sync.settings import KeyCrowd
from sync.stats import CycleStats
from sync.upstream.simulator import SimConfig, Simulator
from tests.support import His, his_now, make_visit, write_settings

ROOT = Path(__file__).resolve().parents[2]
COLUMN = KeyCrowd(source="column")


def canonical_rows(n: int) -> list[dict[str, Any]]:
    """Rows as HisSource gives them: every third one not key population, every seventh invalid."""
    start = his_now() - timedelta(days=1)
    rows = []
    for i in range(1, n + 1):
        v = make_visit(i, changed=start + timedelta(seconds=i), is_key="0" if i % 3 == 0 else "1")
        if i % 7 == 0:
            v["total"] = -v["total"]
        rows.append(normalize_row({
            "lsh": v["serial_no"], "code": v["visit_no"], "card_type": v["id_type"], "card_no": v["id_no"],
            "visit_type": str(v["kind"]), "enter_date": v["admitted"], "leave_date": v["discharged"],
            "key_crowd": v["is_key"], "icd_name": v["diag_name"], "icd_code": v["diag_code"], "total_fee": v["total"],
            "ins_fee": v["insurance"], "total_prepayment": v["deposit"], "deficient_fee": v["owed"],
            "settlement_date": v["settled"], "changed_at": v["changed"],
        }))
    return rows


def test_the_worker_builds_exactly_what_building_here_gives_in_order() -> None:
    rows = canonical_rows(250)
    today = date(2026, 12, 8)
    here = [intake.incoming(r, key_crowd=COLUMN, today=today) for r in rows]
    builder = building.Builder(key_crowd=COLUMN, today=today, institutions=("default",), worker=True)
    try:
        handles = [builder.submit(rows[k:k + 50]) for k in range(0, len(rows), 50)]
        assert builder.in_flight == 0  # the first 5,000 rows of a window are built here
        building.INLINE_ROWS, saved = 0, building.INLINE_ROWS
        try:
            handles += [builder.submit(rows[k:k + 50]) for k in range(0, len(rows), 50)]
        finally:
            building.INLINE_ROWS = saved
        assert builder.in_flight == building.IN_FLIGHT  # a worker process builds now
        assert multiprocessing.active_children()
        built = [item for h in handles for item in h.result()]
    finally:
        builder.close()
    assert built == here + here
    statuses = {i.status.value for i in built}
    assert statuses == {"pending", "skipped", "invalid"}


def test_a_worker_lost_on_the_way_is_made_good_here() -> None:
    rows = canonical_rows(20)
    today = date(2026, 12, 8)
    builder = building.Builder(key_crowd=COLUMN, today=today, institutions=("default",), worker=False)
    lost: Future[list[Any]] = Future()
    lost.set_exception(BrokenProcessPool("the worker was killed"))
    handle = building._Sent(lost, rows, builder)
    assert handle.result() == [intake.incoming(r, key_crowd=COLUMN, today=today) for r in rows]


def _window_into_outbox(tmp_path: Path, sim: Simulator, his: His, name: str) -> list[tuple[Any, ...]]:
    settings = write_settings(
        tmp_path / f"{name}.yaml", his_url=his.url, outbox_url=f"sqlite:///{tmp_path / name}.db", base_url=sim.url,
        overrides={"his": {"batch_size": 40}, "key_crowd": {"source": "lookup"}},
    )
    store = Store(settings.outbox.url.get_secret_value())
    store.ensure_schema()
    pipeline = make_pipeline(settings, store)
    try:
        stats = CycleStats()
        pipeline.poll(stats)
        assert stats.rows_read == 600
        with store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(sync_outbox.c.lsh, sync_outbox.c.status, sync_outbox.c.payload, sync_outbox.c.payload_hash,
                          sync_outbox.c.last_error, sync_outbox.c.source_changed_at).order_by(sync_outbox.c.lsh)
            ).all()
            cursor = conn.execute(sa.select(sync_cursor.c.changed_at, sync_cursor.c.lsh)).one()
        # The poll read up to the HIS clock minus the settle delay: the cursor stands there.
        assert cursor.changed_at >= rows[-1].source_changed_at
        return [tuple(r) for r in rows]
    finally:
        pipeline.close()


def test_a_poll_built_by_the_worker_records_the_same_rows_and_cursor(tmp_path: Path, monkeypatch: Any) -> None:
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    start = his_now() - timedelta(hours=3)
    his.insert(make_visit(n, changed=start + timedelta(seconds=n), total=-1 if n % 50 == 0 else 10) for n in range(1, 601))
    try:
        with Simulator(SimConfig()) as sim:
            monkeypatch.setattr(building, "WORKER", False)
            here = _window_into_outbox(tmp_path, sim, his, "here")
            monkeypatch.setattr(building, "WORKER", True)
            monkeypatch.setattr(building, "INLINE_ROWS", 80)
            worker = _window_into_outbox(tmp_path, sim, his, "worker")
    finally:
        his.dispose()
    assert worker == here
    assert len(here) == 600
    assert {r[1] for r in here} == {"pending", "invalid"}


WORKER_SCRIPT = """
import multiprocessing, sys, time
from datetime import date
from sync import building
from sync.settings import KeyCrowd
if __name__ == "__main__":
    builder = building.Builder(key_crowd=KeyCrowd(source="column"), today=date(2026, 12, 8), institutions=("default",), worker=True)
    building.INLINE_ROWS = -1
    builder.submit([]).result()
    print(multiprocessing.active_children()[0].pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_the_worker_leaves_when_the_reading_process_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "reader.py"
    script.write_text(WORKER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.2)
        assert not _alive(worker), "the build worker outlived the killed reading process"
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def built_with_pool(monkeypatch: Any, pool: Any, visits: int) -> tuple[list[Any], list[Any], int]:
    """A window of ``visits`` rows in batches of 10, the worker's pool replaced by ``pool``:
    (what was built, what building here gives, batches left in flight at the end)."""
    monkeypatch.setattr(building, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(building, "INLINE_ROWS", 0)
    rows = canonical_rows(visits)
    today = date(2026, 12, 8)
    builder = building.Builder(key_crowd=COLUMN, today=today, institutions=("default",), worker=True)
    try:
        built = [item for k in range(0, visits, 10) for item in builder.submit(rows[k:k + 10]).result()]
        in_flight = builder.in_flight
    finally:
        builder.close()
    return built, [intake.incoming(r, key_crowd=COLUMN, today=today) for r in rows], in_flight


def test_a_worker_that_cannot_start_leaves_the_rows_built_here(monkeypatch: Any) -> None:
    def no_processes(*_args: Any, **_kwargs: Any) -> Any:
        raise ImportError("This platform lacks a functioning sem_open implementation")

    built, here, in_flight = built_with_pool(monkeypatch, no_processes, 30)
    assert in_flight == 0
    assert built == here


def test_a_worker_whose_first_task_fails_is_shut_down_and_the_rows_built_here(monkeypatch: Any) -> None:
    class DeadOnArrival:
        shut: ClassVar[list[bool]] = []

        def __init__(self, *_args: Any, **_kwargs: Any) -> None:
            pass

        def submit(self, *_args: Any) -> Future[Any]:
            failed: Future[Any] = Future()
            failed.set_exception(BrokenProcessPool("the worker died while starting"))
            return failed

        def shutdown(self, *, wait: bool, cancel_futures: bool) -> None:
            DeadOnArrival.shut.append(cancel_futures)

    built, here, _ = built_with_pool(monkeypatch, DeadOnArrival, 20)
    assert DeadOnArrival.shut == [True]  # shut down once; no second attempt for the same window
    assert built == here
