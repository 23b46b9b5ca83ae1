"""Crash soak: the crash-safety harness of tests/e2e/test_crash.py with larger numbers.

Seeds a SQLite HIS, starts `crowd-sync run` against the built-in simulator, SIGKILLs
it at random moments and restarts it, lets the last one drain, and checks that the
platform holds exactly the key-population visits. Prints kills, duplicates and the
time to drain.

    .venv/bin/python -m bench.soak_crash --visits 2000 --kills 30
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    # Run as a file (python bench/soak_crash.py): import from the project directory, as -m does,
    # instead of from bench/.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from sync.upstream.simulator import SimConfig, Simulator
from tests.e2e.test_crash import CONCURRENCY, Harness, random_kills


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visits", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--latency-ms", type=float, default=40, help="the platform's delay before every answer")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, databases)")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="crowd-sync-soak-")
    try:
        return soak(Path(tmp), args)
    finally:
        if args.keep:
            print(f"  kept              {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def soak(tmp: Path, args: argparse.Namespace) -> int:
    with Simulator(SimConfig()) as sim:
        started = time.monotonic()
        h = Harness.create(tmp, sim, visits=args.visits, seed=args.seed, latency_s=args.latency_ms / 1000)
        figures = random_kills(h, kills=args.kills, seed=args.seed)
        h.check(figures)
        print(f"soak passed in {time.monotonic() - started:.1f}s")
        print(f"  visits            {figures.visits} ({figures.key_visits} key population)")
        print(f"  kills             {figures.kills} ({figures.kills_while_uploading} while uploading)")
        print(f"  duplicates        {figures.duplicates} (bound {CONCURRENCY * figures.kills})")
        print(f"  logins            {figures.logins}")
        print(f"  drain after last  {figures.drain_s:.1f}s")
        print(f"  daemon starts     {h.starts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
