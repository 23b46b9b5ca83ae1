"""The month's report: the figures the province computes from what was uploaded."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import random
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sync import records
from sync.app import make_pipeline
from sync.outbox.model import Failed, Incoming, Parked, Sent, Status
from sync.outbox.store import Store, month_queries
from sync.report import (
    Uploaded,
    csv_bytes,
    month_bounds,
    month_report,
    parse_month,
    render_table,
)
from sync.upstream.simulator import SimConfig, Simulator
from tests.support import His, his_now, make_visit, write_settings

ROOT = Path(__file__).resolve().parents[2]
OCTOBER = date(2026, 10, 1)
NOW = datetime(2026, 11, 2, 1, 0, 0)
D = Decimal


# -- the month argument ----------------------------------------------------------------


def test_month_is_read_as_yyyy_mm_and_bounds_are_half_open() -> None:
    assert parse_month("2026-10") == OCTOBER
    assert month_bounds(parse_month("2026-12")) == (date(2026, 12, 1), date(2027, 1, 1))
    for bad in ("2026-13", "2026-00", "2026-1", "26-10", "2026/10", "2026-10-01", ""):
        with pytest.raises(ValueError, match="YYYY-MM"):
            parse_month(bad)


# -- every figure from a seeded outbox ----------------------------------------------------


def _payload(lsh: str, kind: str, settled: date, *, total: str, ins: str, deposit: str, owed: str, key: str = "1") -> str:
    p: dict[str, Any] = {
        "cardType": "10", "cardNo": "510100198506020036", "type": kind, "lsh": lsh, "code": f"C{lsh}",
        "enterDate": (settled - timedelta(days=3)).isoformat(), "keyCrowd": key,
        "totalFee": D(total), "insFee": D(ins), "totalPrepayment": D(deposit), "deficientFee": D(owed),
        "settlementDate": settled.isoformat(),
    }
    if kind == "1":
        p["leaveDate"] = settled.isoformat()
    return records.payload_json(p)


def _incoming(lsh: str, kind: str | None, settled: date, status: Status, payload: str) -> Incoming:
    return Incoming(
        lsh=lsh, payload_json=payload, payload_hash=hashlib.sha256(payload.encode()).hexdigest(),
        status=status, key_crowd=None, reason=None if status is Status.PENDING else "seeded",
        source_changed_at=NOW, card_type="10", card_no="510100198506020036", visit_type=kind, settlement_date=settled,
    )


def _seed(store: Store) -> None:
    """One settlement month (October 2026) with every kind of row, and its neighbours.

    sent: lsh -> (type, settlement date, amounts, keyCrowd as sent, keyCrowd as enqueued)
    """
    sent = {
        # inpatient, key population
        "A1": ("1", date(2026, 10, 1), {"total": "1000.10", "ins": "600.06", "deposit": "0.00", "owed": "400.04"}),
        "A2": ("1", date(2026, 10, 31), {"total": "2000.20", "ins": "1500.00", "deposit": "500.00", "owed": "0.00"}),
        "A3": ("1", date(2026, 10, 15), {"total": "0.10", "ins": "0.00", "deposit": "0.00", "owed": "0.10"}),
        # enqueued with keyCrowd 0 (undecided), decided key population at dispatch: the sent payload counts
        "E1": ("1", date(2026, 10, 5), {"total": "300.00", "ins": "200.00", "deposit": "0.00", "owed": "100.00"}),
        # outpatient, key population
        "B1": ("2", date(2026, 10, 10), {"total": "0.20", "ins": "0.10", "deposit": "0.00", "owed": "0.10"}),
        "B2": ("2", date(2026, 10, 20), {"total": "150.35", "ins": "90.21", "deposit": "10.00", "owed": "0.00"}),
        # outside the month
        "C1": ("1", date(2026, 9, 30), {"total": "77.00", "ins": "7.00", "deposit": "0.00", "owed": "0.00"}),
        "C2": ("2", date(2026, 11, 1), {"total": "88.00", "ins": "8.00", "deposit": "0.00", "owed": "0.00"}),
        # uploaded with keyCrowd 0 (upload_only_key_crowd: false): not in the province's figures
        "D1": ("2", date(2026, 10, 12), {"total": "999.00", "ins": "9.00", "deposit": "0.00", "owed": "0.00"}),
    }
    parked = [  # lsh, visit type, settlement date, final status
        ("P1", "2", date(2026, 10, 3), Status.PENDING),
        ("P2", "1", date(2026, 11, 1), Status.PENDING),  # next month
        ("F1", "1", date(2026, 10, 4), Status.FAILED),
        ("F2", "2", date(2026, 10, 30), Status.FAILED),
        ("I1", "1", date(2026, 10, 6), Status.INVALID),
        ("I2", None, date(2026, 10, 7), Status.INVALID),  # the HIS row had no usable visit type
        ("X1", "2", date(2026, 10, 8), Status.DEAD),
        ("S1", "1", date(2026, 10, 9), Status.SKIPPED),
        ("S2", "2", date(2026, 10, 9), Status.SKIPPED),
        ("S3", "2", date(2026, 10, 31), Status.SKIPPED),
        ("S4", "2", date(2026, 9, 30), Status.SKIPPED),  # previous month
    ]
    items = []
    for lsh, (kind, settled, money) in sent.items():
        enqueued_key = "0" if lsh == "E1" else ("0" if lsh == "D1" else "1")
        items.append(_incoming(lsh, kind, settled, Status.PENDING, _payload(lsh, kind, settled, key=enqueued_key, **money)))
    for lsh, kind, settled, status in parked:
        first = Status.PENDING if status in (Status.FAILED, Status.DEAD) else status
        payload = _payload(lsh, kind or "1", settled, total="5.00", ins="1.00", deposit="0.00", owed="0.00")
        items.append(_incoming(lsh, kind, settled, first, payload))
    store.queue.enqueue(items, now=NOW)

    claims = {c.lsh: c for c in store.leases.claim_due(now=NOW, limit=100, owner="test")}
    for lsh, (kind, settled, money) in sent.items():
        key = "0" if lsh == "D1" else "1"
        body = _payload(lsh, kind, settled, key=key, **money)
        assert store.leases.record([Sent(claimed=claims.pop(lsh), body=body, key_crowd=key, answer="新增成功", http_status=200, at=NOW)])[0]
    for lsh in ("F1", "F2"):
        store.leases.record([Failed(claimed=claims.pop(lsh), error="504", http_status=504, at=NOW, retry_at=NOW + timedelta(hours=1), generic=False)])
    store.leases.record([Parked(claimed=claims.pop("X1"), status=Status.DEAD, error="504 for 72 h", http_status=504, at=NOW)])
    store.leases.release(claims.values(), now=NOW)  # P1, P2 stay pending


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'outbox.db'}")
    store.ensure_schema()
    _seed(store)
    yield store
    store.dispose()


# Worked out by hand from the seed above.
EXPECTED_INPATIENT = Uploaded(
    visits=4, zero_deposit=3, with_deposit=1, total_fee=D("3300.40"), ins_fee=D("2300.06"), deficient_fee=D("500.14")
)
EXPECTED_OUTPATIENT = Uploaded(
    visits=2, zero_deposit=1, with_deposit=1, total_fee=D("150.55"), ins_fee=D("90.31"), deficient_fee=D("0.10")
)


def test_every_figure_of_the_month(seeded: Store) -> None:
    r = month_report(seeded, OCTOBER)

    assert r.uploaded["1"] == EXPECTED_INPATIENT
    assert r.uploaded["2"] == EXPECTED_OUTPATIENT
    assert r.uploaded["?"] == Uploaded()
    assert r.uploaded_total() == Uploaded(
        visits=6, zero_deposit=4, with_deposit=2, total_fee=D("3450.95"), ins_fee=D("2390.37"), deficient_fee=D("500.24")
    )
    assert all(isinstance(v, Decimal) for v in (r.uploaded_total().total_fee, r.uploaded["1"].ins_fee))
    assert {s: {t: n for t, n in by.items() if n} for s, by in r.not_upstream.items()} == {
        "pending": {"2": 1}, "failed": {"1": 1, "2": 1}, "invalid": {"1": 1, "?": 1}, "dead": {"2": 1},
    }
    assert r.waiting() == 6
    assert r.skipped == {"1": 1, "2": 2, "?": 0}
    assert r.sent_not_key_crowd == {"1": 0, "2": 1, "?": 0}
    assert r.unreadable == 0


def test_an_empty_month_is_all_zeros(seeded: Store) -> None:
    r = month_report(seeded, date(2026, 8, 1))
    assert r.uploaded_total() == Uploaded() and r.waiting() == 0 and sum(r.skipped.values()) == 0
    assert "3450.95" not in render_table(r)


def _csv_rows(data: bytes) -> dict[str, list[str]]:
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    assert rows[0] == ["月份 month", "代码 code", "项目 item", "住院 inpatient", "门诊 outpatient", "类型未知 type unknown", "合计 total"]
    assert all(row[0] == "2026-10" for row in rows[1:])
    return {row[1]: row[3:] for row in rows[1:]}


def test_csv_opens_in_excel_and_parses_back_to_the_same_figures(seeded: Store) -> None:
    data = csv_bytes(month_report(seeded, OCTOBER))

    assert data.startswith(codecs.BOM_UTF8)  # Excel reads UTF-8 Chinese only with the BOM
    assert b"\r\n" in data
    by_code = _csv_rows(data)
    assert by_code["uploaded"] == ["4", "2", "0", "6"]
    assert by_code["zero_deposit"] == ["3", "1", "0", "4"]
    assert by_code["with_deposit"] == ["1", "1", "0", "2"]
    assert by_code["total_fee"] == ["3300.40", "150.55", "0.00", "3450.95"]
    assert by_code["ins_fee"] == ["2300.06", "90.31", "0.00", "2390.37"]
    assert by_code["deficient_fee"] == ["500.14", "0.10", "0.00", "500.24"]
    assert by_code["not_upstream"] == ["2", "3", "1", "6"]
    assert by_code["pending"] == ["0", "1", "0", "1"]
    assert by_code["failed"] == ["1", "1", "0", "2"]
    assert by_code["invalid"] == ["1", "0", "1", "2"]
    assert by_code["dead"] == ["0", "1", "0", "1"]
    assert by_code["skipped"] == ["1", "2", "0", "3"]
    assert by_code["sent_not_key_crowd"] == ["0", "1", "0", "1"]
    # The money parses back to exactly the Decimal sums.
    assert sum((D(v) for v in by_code["total_fee"][:3]), D(0)) == D(by_code["total_fee"][3])


def _table_row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.strip().startswith(label))
    return line.split()[-4:]


def test_terminal_table_has_chinese_and_english_labels_and_the_figures(seeded: Store) -> None:
    table = render_table(month_report(seeded, OCTOBER), outbox="sqlite:///outbox.db")

    assert "月报 / monthly report 2026-10" in table
    header_zh, header_en = table.splitlines()[3:5]
    assert header_zh.split() == ["项目", "住院", "门诊", "类型未知", "合计"]
    assert header_en.split() == ["item", "inpatient", "outpatient", "type", "unknown", "total"]
    assert _table_row(table, "已上传重点人群就诊") == ["4", "2", "0", "6"]
    assert _table_row(table, "零预交金") == ["3", "1", "0", "4"]
    assert _table_row(table, "总费用") == ["3300.40", "150.55", "0.00", "3450.95"]
    assert _table_row(table, "欠费金额") == ["500.14", "0.10", "0.00", "500.24"]
    assert _table_row(table, "数据不合规") == ["1", "0", "1", "2"]
    assert _table_row(table, "非重点人群") == ["1", "2", "0", "3"]
    assert "6 visit(s) of this month are not upstream yet" in table


def test_the_month_filter_runs_in_sql_on_the_settlement_date_index(seeded: Store) -> None:
    db = sqlite3.connect(str(seeded.engine.url.database))
    try:
        for query in month_queries(*month_bounds(OCTOBER)):
            compiled = query.compile(seeded.engine, compile_kwargs={"literal_binds": True})
            plan = " ".join(str(row[-1]) for row in db.execute(f"EXPLAIN QUERY PLAN {compiled}"))
            assert "ix_sync_outbox_settlement_date" in plan, plan
    finally:
        db.close()


# -- the platform's view after a real run -----------------------------------------------------


def _province_view(platform: Mapping[str, Mapping[str, Any]], month: str) -> dict[str, Uploaded]:
    """What the province computes from the records it holds (independent of sync.report)."""
    out: dict[str, Uploaded] = {}
    for rec in platform.values():
        if not rec["settlementDate"].startswith(month) or rec["keyCrowd"] != "1":
            continue
        u = out.get(rec["type"], Uploaded())
        zero = rec["totalPrepayment"] == 0
        out[rec["type"]] = Uploaded(
            visits=u.visits + 1, zero_deposit=u.zero_deposit + zero, with_deposit=u.with_deposit + (not zero),
            total_fee=u.total_fee + rec["totalFee"], ins_fee=u.ins_fee + rec["insFee"],
            deficient_fee=u.deficient_fee + rec["deficientFee"],
        )
    return out


def test_report_after_a_real_run_matches_what_the_platform_holds(tmp_path: Path) -> None:
    rng = random.Random(7)
    past = his_now() - timedelta(hours=2)
    days = [date(2026, 9, 30), date(2026, 10, 1), date(2026, 10, 17), date(2026, 10, 31), date(2026, 11, 1)]

    def visit(n: int, **over: Any) -> dict[str, Any]:
        settled = datetime.combine(days[n % len(days)], datetime.min.time()) + timedelta(hours=9)
        v = make_visit(n, changed=past + timedelta(seconds=n), rng=rng)
        inpatient = v["kind"] == 1
        v.update(
            admitted=settled - timedelta(days=4 if inpatient else 0), discharged=settled if inpatient else None,
            settled=settled, deposit=D("0.00") if rng.random() < 0.6 else D(rng.randrange(100, 99999)) / 100,
        )
        v.update(over)
        return v

    with Simulator(SimConfig()) as sim:
        his = His(f"sqlite:///{tmp_path / 'his.db'}")
        settings = write_settings(
            tmp_path / "settings.yaml", his_url=his.url, outbox_url=f"sqlite:///{tmp_path / 'outbox.db'}",
            base_url=sim.url,
        )
        store = Store(settings.outbox.url.get_secret_value())
        store.ensure_schema()
        pipeline = make_pipeline(settings, store)
        try:
            his.insert(visit(n) for n in range(1, 41))
            his.insert([visit(41, is_key="0"), visit(42, is_key="0"), visit(43, owed=D("99999.00"))])
            pipeline.cycle()
            # A re-settlement after upload: the platform's copy is overwritten, the report follows it.
            just_now = his.now().replace(microsecond=0) - timedelta(seconds=2)
            his.update("LSH000002", total=D("123.45"), insurance=D("100.00"), owed=D("0.00"), deposit=D("50.00"),
                       changed=just_now)
            pipeline.cycle()
            # Three more October visits meet a platform that does not confirm storing them.
            his.insert(visit(n, changed=just_now) for n in (46, 51, 56))
            store.token_store().renew(None, pipeline.client.login)  # the next requests are the uploads
            sim.faults.next_fake = 3  # {"code":200,"data":"保存失败"}
            pipeline.cycle()

            r = month_report(store, OCTOBER)
        finally:
            pipeline.close()
            store.dispose()
            his.dispose()

    province = _province_view(sim.records, "2026-10")
    assert sim.records["LSH000002"]["totalFee"] == D("123.45")
    assert {t: u for t, u in r.uploaded.items() if u.visits} == province
    assert r.uploaded_total().visits == 24  # 3 of the 5 settlement days of visits 1-40 are in October
    assert sum(r.not_upstream["failed"].values()) == 3
    assert sum(r.not_upstream["invalid"].values()) == 1  # 43: owes more than it cost, October 31
    assert sum(r.skipped.values()) == 2  # 41 and 42, both settled in October


# -- the command ----------------------------------------------------------------------------------


def _crowd_sync(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_report_command_prints_the_table_and_writes_the_csv(seeded: Store, tmp_path: Path) -> None:
    write_settings(
        tmp_path / "settings.yaml", his_url=f"sqlite:///{tmp_path / 'his.db'}",
        outbox_url=f"sqlite:///{tmp_path / 'outbox.db'}", base_url="http://127.0.0.1:9",
    )
    done = _crowd_sync("report", "--month", "2026-10", "--csv", "october.csv", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert _table_row(done.stdout, "零预交金") == ["3", "1", "0", "4"]
    assert _table_row(done.stdout, "总费用") == ["3300.40", "150.55", "0.00", "3450.95"]
    data = (tmp_path / "october.csv").read_bytes()
    assert data.startswith(codecs.BOM_UTF8)
    assert _csv_rows(data)["ins_fee"] == ["2300.06", "90.31", "0.00", "2390.37"]

    bad = _crowd_sync("report", "--month", "2026-13", cwd=tmp_path)
    assert bad.returncode == 2
    assert "YYYY-MM" in bad.stderr


# -- the DBA guide's SQL -----------------------------------------------------------------------------


def guide_statements(tag: str) -> list[str]:
    """The statements of the guide's code blocks tagged exactly ``tag`` (```sql, ```sql mysql...)."""
    text = (ROOT / "docs" / "dba.md").read_text(encoding="utf-8")
    blocks = re.findall(rf"^```{re.escape(tag)}\n(.*?)^```$", text, flags=re.S | re.M)
    parts = (p for block in blocks for p in re.split(r";[^\S\n]*(?:--[^\n]*)?$", block, flags=re.M))
    return [p.strip() for p in parts if any(line.strip() and not line.strip().startswith("--") for line in p.splitlines())]


def test_every_sqlite_query_of_the_dba_guide_runs_and_the_month_query_agrees(seeded: Store) -> None:
    statements = guide_statements("sql")
    assert len(statements) >= 2 * 10  # the ten queries, in Chinese and in English
    db = sqlite3.connect(str(seeded.engine.url.database))
    try:
        for sql in statements:
            db.execute(sql).fetchall()
            db.rollback()  # the requeue examples change nothing here
        month = [s for s in statements if "$.keyCrowd" in s]
        assert len(month) == 2
        rows = db.execute(month[0]).fetchall()
    finally:
        db.close()
    r = month_report(seeded, OCTOBER)
    assert [(t, n, z, w, D(str(fee)), D(str(ins)), D(str(owed))) for t, n, z, w, fee, ins, owed in rows] == [
        (t, u.visits, u.zero_deposit, u.with_deposit, u.total_fee, u.ins_fee, u.deficient_fee)
        for t, u in sorted(r.uploaded.items()) if u.visits
    ]
