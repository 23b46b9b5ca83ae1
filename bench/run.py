"""The crowd-sync benchmark: ``python -m bench.run [--quick] [--sections 123456]`` (docs/performance.md).

Every figure is printed as a ratio to a yardstick measured in the same run:

1. the ideal client: 16 threads with keep-alive sessions doing nothing but signed label
   lookups, then signed uploads of prepared bodies, against the simulator (its own
   process) at 50 ms and at 0 ms latency;
2. crowd-sync's dispatch against the same simulator, latency and concurrency, with
   key_crowd.source lookup and column, at 50 ms and at 0 ms: requests/s as a share of
   the ideal client and (at 50 ms) of concurrency/latency;
3. a vendor-style HIS in MariaDB (five tables, 1,000,000 settled visits), seeded once
   and kept for later runs;
4. the raw read of its settlement query (wrapped as crowd-sync wraps it, PyMySQL's
   unbuffered cursor, rows discarded) against crowd-sync's intake of the same window
   (SQLite outbox), and the intake's peak RSS;
5. a back-fill end to end (reconcile: intake, then uploads of the key population at
   0 ms) against the larger of intake alone and dispatch alone;
6. one claim with 1,000 and with 100,000 due rows, SQLite and MariaDB outbox.

It ends with one table of every target and whether it is met. Sections 2 and 4-5 measure
their yardsticks too (section 2 runs section 1; sections 4 and 5 need section 3's HIS).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import claims, reading, uploads, vendor
from bench.databases import Databases
from bench.results import Results
from bench.simproc import Platform
from sync.logs import configure


def say(text: str = "") -> None:
    print(text, flush=True)


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


@dataclass(frozen=True, kw_only=True)
class Sizes:
    ideal: int  # requests of each kind at the latency
    ideal_0ms: int  # requests of each kind at 0 ms
    visits: int  # crowd-sync's visits at the latency, each mode, and in lookup mode at 0 ms
    uploads_0ms: int  # crowd-sync's column-mode uploads at 0 ms (a back-fill's)
    his: int  # visits in the vendor HIS
    backfill: int  # HIS rows of the end-to-end back-fill (whole days of vendor.ROWS_PER_DAY)
    due_small: int
    due_large: int


FULL = Sizes(ideal=3000, ideal_0ms=10_000, visits=3000, uploads_0ms=20_000, his=1_000_000, backfill=200_000,
             due_small=1000, due_large=100_000)
QUICK = Sizes(ideal=800, ideal_0ms=2000, visits=800, uploads_0ms=2000, his=20_000, backfill=10_000,
              due_small=1000, due_large=10_000)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (20,000 HIS rows): a few minutes")
    ap.add_argument("--sections", default="123456", help="which sections to run (default 123456)")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="the simulator's latency of the main runs")
    ap.add_argument("--concurrency", type=int, default=16, help="upstream.concurrency, and the ideal client's threads")
    ap.add_argument("--visits", type=int, help=f"crowd-sync visits per run at the latency (default {FULL.visits:,})")
    ap.add_argument("--uploads-0ms", type=int, help=f"crowd-sync column-mode uploads at 0 ms (default {FULL.uploads_0ms:,})")
    ap.add_argument("--his-rows", type=int, help=f"visits in the vendor HIS (default {FULL.his:,}, quick {QUICK.his:,})")
    ap.add_argument("--backfill-rows", type=int, help=f"HIS rows of the back-fill (default {FULL.backfill:,})")
    ap.add_argument("--due", type=int, help=f"the large backlog of section 6 (default {FULL.due_large:,})")
    ap.add_argument("--raw-reads", type=int, default=2, help="raw reads around the intake, the fastest kept (default 2)")
    ap.add_argument("--reseed", action="store_true", help="seed the vendor HIS again even if a kept one matches")
    ap.add_argument("--drop-his", action="store_true", help="drop the kept vendor HIS at the end (frees its disk space)")
    ap.add_argument("--no-mariadb", action="store_true", help="skip sections 3-5 and the MariaDB claims")
    ap.add_argument("--markdown", action="store_true", help="print the final table as Markdown")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        ideal=base.ideal, ideal_0ms=base.ideal_0ms, visits=args.visits or base.visits,
        uploads_0ms=args.uploads_0ms or base.uploads_0ms, his=args.his_rows or base.his,
        backfill=args.backfill_rows or base.backfill, due_small=base.due_small, due_large=args.due or base.due_large,
    )
    sections = set(args.sections)
    if "2" in sections:
        sections.add("1")
    if args.no_mariadb:
        sections -= {"3", "4", "5"}
    elif sections & {"4", "5"}:
        sections.add("3")
    latency, concurrency = args.latency_ms, args.concurrency
    configure("warning", "json")
    results = Results()
    began = time.perf_counter()
    say(f"crowd-sync benchmark{' (quick)' if args.quick else ''}: sections {''.join(sorted(sections))}, latency "
        f"{latency:g} ms, concurrency {concurrency}, concurrency/latency = {concurrency / latency * 1000:.0f} "
        f"requests/s; load average {load_average()}")
    dbs = Databases(mariadb=not args.no_mariadb)
    platform = Platform()
    try:
        yardsticks: dict[float, uploads.Yardstick] = {}
        if "1" in sections:
            say("\n1. the ideal client (keep-alive sessions, signed requests, answers checked)")
            for ms, n in ((latency, sizes.ideal), (0.0, sizes.ideal_0ms)):
                yardsticks[ms] = uploads.ideal_client(
                    platform, latency_ms=ms, lookups=n, uploads=n, threads=concurrency, say=say,
                )
            y = yardsticks[latency]
            for f in (y.lookups, y.uploads):
                results.info(f"ideal client {f.kind}, {latency:g} ms", f"{f.per_s:.0f}/s",
                             f"{100 * f.per_s / (concurrency / latency * 1000):.0f} % of c/L")
            for f in (yardsticks[0.0].lookups, yardsticks[0.0].uploads):
                results.info(f"ideal client {f.kind}, 0 ms", f"{f.per_s:.0f}/s")
        if "2" in sections:
            say("\n2. crowd-sync's dispatch, the same simulator, latency and concurrency (SQLite outbox; "
                "upstream.rate_limit_per_s 5000, the settings' maximum)")
            for source, ms, n in (
                ("column", latency, sizes.visits), ("lookup", latency, sizes.visits),
                ("column", 0.0, sizes.uploads_0ms), ("lookup", 0.0, sizes.visits),
            ):
                run = uploads.crowd_sync(dbs, platform, source=source, visits=n, latency_ms=ms, concurrency=concurrency)
                uploads.report(results, run, yardsticks.get(ms), concurrency=concurrency, say=say)
        his = None
        if "3" in sections:
            say("\n3. the vendor-style HIS in MariaDB (bench/vendor.py)")
            his = reading.seed_his(sizes.his, reseed=args.reseed, results=results, say=say)
        if "4" in sections and his is not None:
            say(f"\n4. the raw read against crowd-sync's intake, {his.visits:,} visits")
            reading.intake_vs_raw(dbs, platform, his, results=results, say=say, raw_reads=args.raw_reads)
        if "5" in sections and his is not None:
            say(f"\n5. a back-fill end to end against max(intake, dispatch), {min(sizes.backfill, his.visits):,} rows")
            reading.backfill(dbs, platform, his, rows=sizes.backfill, results=results, say=say)
        if "6" in sections:
            say("\n6. one claim against the due backlog")
            claims.section(
                dbs, platform, ["sqlite"] + ([] if args.no_mariadb else ["mariadb"]), small=sizes.due_small,
                large=sizes.due_large, concurrency=concurrency, results=results, say=say,
            )
    finally:
        platform.stop()
        dbs.close()
        if args.drop_his and "3" in sections:
            vendor.drop(sizes.his)
    say(f"\nsummary ({time.perf_counter() - began:.0f} s; load average at the end {load_average()})")
    results.print(say, markdown=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
