"""Sections 3 to 5: the vendor HIS, its raw read against crowd-sync's intake, and the
back-fill end to end against the larger of its two halves.

Each measurement runs in a child process (bench/child.py) against a fresh SQLite outbox.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bench import vendor
from bench.databases import Databases
from bench.results import Results, share, times
from bench.simproc import Platform

Say = Callable[[str], None]


def child(*args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "bench.child", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench.child {args[0]} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def seed_his(visits: int, *, reseed: bool, results: Results, say: Say) -> vendor.Seeded:
    his = vendor.ensure(visits, reseed=reseed, say=say)
    how = "kept from an earlier run" if his.reused else "seeded now"
    say(f"  {his.database}: {his.visits:,} visits of {his.patients:,} patients, {his.settlements:,} settlements "
        f"({how}; seeding took {his.seed_s:.1f} s: generate {his.generate_s:.1f}, LOAD DATA {his.load_s:.1f}, "
        f"indexes {his.index_s:.1f})")
    results.info(f"vendor HIS seeding ({his.visits:,} visits, {'kept' if his.reused else 'this run'})", f"{his.seed_s:.1f} s")
    return his


def intake_vs_raw(
    dbs: Databases, platform: Platform, his: vendor.Seeded, *, results: Results, say: Say, raw_reads: int = 2,
) -> None:
    since, until = vendor.window(vendor.days_for(his.visits))
    window = (since.isoformat(), until.isoformat())
    raws: list[dict[str, Any]] = []
    # The raw read before and after the intake, the faster one kept: neither side is
    # measured on a colder cache than the other, and the yardstick is the harder one.
    raws.append(child("raw", his.url, *window))
    say(_raw_line(raws[-1]))
    outbox = dbs.url("sqlite", "intake_outbox")
    got = child("intake", his.url, outbox, platform.url, *window)
    if got["invalid"]:
        raise RuntimeError(f"the vendor HIS gave {got['invalid']} invalid rows: fix bench/vendor.py")
    for _ in range(raw_reads - 1):
        raws.append(child("raw", his.url, *window))
        say(_raw_line(raws[-1]))
    raw = max(raws, key=lambda r: r["rows_per_s"])
    if raw["rows"] != got["rows"]:
        raise RuntimeError(f"the raw read saw {raw['rows']} rows, crowd-sync {got['rows']}")
    ratio = got["rows_per_s"] / raw["rows_per_s"]
    say(f"  crowd-sync intake (read_window, key_crowd.source: column, SQLite outbox): {got['rows']:,} rows in "
        f"{got['seconds']:.1f} s = {got['rows_per_s']:,.0f} rows/s (CPU {got['cpu_s']} s, build worker "
        f"{got['worker_cpu_s']} s) = {share(ratio)} of the raw read; {got['enqueued']:,} written "
        f"({got['skipped']:,} skipped); peak RSS {got['peak_rss_mb']:.0f} MB (at start {got['rss_start_mb']:.0f} MB) "
        f"+ build worker {got['worker_peak_private_mb']:.0f} MB of its own (RSS {got['worker_peak_rss_mb']:.0f} MB, "
        f"the rest the same library pages)")
    # What the machine's cores allow: at 60 % of the raw read the intake would have
    # raw seconds / 0.6 of wall time, so at most that many seconds x cores of busy cores.
    cores = os.cpu_count() or 1
    per_row = got["machine_busy_s"] / got["rows"] * 1e6
    raw_per_row = raw["machine_busy_s"] / raw["rows"] * 1e6
    budget = cores / (0.60 * raw["rows_per_s"]) * 1e6
    say(f"  the machine's cores busy per row (every process: crowd-sync, its build worker, MariaDB): raw read "
        f"{raw_per_row:.0f} µs, intake {per_row:.0f} µs; at 60 % of the raw read's rate {cores} cores allow "
        f"{budget:.0f} µs a row")
    rows = f"{got['rows']:,} rows"
    results.info(f"raw read, PyMySQL SSCursor ({rows})", f"{raw['rows_per_s']:,.0f} rows/s")
    results.info("intake: busy core time a row, every process / what 60 % of the raw read allows",
                 f"{per_row:.0f} µs / {budget:.0f} µs (raw read {raw_per_row:.0f} µs)")
    results.at_least(f"intake ({rows}) / raw read", f"{got['rows_per_s']:,.0f} rows/s", ratio, 0.60)
    total = got["peak_rss_total_mb"]
    results.below(f"intake peak RSS ({rows}), reader + build worker's own", f"{got['peak_rss_mb']:.0f} + "
                  f"{got['worker_peak_private_mb']:.0f} MB", total, 150, "MB")


def _raw_line(raw: dict[str, Any]) -> str:
    return (f"  raw read (the wrapped query, PyMySQL SSCursor, rows discarded): {raw['rows']:,} rows in "
            f"{raw['seconds']:.1f} s = {raw['rows_per_s']:,.0f} rows/s (CPU {raw['cpu_s']} s, peak RSS "
            f"{raw['peak_rss_mb']:.0f} MB)")


def backfill(
    dbs: Databases, platform: Platform, his: vendor.Seeded, *, rows: int, results: Results, say: Say,
) -> None:
    days = max(1, min(vendor.days_for(rows), vendor.days_for(his.visits)))
    since, until = vendor.window(days)
    window = (since.isoformat(), until.isoformat())
    platform.latency(0)
    platform.reset()
    halves = child("intake", his.url, dbs.url("sqlite", "bf_halves_outbox"), platform.url, *window, "--dispatch")
    say(f"  intake alone: {halves['rows']:,} rows in {halves['seconds']:.1f} s; then dispatch alone: "
        f"{halves['sent']:,} uploads in {halves['dispatch_s']:.1f} s = {halves['uploads_per_s']:.0f}/s (latency 0)")
    platform.reset()
    whole = child("backfill", his.url, dbs.url("sqlite", "bf_whole_outbox"), platform.url, *window)
    platform.reset()
    if whole["sent"] != halves["sent"] or whole["rows"] != halves["rows"]:
        raise RuntimeError(f"the back-fill and its halves differ: {whole} against {halves}")
    longer = max(halves["seconds"], halves["dispatch_s"])
    ratio = whole["seconds"] / longer
    say(f"  end to end (reconcile {since:%Y-%m-%d} to {until - timedelta(days=1):%Y-%m-%d}): {whole['rows']:,} rows read, "
        f"{whole['sent']:,} sent in {whole['seconds']:.1f} s = {times(ratio)} max(intake, dispatch) "
        f"= {longer:.1f} s (sum {halves['seconds'] + halves['dispatch_s']:.1f} s); peak RSS {whole['peak_rss_mb']:.0f} MB")
    # What the machine's cores allow: the halves kept them busy for this many core-seconds
    # (every process: crowd-sync, its build worker, the simulator, MariaDB); run together on
    # this machine's cores they cannot take less than that divided by the cores.
    cores = os.cpu_count() or 1
    busy = halves["machine_busy_s"] + halves["dispatch_machine_busy_s"]
    floor = busy / cores
    say(f"  the machine's cores busy: intake {halves['machine_busy_s']:.1f} core-s, dispatch "
        f"{halves['dispatch_machine_busy_s']:.1f} core-s, end to end {whole['machine_busy_s']:.1f} core-s; together on "
        f"{cores} cores the halves need at least {busy:.1f} / {cores} = {floor:.1f} s = {times(floor / longer)} "
        f"max(intake, dispatch)")
    results.info("back-fill: the halves' busy core-seconds / cores, the least end to end could take",
                 f"{floor:.1f} s = {times(floor / longer)} max(intake, dispatch)")
    results.at_most(
        f"back-fill end to end ({whole['rows']:,} rows, {whole['sent']:,} uploads, 0 ms) / max(intake, dispatch)",
        f"{whole['seconds']:.1f} s against {longer:.1f} s", ratio, 1.25,
    )
