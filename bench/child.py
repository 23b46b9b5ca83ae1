"""Measurements that run alone in a child process, so that the peak RSS and the CPU time
are their own. Each prints one JSON line of figures.

    python -m bench.child raw HIS_URL SINCE UNTIL
        the vendor query, wrapped as crowd-sync wraps it (sync.his.window_sql), read with
        PyMySQL's unbuffered cursor (SSCursor), rows discarded
    python -m bench.child intake HIS_URL OUTBOX_URL BASE_URL SINCE UNTIL [--dispatch]
        crowd-sync's intake of the same window (Pipeline.read_window, as reconcile reads,
        key_crowd.source: column) into a fresh outbox; with --dispatch, then everything due
    python -m bench.child backfill HIS_URL OUTBOX_URL BASE_URL SINCE UNTIL
        the same window end to end, as `crowd-sync reconcile --since --until` runs it
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql
import pymysql.cursors
from sqlalchemy.dialects.mysql.pymysql import MySQLDialect_pymysql
from sqlalchemy.engine import make_url

from bench import vendor
from bench.world import open_world
from sync.his import window_sql
from sync.logs import configure
from sync.stats import CycleStats

_FETCH = 1000  # rows per fetchmany: his.batch_size's default


def peak_mb() -> float:
    """This process's peak resident set, in MB.

    VmHWM, not ``ru_maxrss``: Linux carries the RSS peak of the parent's address space
    over the exec of a (v)forked child into ``ru_maxrss``, so a child of a large benchmark
    process would report at least the benchmark's own size. VmHWM belongs to the address
    space exec created.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    # ru_maxrss is in kilobytes on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine_busy_s() -> float:
    """Core-seconds this machine has spent busy since it booted, every process counted (the
    benchmark's, the simulator's, MariaDB's): ``/proc/stat``'s user, nice, system, irq,
    softirq and steal time. 0.0 where there is no ``/proc/stat``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class WorkerPeak:
    """The peak memory of this process's child processes (the intake's build worker), read
    every 0.2 s while they run: the worker's memory is the intake's too. ``private_mb``: its
    anonymous memory (``RssAnon``), what it adds to the machine (the Python and library
    files it maps are the reading process's pages, shared); ``mb``: its whole RSS."""

    def __init__(self) -> None:
        self.mb = 0.0
        self.private_mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            for child in multiprocessing.active_children():
                try:
                    for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.mb = max(self.mb, round(int(line.split()[1]) / 1024, 1))
                        elif line.startswith("RssAnon:"):
                            self.private_mb = max(self.private_mb, round(int(line.split()[1]) / 1024, 1))
                except OSError:
                    pass

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.mb


def raw(his_url: str, since: datetime, until: datetime) -> dict[str, Any]:
    url = make_url(his_url)
    dialect = MySQLDialect_pymysql()
    compiled = window_sql(vendor.QUERY, dialect, order_by=["changed_at", "lsh"]).compile(dialect=dialect)
    values = {"since": since, "until": until}
    # The driver's own placeholders, in the order the statement binds them.
    params = tuple(values[name] for name in compiled.positiontup or ())
    conn = pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password or "",
        database=url.database, charset="utf8mb4", cursorclass=pymysql.cursors.SSCursor,
    )
    rows = 0
    rss_start = peak_mb()
    started, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_s()
    try:
        with conn.cursor() as cur:
            cur.execute(str(compiled), params)
            while batch := cur.fetchmany(_FETCH):
                rows += len(batch)
    finally:
        conn.close()
    elapsed = time.perf_counter() - started
    return {
        "rows": rows, "seconds": round(elapsed, 3), "cpu_s": round(time.process_time() - cpu, 2),
        "rows_per_s": rows / elapsed, "rss_start_mb": rss_start, "peak_rss_mb": peak_mb(),
        "machine_busy_s": round(machine_busy_s() - busy, 2),
    }


def intake(his_url: str, outbox_url: str, base_url: str, since: datetime, until: datetime, *, dispatch: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"rss_start_mb": peak_mb()}
    with open_world(his_url, outbox_url, base_url, his_query=vendor.QUERY, source="column") as w:
        out["rss_world_mb"] = peak_mb()
        stats = CycleStats()
        worker = WorkerPeak()
        started, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_s()
        w.pipeline.read_window(since, until, stats, move_cursor=False)
        elapsed = time.perf_counter() - started
        out["machine_busy_s"] = round(machine_busy_s() - busy, 2)
        worker.stop()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        out.update(
            rows=stats.rows_read, enqueued=stats.enqueued, skipped=stats.skipped, invalid=stats.invalid,
            seconds=round(elapsed, 3), cpu_s=round(time.process_time() - cpu, 2),
            worker_cpu_s=round(children.ru_utime + children.ru_stime, 2),
            rows_per_s=stats.rows_read / elapsed, peak_rss_mb=peak_mb(), worker_peak_rss_mb=worker.mb,
            worker_peak_private_mb=worker.private_mb,
            # Both processes at their peaks at once: an upper bound of what the intake holds.
            peak_rss_total_mb=round(peak_mb() + worker.private_mb, 1),
        )
        if dispatch:
            stats = CycleStats()
            started, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_s()
            w.pipeline.dispatch(stats)
            elapsed = time.perf_counter() - started
            out["dispatch_machine_busy_s"] = round(machine_busy_s() - busy, 2)
            out.update(
                sent=stats.sent, failed=stats.failed, dispatch_s=round(elapsed, 3),
                dispatch_cpu_s=round(time.process_time() - cpu, 2), uploads_per_s=stats.sent / elapsed,
                peak_rss_after_dispatch_mb=peak_mb(),
            )
    return out


def backfill(his_url: str, outbox_url: str, base_url: str, since: datetime, until: datetime) -> dict[str, Any]:
    with open_world(his_url, outbox_url, base_url, his_query=vendor.QUERY, source="column") as w:
        started, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_s()
        # reconcile's until is the last day included.
        stats = w.pipeline.reconcile(since.date(), (until - timedelta(days=1)).date())
        elapsed = time.perf_counter() - started
        busy = machine_busy_s() - busy
    return {
        "machine_busy_s": round(busy, 2),
        "rows": stats.rows_read, "enqueued": stats.enqueued, "skipped": stats.skipped, "invalid": stats.invalid,
        "sent": stats.sent, "failed": stats.failed, "seconds": round(elapsed, 3),
        "cpu_s": round(time.process_time() - cpu, 2), "peak_rss_mb": peak_mb(),
    }


def main(argv: list[str]) -> int:
    configure("warning", "json")
    what, args = argv[0], argv[1:]
    if what == "raw":
        his_url, since, until = args[0], datetime.fromisoformat(args[1]), datetime.fromisoformat(args[2])
        figures = raw(his_url, since, until)
    elif what in ("intake", "backfill"):
        his_url, outbox_url, base_url = args[:3]
        since, until = datetime.fromisoformat(args[3]), datetime.fromisoformat(args[4])
        if what == "intake":
            figures = intake(his_url, outbox_url, base_url, since, until, dispatch="--dispatch" in args)
        else:
            figures = backfill(his_url, outbox_url, base_url, since, until)
    else:
        raise SystemExit(f"unknown measurement {what!r}: raw, intake or backfill")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
