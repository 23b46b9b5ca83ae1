"""The cost of one alliance cycle against one installation per member.

    python -m bench.alliance [--visits 3000] [--latency-ms 0]

For N = 2 and 4 institutions sharing one HIS (the demo HIS, ``--visits`` settled visits
dealt out among the members; key population decided by the label API), a back-fill:

- alliance: one crowd-sync with an ``institutions:`` list reads the HIS once;
- apart: N crowd-syncs, one per member, each with its own outbox and a his.query
  filtered to its own institution (``AND v.org = ...``), run one after the other.

Printed per N: wall time, HIS window queries issued, HIS rows read, label lookups,
uploads, and this process's CPU time (the platform simulator runs in a process of its
own), then the ratios apart / alliance.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from sync import app, demo
from sync import settings as settings_mod
from sync.logs import configure
from sync.upstream.simulator import SimConfig, demo_member


@dataclass
class Cost:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    queries: int = 0
    rows: int = 0
    lookups: int = 0
    sent: int = 0

    def add(self, other: Cost) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _simulator(n: int, people: Path, latency_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync.upstream.simulator", "--port", str(port), "--institutions", str(n),
         "--people", str(people), "--latency-ms", str(latency_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the simulator did not start")


def _settings(path: Path, raw: dict[str, object]) -> settings_mod.Settings:
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return settings_mod.load(path)


def _entry(code: str) -> dict[str, str]:
    inst = next(i for i in SimConfig(other_institutions=[demo_member(n) for n in range(2, 10)]).institutions()
                if i.code == code)
    ((user, password),) = inst.accounts.items()
    return {"code": code, "name": inst.name, "app_key": inst.app_key, "username": user, "password": password}


def _run(settings: settings_mod.Settings) -> Cost:
    store = app.open_store(settings)
    store.ensure_schema()
    his = app.make_his(settings)
    cost = Cost()

    def counted(_seconds: float) -> None:
        cost.queries += 1

    his.on_query = counted
    pipeline = app.make_pipeline(settings, store, his=his, sole_sender=True)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        stats = pipeline.cycle("once")
    finally:
        pipeline.close()
        store.dispose()
    cost.wall_s, cost.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    cost.rows, cost.lookups, cost.sent = stats.rows_read, stats.lookups, stats.sent
    return cost


def measure(n: int, visits: int, latency_ms: float, work: Path) -> tuple[Cost, Cost]:
    codes = [i.code for i in SimConfig(other_institutions=[demo_member(k) for k in range(2, n + 1)]).institutions()]
    his_db = work / f"his-{n}.db"
    facts = demo.build_his(his_db, now=demo.his_now(), visits=visits, members=codes)
    people = work / "people.json"
    label = {"jjxBq": [{"code": "J01.02", "name": "农村低保对象", "remark": None, "attr1": "0", "attr2": None}],
             "rkxBq": [], "jkBq": [], "glztBq": []}
    people.write_text(json.dumps({c: {"xm": "患者", "zjhm": c, "hjdQh": "510115", **label} for c in facts.key_cards}))
    proc, url = _simulator(n, people, latency_ms)
    try:
        common: dict[str, object] = {
            "upstream": {"env": "test", "base_url": url, "concurrency": 4, "rate_limit_per_s": 1000},
            "key_crowd": {"source": "lookup"},
            "log": {"format": "console", "level": "error"},
        }
        alliance = _run(_settings(work / f"alliance-{n}.yaml", {
            **common, "institutions": [_entry(c) for c in codes],
            "his": {"url": f"sqlite:///{his_db}", "query": demo.ALLIANCE_QUERY, "settle_delay_s": 0},
            "outbox": {"url": f"sqlite:///{work / f'alliance-{n}.db'}"},
        }))
        apart = Cost()
        for code in codes:
            entry = _entry(code)
            own = demo.HIS_QUERY.rstrip() + f"\n  AND v.org = '{code}'\n"
            apart.add(_run(_settings(work / f"apart-{n}-{code}.yaml", {
                **common, "institution": {"name": entry["name"], "code": code},
                "upstream": {**common["upstream"], **{k: entry[k] for k in ("app_key", "username", "password")}},  # type: ignore[dict-item]
                "his": {"url": f"sqlite:///{his_db}", "query": own, "settle_delay_s": 0},
                "outbox": {"url": f"sqlite:///{work / f'apart-{n}-{code}.db'}"},
            })))
    finally:
        proc.terminate()
        proc.wait(10)
    return alliance, apart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alliance")
    parser.add_argument("--visits", type=int, default=3000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    configure(level="error", fmt="console")
    logging.disable(logging.WARNING)
    print(f"one back-fill of {args.visits} visits of the demo HIS; platform latency {args.latency_ms:g} ms")
    print(f"{'N':>2} {'setup':<9} {'wall s':>7} {'cpu s':>7} {'queries':>7} {'rows':>6} {'lookups':>7} {'sent':>5}")
    with tempfile.TemporaryDirectory(prefix="crowd-sync-alliance-") as tmp:
        for n in (2, 4):
            alliance, apart = measure(n, args.visits, args.latency_ms, Path(tmp))
            for name, c in (("alliance", alliance), (f"{n} apart", apart)):
                print(f"{n:>2} {name:<9} {c.wall_s:7.2f} {c.cpu_s:7.2f} {c.queries:7d} {c.rows:6d} {c.lookups:7d} {c.sent:5d}")
            print(f"{n:>2} {'ratio':<9} {apart.wall_s / alliance.wall_s:7.2f} {apart.cpu_s / alliance.cpu_s:7.2f} "
                  f"{apart.queries / max(alliance.queries, 1):7.2f} {apart.rows / max(alliance.rows, 1):6.2f} "
                  f"{apart.lookups / max(alliance.lookups, 1):7.2f}   (apart / alliance)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
