"""The upload path's shortcuts keep the outbox's guarantees: outcomes written in groups by
one writer, and the login token kept in memory until the platform refuses it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from sync.outbox.model import Failed, Incoming, Sent, Status
from sync.outbox.schema import sync_outbox
from sync.outbox.store import Store
from sync.outcomes import Recorder
from sync.settings import Upstream
from sync.upstream.client import Client
from sync.upstream.simulator import TEST_APP_KEY, TEST_IDS, TEST_PASSWORD, TEST_USERNAME, Simulator

T0 = datetime(2026, 3, 1, 8, 0, 0)


def item(lsh: str, body: str = "v1") -> Incoming:
    payload = json.dumps({"lsh": lsh, "body": body}, ensure_ascii=False)
    return Incoming(
        lsh=lsh, payload_json=payload, payload_hash=hashlib.sha256(payload.encode()).hexdigest(),
        status=Status.PENDING, key_crowd="1", reason=None, source_changed_at=T0, card_type="10",
        card_no="510100198506020036", visit_type="2", settlement_date=date(2026, 3, 1),
    )


def rows(store: Store) -> dict[str, sa.RowMapping]:
    with store.engine.connect() as conn:
        return {r["lsh"]: r for r in conn.execute(sa.select(sync_outbox)).mappings()}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'outbox.db'}"


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    s = Store(url, lease_s=300)
    s.ensure_schema()
    yield s
    s.dispose()


def test_outcomes_written_together_each_keep_the_row_only_if_still_ours_and_unchanged(store: Store) -> None:
    store.queue.enqueue([item("L1"), item("L2"), item("L3")], now=T0)
    c1, c2, c3 = store.leases.claim_due(now=T0, limit=10, owner="w")
    store.queue.enqueue([item("L2", "v2")], now=T0 + timedelta(seconds=1))  # re-settled while uploading
    later = T0 + timedelta(seconds=2)
    written = store.leases.record([
        Sent(claimed=c1, body=c1.payload_json, key_crowd="1", answer="新增成功", http_status=200, at=later),
        Sent(claimed=c2, body=c2.payload_json, key_crowd="1", answer="新增成功", http_status=200, at=later),
        Failed(claimed=c3, error="504", http_status=504, at=later, retry_at=later, generic=False),
    ])
    assert written == [True, False, True]
    r = rows(store)
    assert (r["L1"]["status"], r["L2"]["status"], r["L3"]["status"]) == ("sent", "pending", "failed")
    assert json.loads(r["L2"]["payload"])["body"] == "v2"  # the new payload waits to be sent
    assert r["L3"]["attempts"] == 1
    assert all(row["lease_owner"] is None for row in r.values())


def test_a_record_the_database_refuses_does_not_cost_the_rest_of_its_group(store: Store) -> None:
    store.queue.enqueue([item(f"L{i}") for i in range(5)], now=T0)
    claims = store.leases.claim_due(now=T0, limit=10, owner="w")
    recorder = Recorder(store)
    for c in claims:
        if c.lsh == "L2":
            # NOT NULL violated: the group's transaction fails as a whole.
            recorder.put(Sent(claimed=c, body=None, key_crowd="1", answer="修改成功", http_status=200, at=T0))  # type: ignore[arg-type]
        else:
            recorder.put(Sent(claimed=c, body=c.payload_json, key_crowd="1", answer="修改成功", http_status=200, at=T0))
    recorder.close()
    r = rows(store)
    assert {lsh: row["status"] for lsh, row in r.items()} == {
        "L0": "sent", "L1": "sent", "L2": "pending", "L3": "sent", "L4": "sent",
    }
    # The refused one is free again, due to be sent again.
    assert r["L2"]["lease_owner"] is None
    assert [c.lsh for c in store.leases.claim_due(now=T0, limit=10, owner="w2")] == ["L2"]


def _record(lsh: str) -> str:
    payload: dict[str, Any] = {
        "cardType": "10", "cardNo": TEST_IDS[0], "type": "1", "lsh": lsh, "code": "ZY001",
        "enterDate": "2024-07-01", "leaveDate": "2024-07-05", "keyCrowd": "1", "icdName": "肺炎", "icdCode": "J18.9",
        "totalFee": 1234.56, "insFee": 1000.00, "totalPrepayment": 0, "deficientFee": 234.56,
        "settlementDate": "2024-07-05",
    }
    return json.dumps(payload, ensure_ascii=False)


def test_the_token_is_read_from_the_outbox_only_when_the_platform_refuses_it(url: str, store: Store) -> None:
    token_reads: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "sync_token" in statement:
            token_reads.append(statement)

    other_store = Store(url)  # another process on the same outbox, e.g. `crowd-sync lookup`
    with Simulator() as sim:
        up = Upstream(
            base_url=sim.url, app_key=quote(TEST_APP_KEY, safe=""), username=TEST_USERNAME, password=TEST_PASSWORD,
            timeout_s=5, rate_limit_per_s=1000,
        )
        with Client(up, store.token_store()) as client, Client(up, other_store.token_store()) as other:
            client.upload(_record("ZY1"), lsh="ZY1")  # logs in: the store is read and written
            first_reads = len(token_reads)
            assert first_reads > 0
            for i in range(2, 12):
                client.upload(_record(f"ZY{i}"), lsh=f"ZY{i}")
            assert len(token_reads) == first_reads  # ten uploads, no visit to the outbox

            # The other process renews: our token is pushed out upstream.
            stale = other_store.token_store().current()
            assert stale is not None
            other_store.token_store().renew(stale.value, other.login)
            assert sim.counters["logins"] == 2

            result = client.upload(_record("ZY99"), lsh="ZY99")
            assert result.created
            # Refused once, then the renewed token was taken from the outbox instead of a third login.
            assert sim.counters["logins"] == 2
            assert client.counters["auth_retries"] == 1
            assert len(token_reads) > first_reads
            assert sim.issued_tokens() == 1
    other_store.dispose()
