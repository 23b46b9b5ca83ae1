"""The attempt history (sync_attempt) and the retention of history, on SQLite."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync.outbox.model import Failed, Incoming, Parked, Sent, Status
from sync.outbox.schema import sync_attempt, sync_run
from sync.outbox.store import Store

T0 = datetime(2026, 3, 1, 8, 0, 0)
CARD = "510100198506020036"


def item(lsh: str, *, status: Status = Status.PENDING, reason: str | None = None) -> Incoming:
    payload = json.dumps({"lsh": lsh, "cardNo": CARD}, ensure_ascii=False)
    return Incoming(
        lsh=lsh, payload_json=payload, payload_hash=hashlib.sha256(payload.encode()).hexdigest(), status=status,
        key_crowd=None, reason=reason, source_changed_at=T0, card_type="10", card_no=CARD, visit_type="2",
        settlement_date=date(2026, 3, 1),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'outbox.db'}")
    s.ensure_schema()
    yield s
    s.dispose()


def test_each_outcome_leaves_an_attempt_in_the_same_transaction(store: Store) -> None:
    store.queue.enqueue(
        [item("A"), item("B"), item("C"), item("BAD", status=Status.INVALID, reason=f"cardNo {CARD}: wrong")],
        now=T0,
    )
    a, b, c = store.leases.claim_due(now=T0, limit=10, owner="w")
    store.leases.record([
        Sent(claimed=a, body=a.payload_json, key_crowd="1", answer="新增成功", http_status=200,
             at=T0 + timedelta(seconds=1)),
        Parked(claimed=b, status=Status.INVALID, error=f"参数校验错误：证件号码 {CARD} 不正确", http_status=200,
               at=T0 + timedelta(seconds=2)),
        Failed(claimed=c, error="unexplained", http_status=500, at=T0 + timedelta(seconds=3),
               retry_at=T0 + timedelta(minutes=1), generic=True),
    ])
    assert [(x["kind"], x["outcome"], x["http_status"], x["answer"]) for x in store.attempts("A")] == [
        ("upload", "sent", 200, "新增成功")
    ]
    (refused,) = store.attempts("B")
    assert (refused["kind"], refused["outcome"]) == ("upload", "invalid")
    assert CARD not in refused["error"] and "510100********0036" in refused["error"]  # never an ID number in clear
    assert store.attempts("C")[0]["outcome"] == "failed"
    (parked,) = store.attempts("BAD")  # parked by local validation at intake: its story starts there
    assert (parked["kind"], parked["outcome"]) == ("check", "invalid") and CARD not in parked["error"]

    # A failing history insert takes the outcomes with it: they are written together or not at all.
    (c2,) = store.leases.claim_due(now=T0 + timedelta(minutes=2), limit=10, owner="w")
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_sync_attempt_at"))
        conn.execute(sa.text("ALTER TABLE sync_attempt RENAME TO sync_attempt_gone"))
    with pytest.raises(sa.exc.OperationalError):
        store.leases.record([Sent(claimed=c2, body=c2.payload_json, key_crowd="1", answer="新增成功",
                                  http_status=200, at=T0 + timedelta(minutes=2))])
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM sync_outbox WHERE lsh = 'C'")).scalar() == "failed"


def test_retention_prunes_old_runs_and_attempts_but_keeps_the_last_run(store: Store) -> None:
    now = T0 + timedelta(days=200)
    with store.engine.begin() as conn:
        conn.execute(sa.insert(sync_run), [
            {"kind": "cycle", "started_at": T0 + timedelta(days=d), "finished_at": T0 + timedelta(days=d)}
            for d in (0, 50, 150)
        ])
        conn.execute(sa.insert(sync_attempt), [
            {"lsh": "A", "at": T0 + timedelta(days=d), "kind": "upload", "outcome": "sent"} for d in (0, 10, 100, 190)
        ])
    assert store.prune_history(now=now, keep_runs_days=90, keep_attempts_days=30) == (2, 3)
    with store.engine.connect() as conn:
        assert [r.started_at for r in conn.execute(sa.select(sync_run.c.started_at))] == [T0 + timedelta(days=150)]
    assert [a["at"] for a in store.attempts("A")] == [T0 + timedelta(days=190)]
    # Even a last run older than the retention stays: `status` shows it.
    assert store.prune_history(now=now + timedelta(days=1000), keep_runs_days=1, keep_attempts_days=1) == (0, 1)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sync_run)).scalar() == 1
