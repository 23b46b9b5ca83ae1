"""The shortcuts taken for back-fill speed change nothing a user can see: the same bytes
on the wire (and so the same hashes), and batches committed in order with the cursor."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync import records
from sync.app import make_pipeline
from sync.columns import normalize_row
from sync.outbox.model import EnqueueResult, Incoming, Status
from sync.outbox.queue import Queue
from sync.outbox.schema import sync_outbox
from sync.outbox.store import Store
from sync.stats import CycleStats
from sync.upstream.simulator import SimConfig, Simulator
from tests.support import His, his_now, make_visit, write_settings


def reference_json(payload: dict[str, Any]) -> str:
    """The canonical JSON written the slow, obvious way: json.dumps per string, money
    through parse_money."""
    parts = []
    for field in records.FIELDS:
        value = payload.get(field)
        if value is None:
            continue
        if field in records.MONEY_FIELDS:
            text = format(records.parse_money(value), "f")
        else:
            text = json.dumps(value, ensure_ascii=False)
        parts.append(f"{json.dumps(field)}:{text}")
    return "{" + ",".join(parts) + "}"


AMOUNTS: list[Any] = [
    Decimal("0.00"), Decimal("-0.00"), Decimal("0"), Decimal("12.5"), Decimal("1.005"), Decimal("999999.99"),
    Decimal("1000000.00"), Decimal("0012.30"), Decimal("1E+2"), Decimal("12.345"), Decimal("-5.00"),
    Decimal("5.00"), 7, 0.1, "88.10", "3",
]
TEXTS = ["简单", 'a"b\\c', "tab\tnew\nline", "\x01\x1f", "\u2028\u2029", "😀 emoji", "</script>", "  spaced  "]


def test_payload_json_is_byte_identical_to_the_plain_encoder() -> None:
    rng = random.Random(7)
    for i in range(400):
        payload: dict[str, Any] = {
            "cardType": "10", "cardNo": "510100198506020036", "type": "1", "lsh": f"L{i}",
            "code": rng.choice(TEXTS), "enterDate": "2024-05-01", "keyCrowd": "1",
            "icdName": rng.choice(TEXTS), "settlementDate": "2024-05-02",
        }
        if i % 2:
            payload["leaveDate"] = "2024-05-02"
        for field in records.MONEY_FIELDS:
            payload[field] = rng.choice(AMOUNTS)
        text = records.payload_json(payload)
        assert text == reference_json(payload)
        assert records.payload_hash(payload) == records.text_hash(text)
        assert json.loads(text, parse_float=Decimal)["lsh"] == f"L{i}"


def test_rows_with_upper_case_keys_still_build_the_same_payload() -> None:
    visit = make_visit(3, changed=datetime(2024, 5, 3, 10, 0))
    canonical = {
        "lsh": visit["serial_no"], "code": visit["visit_no"], "card_type": visit["id_type"],
        "card_no": visit["id_no"], "visit_type": visit["kind"], "enter_date": visit["admitted"],
        "leave_date": visit["discharged"], "key_crowd": "1", "icd_name": visit["diag_name"],
        "icd_code": visit["diag_code"], "total_fee": visit["total"], "ins_fee": visit["insurance"],
        "total_prepayment": visit["deposit"], "deficient_fee": visit["owed"],
        "settlement_date": visit["settled"], "changed_at": visit["changed"],
    }
    oracle = {f" {k.upper()} ": v for k, v in canonical.items()}
    today = datetime(2024, 6, 1).date()
    assert records.build(oracle, today=today) == records.build(canonical, today=today)
    copy = normalize_row(canonical)
    copy["lsh"] = "changed"
    assert canonical["lsh"] == visit["serial_no"]  # normalize_row never hands back the caller's dict


class FailingQueue(Queue):
    """The outbox database failing on the n-th batch (a full disk, a lost server)."""

    fail_on = 3

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        self.calls = 0

    def enqueue(
        self, items: Sequence[Incoming], *, now: datetime, cursor: tuple[datetime, str] | None = None
    ) -> EnqueueResult:
        self.calls += 1
        if self.calls == self.fail_on:
            raise sa.exc.OperationalError("INSERT", {}, Exception("disk I/O error"))
        return super().enqueue(items, now=now, cursor=cursor)


def test_a_failing_batch_stops_the_poll_with_earlier_batches_and_cursor_recorded(tmp_path: Path) -> None:
    with Simulator(SimConfig()) as sim:
        settings = write_settings(
            tmp_path / "settings.yaml", his_url=f"sqlite:///{tmp_path / 'his.db'}",
            outbox_url=f"sqlite:///{tmp_path / 'outbox.db'}", base_url=sim.url, overrides={"his": {"batch_size": 10}},
        )
        his = His(settings.his.url.get_secret_value())
        start = his_now() - timedelta(hours=2)
        his.insert(make_visit(n, changed=start + timedelta(seconds=n)) for n in range(1, 51))
        store = Store(settings.outbox.url.get_secret_value())
        store.ensure_schema()
        store.queue = failing = FailingQueue(store.engine)
        pipeline = make_pipeline(settings, store)
        try:
            with pytest.raises(sa.exc.OperationalError):
                pipeline.poll(CycleStats())
            with store.engine.connect() as conn:
                lshs = sorted(conn.scalars(sa.select(sync_outbox.c.lsh)))
            # The batches of the first two writes are recorded (a write takes every batch
            # that arrived while the one before it ran), whole batches from the first visit
            # on, and the cursor stands at their end: nothing after it, nothing skipped.
            recorded = len(lshs)
            assert 20 <= recorded <= 50 and recorded % 10 == 0
            assert lshs == sorted(f"LSH{n:06d}" for n in range(1, recorded + 1))
            assert store.queue.get_cursor() == (start + timedelta(seconds=recorded), f"LSH{recorded:06d}")
            failing.fail_on = 0
            stats = pipeline.cycle()
            with store.engine.connect() as conn:
                assert conn.scalar(sa.select(sa.func.count()).select_from(sync_outbox)) == 50
            assert sim.counters["creates"] == 50
            assert stats.error is None
        finally:
            pipeline.close()
            his.dispose()


class SqlAlchemyInsertQueue(Queue):
    """The outbox writing new rows through SQLAlchemy's own executemany, as every
    database other than SQLite does: the reference for SQLite's driver-level INSERT."""

    @property
    def _raw_insert(self) -> None:  # type: ignore[override]
        return None


def awkward_items(now: datetime) -> list[Incoming]:
    """Every status, NULLs, an aware HIS time, metadata longer than its column."""
    items = []
    for n in range(30):
        status = (Status.PENDING, Status.SKIPPED, Status.INVALID)[n % 3]
        changed: datetime | None = now - timedelta(hours=n, microseconds=n)
        if n % 7 == 0:
            changed = None
        elif n % 5 == 0:
            changed = changed.replace(tzinfo=timezone(timedelta(hours=8)))
        items.append(
            Incoming(
                lsh=f"L{n:04d}", payload_json=json.dumps({"n": n, "名": "简单"}, ensure_ascii=False),
                payload_hash=f"{n:064d}", status=status, key_crowd=None if n % 4 == 0 else "10"[n % 2],
                reason=None if status is Status.PENDING else f"why {n}", source_changed_at=changed,
                card_type="10" if n % 6 else "1234567890", card_no=None if n % 8 == 0 else "5" * (n * 3),
                visit_type="12"[n % 2], settlement_date=None if n % 9 == 0 else date(2024, 1, 1 + n % 28),
            )
        )
    return items


def outbox_rows(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(sync_outbox).order_by(sync_outbox.c.lsh))]


def stored_text(store: Store) -> list[tuple[Any, ...]]:
    """The rows as SQLite holds them: timestamps as the text that range queries compare."""
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM sync_outbox ORDER BY lsh")]


def test_sqlite_driver_insert_stores_exactly_what_sqlalchemy_would(tmp_path: Path) -> None:
    now = datetime(2024, 5, 6, 7, 8, 9)  # whole seconds as well as fractions below: both stored alike
    fast, reference = Store(f"sqlite:///{tmp_path / 'fast.db'}"), Store(f"sqlite:///{tmp_path / 'ref.db'}")
    reference.queue = SqlAlchemyInsertQueue(reference.engine)
    try:
        for store in (fast, reference):
            store.ensure_schema()
            result = store.queue.enqueue(awkward_items(now), now=now, cursor=(now, "L0029"))
            assert (result.inserted, result.invalid, result.skipped) == (30, 10, 10)
        assert fast.queue._raw_insert is not None  # the driver path really ran
        rows = outbox_rows(fast)
        assert rows == outbox_rows(reference)
        assert stored_text(fast) == stored_text(reference)
        # Read back as the types the dispatch path works with.
        assert rows[1]["first_seen_at"] == now and rows[1]["next_attempt_at"] is None  # skipped: not due
        assert rows[3]["next_attempt_at"] == now and rows[3]["status"] == "pending"
        assert rows[5]["source_changed_at"] == (now - timedelta(hours=5, microseconds=5)).replace(tzinfo=None)
        assert len(rows[29]["card_no"]) == 64 and rows[0]["card_type"] == "12345678"
        # Idempotent on the hash: the same batch again writes nothing.
        again = fast.queue.enqueue(awkward_items(now), now=now + timedelta(minutes=1))
        assert (again.inserted, again.changed, again.unchanged) == (0, 0, 30)
        assert outbox_rows(fast) == rows
    finally:
        fast.dispose()
        reference.dispose()
