"""Section 6: the cost of one claim with a small and a large backlog of due rows.

An outbox holding ``due`` pending rows, all due now (read from the flat HIS of
bench/seed.py); the median of several claims of one dispatch batch
(``max(32, 8 * concurrency)`` rows, as ``Pipeline.dispatch`` claims), each released
before the next, so every claim sees the same backlog.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import timedelta

from bench import seed
from bench.databases import Databases
from bench.results import Results, times
from bench.simproc import Platform
from bench.world import open_world
from sync.clock import utcnow
from sync.stats import CycleStats


def his_with(dbs: Databases, rows: int) -> str:
    url = dbs.url("sqlite", "claims_his")
    seed.create(url)
    seed.fill(url, seed.visits(rows, start=seed.HISTORY_START, prefix="C"))
    return url


def claim_ms(
    dbs: Databases, platform: Platform, his_url: str, backend: str, *, due: int, concurrency: int, samples: int = 15,
) -> tuple[float, int]:
    """The median claim in milliseconds, and the batch size."""
    batch = max(32, concurrency * 8)
    with open_world(his_url, dbs.url(backend, f"claims_{due}"), platform.url, concurrency=concurrency) as w:
        stats = CycleStats()
        # The seeded visits are one second apart: this window holds exactly `due` of them.
        w.pipeline.read_window(seed.HISTORY_START, seed.HISTORY_START + timedelta(seconds=due), stats, move_cursor=False)
        if stats.enqueued != due:
            raise RuntimeError(f"expected {due} due rows, the outbox took {stats.enqueued}")
        institution = w.settings.members[0].code
        spent: list[float] = []
        for i in range(samples + 1):
            started = time.perf_counter()
            # As a dispatcher claims: its own institution's rows (the only one here).
            got = w.store.leases.claim_due(now=utcnow(), limit=batch, owner="bench", institution=institution)
            elapsed = time.perf_counter() - started
            if len(got) != min(batch, due):
                raise RuntimeError(f"a claim got {len(got)} rows, expected {min(batch, due)}")
            w.store.leases.release(got, now=utcnow())
            if i:  # the first one warms the caches
                spent.append(elapsed)
    return statistics.median(spent) * 1000, batch


def section(
    dbs: Databases, platform: Platform, backends: list[str], *, small: int, large: int, concurrency: int,
    results: Results, say: Callable[[str], None],
) -> None:
    his_url = his_with(dbs, large)
    for backend in backends:
        small_ms, batch = claim_ms(dbs, platform, his_url, backend, due=small, concurrency=concurrency)
        large_ms, _ = claim_ms(dbs, platform, his_url, backend, due=large, concurrency=concurrency)
        ratio = large_ms / small_ms
        say(f"  {backend:8s} claim of {batch} rows: {small_ms:.2f} ms with {small:,} due, {large_ms:.2f} ms with "
            f"{large:,} due = {times(ratio)}")
        results.at_most(
            f"{backend} claim of {batch}, {large:,} / {small:,} due rows", f"{large_ms:.2f} / {small_ms:.2f} ms",
            ratio, 1.5,
        )
