"""`crowd-sync demo --institutions N`: a county medical alliance (医共体) on one machine.

N members share one demo HIS (its ``org`` column names each visit's institution, and the
members' serial numbers overlap: lsh is unique only within one institution); the built-in
simulator plays each member with its own app key and account (``demo_member``). One
crowd-sync reads the HIS once per cycle and sends each member's visits under its own
account; the platform ends up holding each member's records apart.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path
from typing import TextIO

from sync import app, localtime
from sync import settings as settings_mod
from sync.clock import utcnow
from sync.demo import ALLIANCE_QUERY, build_his, his_now, status_text
from sync.files import private_dir, write_private
from sync.upstream.simulator import Institution, SimConfig, Simulator, demo_member


def write_settings(path: Path, *, his_db: Path, outbox_db: Path, base_url: str, members: list[Institution]) -> None:
    entries = "".join(
        f"""\
  - code: "{m.code}"
    name: {m.name}
    county_code: "{m.county_code}"
    app_key: "{m.app_key}"
    username: {next(iter(m.accounts))}
    password: "{next(iter(m.accounts.values()))}"
"""
        for m in members
    )
    write_private(
        path,
        f"""\
# crowd-sync 医共体演示配置 / alliance demo settings (written by `crowd-sync demo --institutions {len(members)}`)
institutions:
{entries}upstream:
  env: test
  base_url: {base_url}
  concurrency: 4
his:
  url: sqlite:///{his_db}
  settle_delay_s: 0
  query: |
{textwrap.indent(ALLIANCE_QUERY, "    ")}
key_crowd:
  source: lookup
outbox:
  url: sqlite:///{outbox_db}
log:
  format: console
  level: warning
""".encode(),
    )


def main(directory: str, *, out: TextIO, institutions: int) -> int:
    """The alliance demo with ``institutions`` members (at least 2)."""
    base = Path(directory).resolve()
    private_dir(base)
    his_db, outbox_db, settings_path = base / "his.db", base / "outbox.db", base / "settings.yaml"
    for f in (outbox_db, outbox_db.with_name(outbox_db.name + "-wal"), outbox_db.with_name(outbox_db.name + "-shm")):
        f.unlink(missing_ok=True)
    sim = Simulator(SimConfig(other_institutions=[demo_member(n) for n in range(2, institutions + 1)]), port=0)
    members = sim.config.institutions()
    codes = [m.code for m in members]
    facts = build_his(his_db, now=his_now(), members=codes)
    print(f"1. 医共体共用的演示 HIS / the alliance's one demo HIS: {his_db} (300 visits of {institutions} "
          f"institutions, {len(facts.broken)} broken on purpose)", file=out)
    sim.start()
    try:
        for card in facts.key_cards:
            if card not in sim.config.people:
                sim.add_person(card, {
                    "xm": "演示患者", "zjhm": card, "hjdQh": "510115", "hjdQhName": "温江区",
                    "jjxBq": [{"code": "J01.02", "name": "农村低保对象", "remark": None, "attr1": "0", "attr2": None}],
                    "rkxBq": [], "jkBq": [], "glztBq": [],
                })
        print(f"2. 平台模拟器 / platform simulator: {sim.url}, {institutions} institutions, each with its own "
              "app key and account", file=out)
        write_settings(settings_path, his_db=his_db, outbox_db=outbox_db, base_url=sim.url, members=members)
        settings = settings_mod.load(settings_path)
        app.register_secrets(settings)
        localtime.configure(settings.schedule.tz)
        store = app.open_store(settings)
        store.ensure_schema()
        pipeline = app.make_pipeline(settings, store, sole_sender=True)
        try:
            s1 = pipeline.cycle("once")
            s2 = pipeline.cycle("once")
        finally:
            pipeline.close()
        print(f"3. 一次回填 / one back-fill: read {s1.rows_read} rows in one pass over the HIS, sent {s1.sent}, "
              f"skipped {s1.skipped}, invalid {s1.invalid}; quiet poll after it: sent {s2.sent}", file=out)
        print("\n各机构 / each institution (what the platform holds under its account):", file=out)
        lsh_seen: Counter[str] = Counter()
        for m in members:
            records = sim.records_of(m.code)
            lsh_seen.update(list(records))
            c = sim.counters_of(m.code)
            print(f"   {m.code} {m.name}: {len(records)} records, account {next(iter(m.accounts))}, "
                  f"{c['logins']} login(s), {c['uploads']} uploads, FAQ 14 mismatches {c['key_mismatches']}", file=out)
        shared = sum(1 for n in lsh_seen.values() if n > 1)
        print(f"   同一流水号在多个机构 / the same lsh at several institutions: {shared}, each kept apart", file=out)
        summary = store.summary(now=utcnow(), institutions=codes)
        print("", file=out)
        print(status_text(store, settings, summary), file=out)
        store.dispose()
    finally:
        sim.stop()
    ok = (
        s2.sent == 0 and shared > 0 and all(sim.counters_of(c)["key_mismatches"] == 0 for c in codes)
        and all(sim.records_of(c) for c in codes) and summary.counts.get("sent", 0) == len(sim.all_records())
    )
    print(f"\n演示{'成功' if ok else '结果异常'} / demo {'finished as expected' if ok else 'did NOT behave as expected'}"
          f" — ./run.sh status --config {settings_path}", file=out)
    return 0 if ok else 1
