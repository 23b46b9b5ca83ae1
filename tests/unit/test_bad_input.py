"""Malformed HIS rows through the real pipeline: each bad row is parked with its exact
reason, every good row reaches the platform in the same cycle.

The HIS table here keeps every column as TEXT, as many hospital systems do, so that
anything at all can be stored: NULLs, text in money columns, dates in any spelling.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from sync.app import make_pipeline
from sync.columns import COLUMNS
from sync.logs import mask_id
from sync.outbox.store import Store
from sync.pipeline import Pipeline
from sync.upstream.simulator import TEST_IDS, SimConfig, Simulator
from tests.support import his_now, write_settings

RAW_QUERY = (
    "SELECT " + ", ".join(COLUMNS) + " FROM raw_visit WHERE changed_at >= :since AND changed_at < :until"
)
ID18 = TEST_IDS[0]
ID18_X = "51010419800101009X"  # check digit X
ID15 = "510100850602003"  # first-generation card: 15 digits, no check digit
WRONG_CHECK = ID18[:-1] + "7"  # the right one is 6
# The pipeline's "today" is the schedule's time zone (Asia/Shanghai by default).
TODAY = datetime.now(ZoneInfo("Asia/Shanghai")).date()
FUTURE = (TODAY + timedelta(days=3)).isoformat()
LONG_LSH = "L" * 51
DIAG_300 = "慢性阻塞性肺疾病伴急性加重" * 23 + "一"  # 300 characters
DIAG_200 = "肺" * 200
EMOJI_DIAG = "高血压🩺 复诊😀"

_BASE: dict[str, str | None] = {
    "code": "MZ0001",
    "card_type": "10",
    "card_no": ID18,
    "visit_type": "2",
    "enter_date": "2024-01-05",
    "leave_date": None,
    "key_crowd": "1",
    "icd_name": "原发性高血压",
    "icd_code": "I10.x00",
    "total_fee": "100.00",
    "ins_fee": "60.00",
    "total_prepayment": "0.00",
    "deficient_fee": "0.00",
    "settlement_date": "2024-01-05",
}


@dataclass(frozen=True, kw_only=True)
class Case:
    lsh: str | None
    row: dict[str, str | None]
    # Accepted: these payload fields as the platform must hold them. Invalid: reason fragments.
    sent: dict[str, Any] | None = None
    reasons: tuple[str, ...] = ()
    absent: tuple[str, ...] = field(default=())  # payload keys an accepted row must not carry


def good(lsh: str, sent: dict[str, Any] | None = None, absent: tuple[str, ...] = (), **row: str | None) -> Case:
    return Case(lsh=lsh, row={**_BASE, **row}, sent=sent or {}, absent=absent)


def bad(lsh: str | None, *reasons: str, **row: str | None) -> Case:
    return Case(lsh=lsh, row={**_BASE, **row}, reasons=reasons)


_FIELD = {
    "lsh": "lsh", "code": "code", "card_type": "cardType", "card_no": "cardNo", "visit_type": "type",
    "enter_date": "enterDate", "key_crowd": "keyCrowd", "total_fee": "totalFee", "ins_fee": "insFee",
    "total_prepayment": "totalPrepayment", "deficient_fee": "deficientFee", "settlement_date": "settlementDate",
}

CORPUS: list[Case] = [
    good("G-BASE", {"cardNo": ID18, "enterDate": "2024-01-05", "totalFee": Decimal("100.00")}, absent=("leaveDate",)),
    # The five date spellings HIS databases hand out, all read as 2024-01-05.
    *(
        good(f"G-DATE-{i}", {"enterDate": "2024-01-05", "settlementDate": "2024-01-05"},
             enter_date=text, settlement_date=text)
        for i, text in enumerate(
            ("2024-01-05", "20240105", "2024/01/05", "2024-01-05 10:00:00", "2024-01-05T10:00:00")
        )
    ),
    good("G-ID15", {"cardNo": ID15}, card_no=ID15),
    good("G-IDx", {"cardNo": ID18_X}, card_no=ID18_X.lower()),
    good("G-EMOJI", {"icdName": EMOJI_DIAG}, icd_name=EMOJI_DIAG),
    good("G-DIAG200", {"icdName": DIAG_200}, icd_name=DIAG_200),
    # Three decimals are a mapping to N(8,2), rounded half-up, not a violation.
    good(
        "G-3DEC",
        {"totalFee": Decimal("10.01"), "insFee": Decimal("5.13"), "deficientFee": Decimal("0.01")},
        total_fee="10.005", ins_fee="5.125", deficient_fee="0.005",
    ),
    good("G-INPATIENT", {"type": "1", "leaveDate": "2024-01-09"}, visit_type="1", leave_date="2024-01-09 08:30:00"),
    # The optional columns may be NULL.
    good("G-NULL-icd_name", absent=("icdName",), icd_name=None),
    good("G-NULL-icd_code", absent=("icdCode",), icd_code=None),
    good("G-NULL-leave_date", absent=("leaveDate",), leave_date=None),
    # NULL in each required column, one at a time.
    *(
        bad(f"B-NULL-{column}", f"{_FIELD[column]} ({column}) = NULL: required (必填)", **{column: None})
        for column in _FIELD
        if column != "lsh"
    ),
    bad(None, "lsh (lsh) = NULL: required (必填)"),
    bad("B-NULL-leave_inpatient", "leaveDate (leave_date) = NULL: required for inpatients", visit_type="1"),
    # Text in money columns.
    bad("B-FEE-abc", 'totalFee (total_fee) = "abc": not a number (数字型 N(8,2))', total_fee="abc"),
    bad(
        "B-FEE-grouped", 'insFee (ins_fee) = "1,234.00": thousands separators are not accepted',
        ins_fee="1,234.00",
    ),
    bad("B-FEE-yuan", 'totalPrepayment (total_prepayment) = "12元": not a number', total_prepayment="12元"),
    bad("B-FEE-negative", "totalFee (total_fee) = -5.00: must not be negative (不能为负数)", total_fee="-5.00"),
    bad("B-FEE-negative-owed", "deficientFee (deficient_fee) = -0.50: must not be negative", deficient_fee="-0.5"),
    bad("B-FEE-too-big", "totalFee (total_fee) = 1000000.00: more than 999999.99", total_fee="1000000"),
    bad("B-FEE-owed-over-total", "totalFee (total_fee) = 100.00: less than deficientFee 200.00", deficient_fee="200"),
    # Dates that are not accepted.
    bad("B-DATE-feb30", 'enterDate (enter_date) = "2024-02-30": no such day in the calendar', enter_date="2024-02-30"),
    bad("B-DATE-month13", 'enterDate (enter_date) = "2024-13-01": no such day in the calendar',
        enter_date="2024-13-01"),
    bad("B-DATE-dmy", 'enterDate (enter_date) = "05/01/2024": not a date: expected yyyy-MM-dd',
        enter_date="05/01/2024"),
    bad("B-DATE-words", 'settlementDate (settlement_date) = "yesterday": not a date', settlement_date="yesterday"),
    bad("B-DATE-hour25", 'settlementDate (settlement_date) = "2024-01-05 25:00:00": not a valid time of day',
        settlement_date="2024-01-05 25:00:00"),
    bad("B-DATE-future-enter", f"enterDate (enter_date) = {FUTURE}: in the future", enter_date=FUTURE),
    bad("B-DATE-future-settle", f"settlementDate (settlement_date) = {FUTURE}: in the future",
        settlement_date=FUTURE),
    bad("B-DATE-leave-before-enter", "leaveDate (leave_date) = 2024-01-01: before enterDate 2024-01-05",
        visit_type="1", leave_date="2024-01-01"),
    bad("B-DATE-settled-before-enter", "settlementDate (settlement_date) = 2024-01-04: before enterDate 2024-01-05",
        settlement_date="2024-01-04"),
    # Lengths.
    bad(LONG_LSH, f'lsh (lsh) = "{LONG_LSH}": longer than 50 characters (长度50): has 51'),
    bad("B-DIAG300", "icdName (icd_name) = ", "longer than 200 characters (长度200): has 300", icd_name=DIAG_300),
    # ID numbers and dictionaries.
    bad("B-ID-check", f'cardNo (card_no) = "{mask_id(WRONG_CHECK)}": wrong check digit, expected 6',
        card_no=WRONG_CHECK),
    bad("B-ID-17", "cardNo (card_no) = ", "not a resident ID number: 18 characters", card_no=ID18[:17]),
    bad("B-CARDTYPE", 'cardType (card_type) = "99": not in the document\'s dictionary', card_type="99"),
    bad("B-VISITTYPE", 'type (visit_type) = "3": not a visit type', visit_type="3"),
    bad("B-KEYCROWD", 'keyCrowd (key_crowd) = "maybe": not 1 or 0', key_crowd="maybe"),
]

ACCEPTED = [c for c in CORPUS if c.sent is not None]
REJECTED = [c for c in CORPUS if c.sent is None]


@dataclass
class Site:
    sim: Simulator
    store: Store
    pipeline: Pipeline
    his: Path
    changed: datetime

    def insert(self, cases: list[Case], *, changed_at: str | None = "default") -> None:
        db = sqlite3.connect(self.his)
        try:
            for i, c in enumerate(cases):
                when = (self.changed + timedelta(seconds=i)).isoformat(" ") if changed_at == "default" else changed_at
                values = {**c.row, "lsh": c.lsh, "changed_at": when}
                db.execute(
                    f"INSERT INTO raw_visit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                    [values.get(col) for col in COLUMNS],
                )
            db.commit()
        finally:
            db.close()

    def outbox(self) -> dict[str, dict[str, Any]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM sync_outbox")).mappings().all()
        return {r["lsh"]: dict(r) for r in rows}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    his = tmp_path / "his.db"
    db = sqlite3.connect(his)
    # No types at all: the HIS keeps whatever it was given.
    db.execute("CREATE TABLE raw_visit (" + ", ".join(f"{c} TEXT" for c in COLUMNS) + ")")
    db.close()
    with Simulator(SimConfig()) as sim:
        settings = write_settings(
            tmp_path / "settings.yaml",
            his_url=f"sqlite:///{his}",
            outbox_url=f"sqlite:///{tmp_path / 'outbox.db'}",
            base_url=sim.url,
            overrides={"his": {"query": RAW_QUERY}},
        )
        store = Store(settings.outbox.url.get_secret_value(), lease_s=60)
        store.ensure_schema()
        pipeline = make_pipeline(settings, store)
        try:
            yield Site(sim, store, pipeline, his, his_now() - timedelta(minutes=30))
        finally:
            pipeline.close()
            store.dispose()


def test_corpus_is_what_it_claims() -> None:
    assert len(CORPUS) == 51
    assert len(ACCEPTED) == 15 and len(REJECTED) == 36
    # Every column is NULL in some row (lsh by a missing lsh, changed_at in its own test below;
    # institution is read only with several institutions: test_alliance parks its bad values).
    nulled = {col for c in CORPUS for col, value in c.row.items() if value is None}
    assert nulled | {"lsh", "changed_at", "institution"} == set(COLUMNS)


def test_each_bad_row_is_parked_with_its_reason_and_good_rows_flow_in_the_same_cycle(site: Site) -> None:
    # Bad and good rows interleaved, so a bad row sits between good ones in every batch.
    site.insert(sorted(CORPUS, key=lambda c: c.lsh or ""))

    stats = site.pipeline.cycle()

    assert stats.error is None
    assert stats.rows_read == len(CORPUS)
    assert stats.sent == len(ACCEPTED), stats
    assert stats.invalid == len(REJECTED), stats
    assert set(site.sim.records) == {c.lsh for c in ACCEPTED}
    # Local validation caught every rule: nothing was sent for the platform to reject.
    assert site.sim.counters["rejections"] == 0
    assert site.sim.counters["uploads"] == len(ACCEPTED)

    for c in ACCEPTED:
        assert c.lsh is not None and c.sent is not None
        held = site.sim.records[c.lsh]
        for key, value in c.sent.items():
            assert held[key] == value, (c.lsh, key, held[key])
        for key in c.absent:
            assert key not in held, (c.lsh, key)

    outbox = site.outbox()
    missing_lsh = [row for key, row in outbox.items() if key.startswith("(missing lsh)")]
    assert len(missing_lsh) == 1
    for c in REJECTED:
        row = outbox[c.lsh] if c.lsh is not None else missing_lsh[0]
        assert row["status"] == "invalid", (c.lsh, row["status"])
        error = str(row["last_error"])
        for reason in c.reasons:
            assert reason in error, (c.lsh, reason, error)
        assert "1 problem:" in error, (c.lsh, error)  # exactly the broken rule, nothing dragged along
        # The record is named, so the DBA finds it.
        assert f"record lsh={c.lsh if c.lsh is not None else '<missing>'}:" in error
    assert WRONG_CHECK not in str(outbox["B-ID-check"]["last_error"])

    # The next cycle neither re-sends nor re-parks anything.
    again = site.pipeline.cycle()
    assert (again.sent, again.invalid, again.enqueued) == (0, 0, 0)
    assert site.sim.counters["uploads"] == len(ACCEPTED)


def test_a_row_without_changed_at_is_outside_every_window(site: Site) -> None:
    # NULL >= :since is not true in SQL: the hospital's own WHERE leaves the row out.
    site.insert([good("G-NULL-changed_at")], changed_at=None)
    site.insert([good("G-AFTER")])

    stats = site.pipeline.cycle()

    assert stats.rows_read == 1
    assert set(site.sim.records) == {"G-AFTER"}
    assert "G-NULL-changed_at" not in site.outbox()


def test_a_bad_date_in_the_cursor_column_does_not_block_the_window(site: Site) -> None:
    # Text that compares inside the window but is no time: read, parked or sent, never fatal.
    stamp = (site.changed - timedelta(days=1)).strftime("%Y-%m-%d") + " 24:61:00"
    site.insert([good("G-ODD-CHANGED")], changed_at=stamp)
    site.insert([good("G-NEXT")])

    stats = site.pipeline.cycle()

    assert stats.error is None
    assert stats.rows_read == 2
    assert set(site.sim.records) == {"G-ODD-CHANGED", "G-NEXT"}
    assert date.fromisoformat(site.sim.records["G-NEXT"]["enterDate"]) == date(2024, 1, 5)


def _store_bytes(site: Site, lsh: str, column: str, raw: bytes) -> None:
    """Bytes that are not UTF-8 in a TEXT column, as a HIS fed by another program may hold."""
    db = sqlite3.connect(site.his)
    try:
        db.execute(f"UPDATE raw_visit SET {column} = CAST(? AS TEXT) WHERE lsh = ?", (raw, lsh))
        db.commit()
    finally:
        db.close()


def test_a_value_the_driver_cannot_decode_parks_its_row_and_the_window_goes_on(site: Site) -> None:
    # The bad row sits mid-window, inside the first fetch of many rows.
    site.insert([good(f"G-{n:02d}") for n in range(1, 6)] + [good("B-UTF8")] + [good(f"G-{n:02d}") for n in range(6, 11)])
    _store_bytes(site, "B-UTF8", "icd_name", "原发性".encode() + b"\xff\xfe")

    stats = site.pipeline.cycle()

    assert stats.error is None, stats.error
    assert stats.rows_read == 11 and stats.sent == 10 and stats.invalid == 1, stats
    assert set(site.sim.records) == {f"G-{n:02d}" for n in range(1, 11)}
    row = site.outbox()["B-UTF8"]
    assert row["status"] == "invalid"
    error = str(row["last_error"])
    assert "icdName (icd_name) cannot be read from the HIS database" in error
    assert "UTF-8" in error  # the driver's reason
    assert "convert the column in his.query" in error  # and the fix
    assert '"code":' in row["payload"]  # what could be read is kept for the DBA

    # The next poll re-reads the lookback: the row is isolated again, nothing changes.
    again = site.pipeline.cycle()
    assert again.error is None and (again.enqueued, again.sent, again.invalid) == (0, 0, 0), again


def test_an_unreadable_lsh_is_parked_under_the_best_key_available(site: Site) -> None:
    site.insert([good("G-BEFORE"), good("B-KEY"), good("G-AFTER")])
    _store_bytes(site, "B-KEY", "lsh", b"ZY\xff01")

    stats = site.pipeline.cycle()

    assert stats.error is None, stats.error
    assert set(site.sim.records) == {"G-BEFORE", "G-AFTER"}
    parked = [row for key, row in site.outbox().items() if key.startswith("(missing lsh)")]
    assert len(parked) == 1 and parked[0]["status"] == "invalid"
    assert "lsh (lsh) cannot be read from the HIS database" in str(parked[0]["last_error"])
