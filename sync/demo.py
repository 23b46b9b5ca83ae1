"""`crowd-sync demo`: the whole product on one machine, with nothing to configure.

A demo HIS in SQLite (patients, visits, settlements, diagnoses: a few hundred
visits of both types, some of key-population patients, a few broken), the
built-in platform simulator on loopback, then real cycles through the same code
the service runs: a first back-fill, a re-settlement, a quiet poll, and the
status. Everything it writes stays in one directory (default ``var/demo``).
"""

from __future__ import annotations

import random
import sqlite3
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from sync import app, idcard, localtime
from sync import settings as settings_mod
from sync.clock import current as his_clock_now
from sync.clock import utcnow
from sync.exits import exit_for
from sync.files import private_dir, touch_private, write_private
from sync.logs import mask_id
from sync.outbox.model import Status, Summary
from sync.outbox.store import Store
from sync.settings import Settings, zone
from sync.upstream.simulator import TEST_APP_KEY, TEST_IDS, TEST_PASSWORD, TEST_USERNAME, SimConfig, Simulator
from sync.views import failures
from sync.views.status import render_status, status_data

DEMO_SEED = 20241105

HIS_SCHEMA = """
CREATE TABLE patient (
    patient_id   INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    id_type      TEXT NOT NULL,          -- 10 resident ID, 50 passport ...
    id_no        TEXT NOT NULL
);
CREATE TABLE visit (
    visit_id     INTEGER PRIMARY KEY,
    serial_no    TEXT NOT NULL UNIQUE,    -- 业务流水号 lsh
    visit_no     TEXT NOT NULL,           -- 住院号/门诊号
    patient_id   INTEGER NOT NULL REFERENCES patient(patient_id),
    kind         TEXT NOT NULL,           -- 住院 / 门诊
    admitted_at  TEXT NOT NULL,
    discharged_at TEXT
);
CREATE TABLE diagnosis (
    visit_id     INTEGER NOT NULL REFERENCES visit(visit_id),
    is_main      INTEGER NOT NULL,
    icd_code     TEXT,
    icd_name     TEXT
);
CREATE TABLE settlement (
    visit_id     INTEGER PRIMARY KEY REFERENCES visit(visit_id),
    total        NUMERIC NOT NULL,
    insurance    NUMERIC NOT NULL,
    deposit      NUMERIC NOT NULL,
    owed         NUMERIC NOT NULL,
    settled_at   TEXT NOT NULL            -- last settlement or re-settlement
);
CREATE INDEX settlement_settled_at ON settlement(settled_at);
"""

HIS_QUERY = """\
SELECT v.serial_no        AS lsh,
       v.visit_no         AS code,
       p.id_type          AS card_type,
       p.id_no            AS card_no,
       CASE v.kind WHEN '住院' THEN 1 ELSE 2 END AS visit_type,
       v.admitted_at      AS enter_date,
       v.discharged_at    AS leave_date,
       d.icd_name         AS icd_name,
       d.icd_code         AS icd_code,
       s.total            AS total_fee,
       s.insurance        AS ins_fee,
       s.deposit          AS total_prepayment,
       s.owed             AS deficient_fee,
       s.settled_at       AS settlement_date,
       s.settled_at       AS changed_at
FROM settlement s
JOIN visit v   ON v.visit_id = s.visit_id
JOIN patient p ON p.patient_id = v.patient_id
LEFT JOIN diagnosis d ON d.visit_id = v.visit_id AND d.is_main = 1
WHERE s.settled_at >= :since AND s.settled_at < :until
"""

DIAGNOSES = [
    ("I10.x00", "原发性高血压"),
    ("E11.900", "2型糖尿病"),
    ("J18.900", "肺炎"),
    ("K35.800", "急性阑尾炎"),
    ("J06.900", "急性上呼吸道感染"),
    ("N18.900", "慢性肾脏病"),
    ("I63.900", "脑梗死"),
    ("M54.500", "腰痛"),
    ("S72.000", "股骨颈骨折"),
    ("O80.000", "单胎顺产"),
]
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英"


def id_number(rng: random.Random, county: str = "511425") -> str:
    """A valid resident ID number (right check digit), so that local validation passes."""
    born = date(1940, 1, 1) + timedelta(days=rng.randrange(0, 365 * 70))
    return idcard.make(county, born, rng.randrange(0, 999))


def _money(value: float) -> Decimal:
    return Decimal(str(round(value, 2))).quantize(Decimal("0.01"))


@dataclass(frozen=True, kw_only=True)
class DemoFacts:
    key_cards: list[str]  # registered as key population in the simulator
    broken: list[str]  # lsh of visits broken on purpose


# A county medical alliance's HIS: the institution of each visit in `org`; serial numbers
# are unique only within one institution (the document: lsh 只能保证院内唯一).
ALLIANCE_SCHEMA = HIS_SCHEMA.replace("serial_no    TEXT NOT NULL UNIQUE,", "serial_no    TEXT NOT NULL,").replace(
    "discharged_at TEXT\n", "discharged_at TEXT,\n    org          TEXT NOT NULL          -- 医共体成员机构编码\n"
)
ALLIANCE_QUERY = HIS_QUERY.replace("s.settled_at       AS changed_at", "s.settled_at       AS changed_at,\n       v.org AS institution")


def build_his(
    path: Path, *, now: datetime, visits: int = 300, seed: int = DEMO_SEED, members: Sequence[str] = ()
) -> DemoFacts:
    """Create the demo HIS database; returns what the demo expects to see upstream. ``members``:
    the codes of an alliance's institutions sharing it (visits dealt out in turn)."""
    rng = random.Random(seed)
    if path.exists():
        path.unlink()
    touch_private(path)
    db = sqlite3.connect(path)
    db.executescript(ALLIANCE_SCHEMA if members else HIS_SCHEMA)
    patients: list[tuple[int, str, str, str]] = []
    key_cards: list[str] = list(TEST_IDS)
    for pid in range(1, 121):
        name = rng.choice(SURNAMES) + "".join(rng.choice(GIVEN) for _ in range(rng.choice((1, 2))))
        if pid <= len(TEST_IDS):
            card_type, card = "10", TEST_IDS[pid - 1]
        elif pid % 40 == 0:
            card_type, card = "50", f"E{rng.randrange(10**7, 10**8)}"  # passport: no label lookup possible
        else:
            card_type, card = "10", id_number(rng)
            if pid % 5 == 0:
                key_cards.append(card)  # registered in the simulator as key population below
        patients.append((pid, name, card_type, card))
    db.executemany("INSERT INTO patient VALUES (?, ?, ?, ?)", patients)

    broken: list[str] = []
    numbered = dict.fromkeys(members, 0)
    for vid in range(1, visits + 1):
        pid = rng.randrange(1, len(patients) + 1)
        if vid % 4 == 0:
            pid = rng.choice((1, 2, 3)) if vid % 8 == 0 else rng.randrange(5, 121, 5)  # key population visits
        inpatient = rng.random() < 0.4
        settled = now - timedelta(days=rng.uniform(0.2, 25))
        admitted = settled - timedelta(days=rng.uniform(2, 12) if inpatient else rng.uniform(0, 0.2))
        discharged: datetime | None = settled - timedelta(hours=rng.uniform(0, 6)) if inpatient else None
        if discharged is not None and discharged < admitted:
            discharged = admitted
        total = _money(rng.uniform(800, 30000) if inpatient else rng.uniform(30, 900))
        insurance = _money(float(total) * rng.uniform(0.5, 0.9))
        deposit = _money(0 if rng.random() < 0.7 or not inpatient else rng.choice((500, 1000, 2000)))
        owed = _money(float(total - insurance) if deposit == 0 and rng.random() < 0.5 else 0)
        serial = f"{'ZY' if inpatient else 'MZ'}{settled:%Y%m%d}{vid:05d}"
        org = members[rng.randrange(len(members))] if members else ""
        if members:
            numbered[org] += 1
            serial = f"{'ZY' if inpatient else 'MZ'}{numbered[org]:06d}"  # each member numbers its own
        if vid in (17, 93):
            total = -total  # a negative total: rejected locally, never sent
            broken.append(serial)
        if vid == 151:
            inpatient, discharged = True, None  # an inpatient without a discharge date
            broken.append(serial)
        kind = "住院" if inpatient else "门诊"
        row = (vid, serial, f"{'Z' if inpatient else 'M'}{vid:07d}", pid, kind,
               f"{admitted:%Y-%m-%d %H:%M:%S}", f"{discharged:%Y-%m-%d %H:%M:%S}" if discharged else None)
        if members:
            db.execute("INSERT INTO visit VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*row, org))
        else:
            db.execute("INSERT INTO visit VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        code, name = rng.choice(DIAGNOSES)
        db.execute("INSERT INTO diagnosis VALUES (?, 1, ?, ?)", (vid, code, name))
        db.execute(
            "INSERT INTO settlement VALUES (?, ?, ?, ?, ?, ?)",
            (vid, str(total), str(insurance), str(deposit), str(owed), f"{settled:%Y-%m-%d %H:%M:%S}"),
        )
    db.commit()
    db.close()
    return DemoFacts(key_cards=key_cards, broken=broken)


def resettle_one(path: Path, *, lsh: str, now: datetime) -> None:
    """A reversed and redone settlement: new amounts, settled again now."""
    db = sqlite3.connect(path)
    db.execute(
        "UPDATE settlement SET total = total + 100, owed = 0, settled_at = ? "
        "WHERE visit_id = (SELECT visit_id FROM visit WHERE serial_no = ?)",
        (f"{now:%Y-%m-%d %H:%M:%S}", lsh),
    )
    db.commit()
    db.close()


def his_now() -> datetime:
    """Now as the demo HIS writes its times: in schedule.timezone, which the demo settings leave at
    its default and so is the HIS's zone (his.timezone), whatever this host's own zone."""
    zone = ZoneInfo(str(settings_mod.Schedule.model_fields["timezone"].default))
    return datetime.now(zone).replace(tzinfo=None, microsecond=0)


def write_settings(path: Path, *, his_db: Path, outbox_db: Path, base_url: str) -> None:
    query = textwrap.indent(HIS_QUERY, "    ")
    write_private(
        path,
        f"""\
# crowd-sync 演示配置 / demo settings (written by `crowd-sync demo`)
# 平台为内置模拟器 / the platform is the built-in simulator:
#   ./run.sh simulator --port 18080     (in another terminal)
institution:
  name: 演示县人民医院
  county_code: "511425"
upstream:
  env: test
  base_url: {base_url}
  app_key: "{TEST_APP_KEY}"
  username: {TEST_USERNAME}
  password: "{TEST_PASSWORD}"
  concurrency: 4
his:
  url: sqlite:///{his_db}
  settle_delay_s: 0
  query: |
{query}
key_crowd:
  source: lookup
outbox:
  url: sqlite:///{outbox_db}
log:
  format: console
  level: warning
""".encode(),
    )


def main(directory: str, *, out: TextIO, key_form: str = "as_printed") -> int:
    """The demo against a simulated platform signing the app key in ``key_form``
    (as_printed or decoded); the demo's settings keep ``app_key_form: auto``."""
    base = Path(directory).resolve()
    private_dir(base)
    his_db, outbox_db, settings_path = base / "his.db", base / "outbox.db", base / "settings.yaml"
    for f in (outbox_db, outbox_db.with_name(outbox_db.name + "-wal"), outbox_db.with_name(outbox_db.name + "-shm")):
        f.unlink(missing_ok=True)

    now = his_now()
    facts = build_his(his_db, now=now)
    print(f"1. 演示 HIS / demo HIS: {his_db} (300 visits, {len(facts.broken)} broken on purpose)", file=out)

    sim = Simulator(SimConfig(key_form=key_form), port=0)
    sim.start()
    try:
        for card in facts.key_cards:
            if card not in sim.config.people:
                sim.add_person(card, {
                    "xm": "演示患者", "zjhm": card, "hjdQh": "511425", "hjdQhName": "青神县",
                    "jjxBq": [{"code": "J01.02", "name": "农村低保对象", "remark": None, "attr1": "0", "attr2": None}],
                    "rkxBq": [], "jkBq": [], "glztBq": [],
                })
        print(f"2. 平台模拟器 / platform simulator: {sim.url} (app key form {key_form})", file=out)
        write_settings(settings_path, his_db=his_db, outbox_db=outbox_db, base_url=sim.url)
        settings = settings_mod.load(settings_path)
        app.register_secrets(settings)
        localtime.configure(settings.schedule.tz)

        store = app.open_store(settings)
        store.ensure_schema()
        pipeline = app.make_pipeline(settings, store, sole_sender=True)
        try:
            s1 = pipeline.cycle("once")
            print(
                f"3. 首次回填 / first back-fill: read {s1.rows_read}, sent {s1.sent} (created {s1.created}), "
                f"skipped {s1.skipped} (not key population), invalid {s1.invalid}, label lookups {s1.lookups}",
                file=out,
            )
            sent_lsh = next(iter(sorted(sim.records)))
            resettle_one(his_db, lsh=sent_lsh, now=his_now() - timedelta(seconds=1))
            s2 = pipeline.cycle("once")
            print(
                f"4. 反结算后重新结算 / re-settlement of {sent_lsh}: read {s2.rows_read}, "
                f"enqueued {s2.enqueued}, sent {s2.sent} (updated {s2.updated}: 修改成功)",
                file=out,
            )
            s3 = pipeline.cycle("once")
            print(f"5. 无变化再轮询 / quiet poll: read {s3.rows_read}, enqueued {s3.enqueued}, sent {s3.sent}", file=out)
        finally:
            pipeline.close()
        summary = store.summary(now=utcnow())
        print("", file=out)
        print(status_text(store, settings, summary), file=out)
        counters = sim.counters
        print(
            f"\n平台收到 / the simulator saw: {counters['logins']} login(s) "
            f"(+{counters['gateway_rejections']} refused while learning the app key's reading), "
            f"{counters['lookups']} label lookups, "
            f"{counters['uploads']} uploads ({counters['creates']} created, {counters['updates']} updated), "
            f"{len(sim.records)} records held",
            file=out,
        )
        example = next(iter(sim.records.values()), None)
        if example is not None:
            print(f"   e.g. lsh {example.get('lsh')} cardNo {mask_id(str(example.get('cardNo')))} "
                  f"totalFee {example.get('totalFee')} totalPrepayment {example.get('totalPrepayment')}", file=out)
        _show_failures(store, settings, out)
        exit_code = exit_for(summary)
        store.dispose()
    finally:
        sim.stop()
    ok = summary.key_form is not None and summary.key_form.get("form") == key_form
    ok = ok and s2.updated == 1 and s3.enqueued == 0 and s3.sent == 0 and summary.counts.get(Status.INVALID, 0) == len(facts.broken)
    print(
        textwrap.dedent(
            f"""
            下一步 / where to look next:
              ./run.sh status --config {settings_path}
              ./run.sh failures --config {settings_path}
              ./run.sh show LSH --config {settings_path}
              ./run.sh check --offline --config {settings_path}
              ./run.sh simulator --port 18080   # then edit base_url in {settings_path} and: ./run.sh once --config {settings_path}
            演示{'成功' if ok else '结果异常'} / demo {'finished as expected' if ok else 'did NOT behave as expected'}
              (exit code of a real `once` here would be {exit_code}: invalid records are left for a person to fix)
            """
        ),
        file=out,
    )
    return 0 if ok else 1


def status_text(store: Store, settings: Settings, summary: Summary) -> str:
    """What `crowd-sync status` prints for the demo's outbox."""
    now = utcnow()
    cursor = store.queue.get_cursor()
    his_clock = his_clock_now(store.state.get_his_clock(), cursor[0] if cursor else None, now_utc=now)
    return render_status(status_data(
        summary, now, outbox=store.url_for_humans, settings=settings, his_clock=his_clock, **store.service()
    ))


def _show_failures(store: Store, settings: Settings, out: TextIO) -> None:
    """What an operator does next: the records not sent (`failures`), then one of them in full (`show`)."""
    tz = settings.schedule.tz
    offset = localtime.offset_text(tz)
    items = failures.failure_items(store.problems(failures.DEFAULT_STATUSES), tz)
    print("\n$ crowd-sync failures", file=out)
    print(failures.render_failures(
        items, statuses=failures.DEFAULT_STATUSES, since=None, outbox=store.url_for_humans,
        zone=settings.schedule.timezone, offset=offset,
    ), file=out)
    if not items:
        return
    lsh = str(items[0]["lsh"])
    row = store.visit(lsh)
    assert row is not None
    story = failures.story(row, store.attempts(lsh), labels=None, tz=tz, his_tz=zone(settings.his_timezone), unmask=False)
    print(f"\n$ crowd-sync show {lsh}", file=out)
    print(failures.render_story(
        story, zone=settings.schedule.timezone, offset=offset, keep_days=settings.outbox.keep_attempts_days,
    ), file=out)
