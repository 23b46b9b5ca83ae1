"""Sections 1 and 2: the ideal client, then crowd-sync's dispatch against the same simulator,
latency and concurrency.

crowd-sync reads a flat SQLite HIS (bench/seed.py) into a fresh outbox first; only
``Pipeline.dispatch`` is timed, as `crowd-sync once` runs it after its poll. Requests
are counted by the simulator (label lookups plus uploads; the one login is left out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import ideal, seed
from bench.databases import Databases
from bench.results import Results, share
from bench.simproc import Platform
from bench.world import open_world
from sync.stats import CycleStats


@dataclass(frozen=True, kw_only=True)
class Yardstick:
    """The ideal client at one latency: requests per second of each kind."""

    latency_ms: float
    lookups: ideal.Figures
    uploads: ideal.Figures

    def rate_for(self, lookups: int, uploads: int) -> float:
        """The ideal client's rate for this mix: the time it would take for the lookups and the
        uploads one after the other, at its own rate for each."""
        seconds = lookups / self.lookups.per_s + uploads / self.uploads.per_s
        return (lookups + uploads) / seconds

    def cpu_for(self, lookups: int, uploads: int) -> float:
        """The ideal client's CPU time per request for this mix, in microseconds."""
        return (lookups * self.lookups.cpu_us + uploads * self.uploads.cpu_us) / (lookups + uploads)


@dataclass(frozen=True, kw_only=True)
class Run:
    source: str
    latency_ms: float
    visits: int
    lookups: int
    uploads: int
    seconds: float
    cpu_s: float

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.requests * 1e6

    @property
    def requests(self) -> int:
        return self.lookups + self.uploads

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds


def ideal_client(
    platform: Platform, *, latency_ms: float, lookups: int, uploads: int, threads: int, say: Callable[[str], None],
) -> Yardstick:
    cards = [seed.resident_id(p) for p in range(lookups)]
    platform.label(cards)
    bodies = ideal.upload_bodies(uploads)
    platform.reset()
    platform.latency(latency_ms / 1000)
    try:
        got_lookups = ideal.run(platform.url, "lookups", cards, threads=threads)
        got_uploads = ideal.run(platform.url, "uploads", bodies, threads=threads)
    finally:
        platform.latency(0)
        platform.reset()
    for f in (got_lookups, got_uploads):
        limit = f" = {share(f.per_s / (threads / latency_ms * 1000))} of concurrency/latency" if latency_ms else ""
        say(f"  ideal client, {latency_ms:g} ms, {f.kind:7s}: {f.requests:,} in {f.seconds:.1f} s = "
            f"{f.per_s:.0f} requests/s{limit}; CPU {f.cpu_us:.0f} µs a request")
    return Yardstick(latency_ms=latency_ms, lookups=got_lookups, uploads=got_uploads)


def crowd_sync(
    dbs: Databases, platform: Platform, *, source: str, visits: int, latency_ms: float, concurrency: int,
    backend: str = "sqlite",
) -> Run:
    """crowd-sync's dispatch of ``visits`` due records: with ``lookup``, two visits per patient,
    every patient labelled (a label lookup per patient, an upload per visit)."""
    tag = f"up_{source}_{latency_ms:g}ms".replace(".", "_")
    his_url, outbox_url = dbs.url("sqlite", f"{tag}_his"), dbs.url(backend, f"{tag}_outbox")
    patients = max(1, visits // 2) if source == "lookup" else None
    seed.create(his_url)
    seed.fill(his_url, seed.visits(visits, start=seed.HISTORY_START, patients=patients, prefix=source[0].upper()))
    if patients:
        platform.label([seed.resident_id(p) for p in range(patients)])
    with open_world(his_url, outbox_url, platform.url, concurrency=concurrency, source=source) as w:
        w.pipeline.poll(CycleStats())
        platform.reset()
        platform.latency(latency_ms / 1000)
        stats = CycleStats()
        try:
            started, cpu = time.perf_counter(), time.process_time()
            w.pipeline.dispatch(stats)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            platform.latency(0)
        counters = platform.counters()
        platform.reset()
    if stats.sent != visits:
        raise RuntimeError(f"crowd-sync ({source}, {latency_ms:g} ms) sent {stats.sent} of {visits}: {stats}")
    return Run(
        source=source, latency_ms=latency_ms, visits=visits, lookups=counters.get("lookups", 0),
        uploads=counters.get("uploads", 0), seconds=elapsed, cpu_s=cpu,
    )


def report(
    results: Results, run: Run, yardstick: Yardstick | None, *, concurrency: int, say: Callable[[str], None],
) -> None:
    what = f"crowd-sync {run.source}, {run.latency_ms:g} ms"
    mix = f"{run.lookups:,} lookups + {run.uploads:,} uploads" if run.lookups else f"{run.uploads:,} uploads"
    figure = f"{mix} in {run.seconds:.1f} s = {run.per_s:.0f} requests/s"
    line = f"  {what}: {figure} (CPU {run.cpu_us:.0f} µs a request)"
    limit = concurrency / run.latency_ms * 1000 if run.latency_ms else None
    if yardstick is not None:
        ideal_rate = yardstick.rate_for(run.lookups, run.uploads)
        ideal_cpu = yardstick.cpu_for(run.lookups, run.uploads)
        line += f"; ideal client {ideal_rate:.0f}/s (CPU {ideal_cpu:.0f} µs): {share(run.per_s / ideal_rate)}"
    if limit:
        line += f"; concurrency/latency {limit:.0f}/s: {share(run.per_s / limit)}"
    say(line)
    if limit:
        results.at_least(f"{what} / concurrency/latency ({limit:.0f}/s)", figure, run.per_s / limit, 0.90)
    if yardstick is not None:
        ideal_rate = yardstick.rate_for(run.lookups, run.uploads)
        floor = 0.95 if run.latency_ms else 0.80
        results.at_least(f"{what} / ideal client ({ideal_rate:.0f}/s)", figure, run.per_s / ideal_rate, floor)
    else:
        results.info(what, figure)
