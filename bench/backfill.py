"""The back-fill, alone in a child process so that its peak RSS is its own.

``python -m bench.backfill HIS_URL OUTBOX_URL BASE_URL [--upload]`` polls the whole HIS
into a fresh outbox (``key_crowd.source: column``) and prints one JSON line of figures.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from bench.world import make_settings, make_world
from sync.logs import configure
from sync.pipeline import CycleStats


def _peak_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> int:
    his_url, outbox_url, base_url = argv[:3]
    upload = "--upload" in argv
    configure("warning", "json")
    world = make_world(make_settings(his_url=his_url, outbox_url=outbox_url, base_url=base_url, concurrency=16))
    out: dict[str, float | int] = {"rss_start_mb": round(_peak_mb(), 1)}
    try:
        stats = CycleStats()
        started, cpu = time.perf_counter(), time.process_time()
        world.pipeline.poll(stats)
        elapsed = time.perf_counter() - started
        out.update(
            rows=stats.rows_read, enqueued=stats.enqueued, skipped=stats.skipped, invalid=stats.invalid,
            poll_s=round(elapsed, 2), poll_cpu_s=round(time.process_time() - cpu, 2),
            rows_per_s=round(stats.rows_read / elapsed), rss_after_poll_mb=round(_peak_mb(), 1),
        )
        if upload:
            stats = CycleStats()
            started = time.perf_counter()
            world.pipeline.dispatch(stats)
            elapsed = time.perf_counter() - started
            out.update(
                sent=stats.sent, upload_s=round(elapsed, 2), uploads_per_s=round(stats.sent / elapsed),
                rss_after_upload_mb=round(_peak_mb(), 1),
            )
    finally:
        world.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
