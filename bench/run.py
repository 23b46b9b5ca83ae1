"""The crowd-sync benchmark: ``python -m bench.run [--quick]`` (see docs/performance.md).

Prints, in one run:
1. uploads per second through the pipeline against the simulator at latency L, with
   the HIS and the outbox in SQLite and in MariaDB, as a share of the limit
   ``concurrency / L``; once with ``key_crowd.source: column`` and once with
   ``lookup`` (distinct patients: one label lookup per visit);
2. the same uploads through a naive sequential uploader, and the ratio;
3. a back-fill of N HIS rows (10 % key population) into the outbox in a child
   process: rows per second and peak RSS;
4. poll and claim time with a small and a large outbox, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from bench import seed
from bench.simproc import Platform, naive_upload
from bench.world import World, make_settings, make_world
from sync.logs import configure
from sync.outbox.schema import sync_outbox
from sync.pipeline import CycleStats, utcnow

MARIADB = "mysql+pymysql://root@127.0.0.1:3306"
HISTORY_START = datetime(2024, 1, 1)


def say(text: str = "") -> None:
    print(text, flush=True)


class Databases:
    """Fresh databases for each step: SQLite files in a temporary directory, MariaDB
    databases created here and dropped at the end."""

    def __init__(self, mariadb: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="crowd-sync-bench-"))
        self.mariadb = mariadb
        self._created: list[str] = []
        self._server = sa.create_engine(MARIADB + "/", isolation_level="AUTOCOMMIT") if mariadb else None

    def url(self, backend: str, name: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{self.dir / name}.db"
        assert self._server is not None
        db = f"crowd_sync_bench_{name}"
        with self._server.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db}")
            conn.exec_driver_sql(f"CREATE DATABASE {db} CHARACTER SET utf8mb4")
        self._created.append(db)
        return f"{MARIADB}/{db}?charset=utf8mb4"

    def close(self) -> None:
        if self._server is not None:
            with self._server.connect() as conn:
                for db in self._created:
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db}")
            self._server.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def world(his_url: str, outbox_url: str, base_url: str, **kw: object) -> Iterator[World]:
    w = make_world(make_settings(his_url=his_url, outbox_url=outbox_url, base_url=base_url, **kw))  # type: ignore[arg-type]
    try:
        yield w
    finally:
        w.close()


# -- 1 and 2: uploads ------------------------------------------------------------------------


def uploads(
    dbs: Databases, platform: Platform, backend: str, *, n: int, source: str, concurrency: int, latency_s: float
) -> dict[str, float]:
    tag = f"up_{source}"
    his_url, outbox_url = dbs.url(backend, f"{tag}_his"), dbs.url(backend, f"{tag}_outbox")
    seed.create(his_url)
    seed.fill(his_url, seed.visits(n, start=HISTORY_START, prefix=source[0].upper()))
    with world(his_url, outbox_url, platform.url, concurrency=concurrency, source=source) as w:
        if source == "lookup":
            platform.label([seed.resident_id(i) for i in range(n)])
        w.pipeline.poll(CycleStats())
        platform.reset()
        platform.latency(latency_s)
        stats = CycleStats()
        started = time.perf_counter()
        w.pipeline.dispatch(stats)
        elapsed = time.perf_counter() - started
        platform.latency(0)
        counters = platform.counters()
    if stats.sent != n:
        raise RuntimeError(f"{backend}/{source}: sent {stats.sent} of {n}: {stats}")
    requests_ = counters.get("requests", 0)
    return {
        "visits": n, "seconds": elapsed, "uploads_per_s": n / elapsed, "requests": requests_,
        "requests_per_s": requests_ / elapsed, "lookups": stats.lookups,
    }


def payload_sample(outbox_url: str, n: int) -> list[str]:
    engine = sa.create_engine(outbox_url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(sa.select(sync_outbox.c.payload).order_by(sync_outbox.c.lsh).limit(n)))
    finally:
        engine.dispose()


# -- 3: back-fill ------------------------------------------------------------------------------


def backfill(dbs: Databases, platform: Platform, *, n: int, upload: bool) -> dict[str, float]:
    his_url, outbox_url = dbs.url("sqlite", "bf_his"), dbs.url("sqlite", "bf_outbox")
    seed.create(his_url)
    started = time.perf_counter()
    seed.fill(his_url, seed.visits(n, start=HISTORY_START, key_every=10))
    say(f"  seeded {n:,} HIS rows in {time.perf_counter() - started:.0f} s")
    cmd = [sys.executable, "-m", "bench.backfill", his_url, outbox_url, platform.url] + (["--upload"] if upload else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"back-fill child failed: {done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


# -- 4: poll and claim against outbox size ----------------------------------------------------


def scaling(dbs: Databases, platform: Platform, backend: str, *, history: int, new: int = 1000) -> dict[str, float]:
    his_url, outbox_url = dbs.url(backend, f"sc{history}_his"), dbs.url(backend, f"sc{history}_outbox")
    seed.create(his_url)
    seed.fill(his_url, seed.visits(history, start=HISTORY_START, key_every=10, prefix="H"))
    with world(his_url, outbox_url, platform.url) as w:
        # History: every row read once and settled (sent or skipped) long ago.
        w.pipeline.poll(CycleStats())
        with w.store.engine.begin() as conn:
            conn.execute(
                sa.update(sync_outbox).where(sync_outbox.c.status == "pending")
                .values(status="sent", next_attempt_at=None, sent_at=utcnow())
            )
        cursor = w.store.get_cursor()
        assert cursor is not None
        # New settlements after the cursor (one second apart would take too long: 1 ms).
        rows = list(seed.visits(new, start=cursor[0] + timedelta(milliseconds=1), prefix="N"))
        rows = [(*r[:14], cursor[0] + timedelta(milliseconds=i + 1), cursor[0] + timedelta(milliseconds=i + 1)) for i, r in enumerate(rows)]
        seed.fill(his_url, iter(rows))
        while w.pipeline.his.now() <= rows[-1][-1] + timedelta(seconds=1):
            time.sleep(0.2)
        stats = CycleStats()
        started = time.perf_counter()
        w.pipeline.poll(stats)
        poll_s = time.perf_counter() - started
        if stats.rows_read != new:
            raise RuntimeError(f"poll read {stats.rows_read} rows, expected {new}")
        claims: list[float] = []
        for _ in range(15):
            started = time.perf_counter()
            got = w.store.claim_due(now=utcnow(), limit=128, owner="bench")
            claims.append(time.perf_counter() - started)
            assert len(got) == 128, len(got)
            w.store.release(got, now=utcnow())
    return {"outbox_rows": history + new, "poll_ms": poll_s * 1000, "claim_ms": statistics.median(claims) * 1000}


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller figures: a minute or two instead of ten")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--uploads", type=int, help="visits per upload measurement (default 3000, quick 800)")
    ap.add_argument("--naive", type=int, help="visits through the naive uploader (default 200, quick 60)")
    ap.add_argument("--backfill", type=int, help="HIS rows of the back-fill (default 1,000,000, quick 100,000)")
    ap.add_argument("--backfill-uploads", action="store_true", help="also upload the back-fill's key population (latency 0)")
    ap.add_argument("--large", type=int, help="history rows of the large outbox (default 1,000,000, quick 100,000)")
    ap.add_argument("--no-mariadb", action="store_true", help="SQLite only")
    ap.add_argument(
        "--sections", default="1234",
        help="which sections to run, e.g. 12 for the uploads and the naive uploader (default 1234)",
    )
    ap.add_argument("--sources", default="column,lookup", help="key_crowd.source values of section 1 (default column,lookup)")
    args = ap.parse_args(argv)
    quick = args.quick
    n_up = args.uploads or (800 if quick else 3000)
    n_naive = args.naive or (60 if quick else 200)
    n_bf = args.backfill or (100_000 if quick else 1_000_000)
    n_large = args.large or (100_000 if quick else 1_000_000)
    latency_s = args.latency_ms / 1000
    limit = args.concurrency / latency_s
    backends = ["sqlite"] + ([] if args.no_mariadb else ["mariadb"])
    configure("warning", "json")

    dbs = Databases(mariadb=not args.no_mariadb)
    platform = Platform()
    try:
        say(f"crowd-sync benchmark: latency {args.latency_ms:g} ms, concurrency {args.concurrency}, "
            f"rate_limit_per_s 1000; limit concurrency/latency = {limit:.0f} requests/s")
        results: dict[tuple[str, str], dict[str, float]] = {}
        sections = set(args.sections)
        if "1" in sections or "2" in sections:
            say("\n1. uploads through the pipeline")
        for backend in backends if sections & {"1", "2"} else []:
            sources = args.sources.split(",") if "1" in sections else []
            if "2" in sections and backend == "sqlite" and "column" not in sources:
                # The naive uploader sends the payloads of the SQLite column run, and is compared with it.
                sources = ["column", *sources]
            for source in sources:
                r = uploads(dbs, platform, backend, n=n_up, source=source, concurrency=args.concurrency, latency_s=latency_s)
                results[backend, source] = r
                per_visit = " (1 lookup + 1 upload per visit)" if source == "lookup" else ""
                say(f"  {backend:8s} key_crowd.source={source:6s}: {r['visits']:.0f} visits in {r['seconds']:.1f} s = "
                    f"{r['uploads_per_s']:.0f} visits/s, {r['requests_per_s']:.0f} requests/s{per_visit} = "
                    f"{100 * r['requests_per_s'] / limit:.0f} % of the limit")

        if "2" in sections:
            naive(dbs, platform, results, n_naive=n_naive, latency_s=latency_s)
        if "3" in sections:
            section_backfill(dbs, platform, n_bf=n_bf, upload=args.backfill_uploads)
        if "4" in sections:
            section_scaling(dbs, platform, backends, n_large=n_large)
    finally:
        platform.stop()
        dbs.close()
    return 0


def naive(
    dbs: Databases, platform: Platform, results: dict[tuple[str, str], dict[str, float]], *, n_naive: int,
    latency_s: float,
) -> None:
    say("\n2. naive sequential uploader (one requests.post at a time, new connection each)")
    sample = payload_sample(dbs.url("sqlite", "up_column_outbox"), n_naive)
    platform.latency(latency_s)
    naive_s = naive_upload(platform.url, sample)
    platform.latency(0)
    naive_rate = len(sample) / naive_s
    best = results["sqlite", "column"]["uploads_per_s"]
    say(f"  {len(sample)} uploads in {naive_s:.1f} s = {naive_rate:.1f} uploads/s; "
        f"pipeline (sqlite, column) {best:.0f} uploads/s = {best / naive_rate:.1f} x the naive uploader")


def section_backfill(dbs: Databases, platform: Platform, *, n_bf: int, upload: bool) -> None:
    say(f"\n3. back-fill of {n_bf:,} HIS rows (10 % key population, key_crowd.source: column, SQLite HIS and outbox)")
    bf = backfill(dbs, platform, n=n_bf, upload=upload)
    say(f"  HIS read -> outbox: {bf['rows']:,.0f} rows in {bf['poll_s']} s = {bf['rows_per_s']:,.0f} rows/s "
        f"(CPU {bf['poll_cpu_s']} s); {bf['enqueued']:,.0f} rows written, {bf['skipped']:,.0f} skipped")
    say(f"  peak RSS of the back-fill process: {bf['rss_after_poll_mb']:.0f} MB after the poll "
        f"(at start {bf['rss_start_mb']:.0f} MB)")
    if "sent" in bf:
        say(f"  then {bf['sent']:,.0f} uploads at latency 0 in {bf['upload_s']} s = {bf['uploads_per_s']:,.0f} uploads/s; "
            f"peak RSS {bf['rss_after_upload_mb']:.0f} MB")


def section_scaling(dbs: Databases, platform: Platform, backends: list[str], *, n_large: int) -> None:
    say("\n4. poll (1000 new HIS rows) and claim (128 due rows) against the outbox's size")
    for backend in backends:
        small = scaling(dbs, platform, backend, history=10_000)
        large = scaling(dbs, platform, backend, history=n_large)
        for r in (small, large):
            say(f"  {backend:8s} outbox {r['outbox_rows']:>9,.0f} rows: poll {r['poll_ms']:7.1f} ms, claim {r['claim_ms']:6.2f} ms")
        say(f"  {backend:8s} ratio large/small: poll {large['poll_ms'] / small['poll_ms']:.2f}, "
            f"claim {large['claim_ms'] / small['claim_ms']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
