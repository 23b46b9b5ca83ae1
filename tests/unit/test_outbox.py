"""The outbox on SQLite: what a DBA and the dispatcher see after each operation."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync.errors import ConfigError
from sync.outbox.lock import AlreadyRunning
from sync.outbox.migrate import current_revision, head_revision
from sync.outbox.model import Claimed, Failed, Incoming, Parked, Sent, Status
from sync.outbox.schema import sync_outbox
from sync.outbox.store import Store
from sync.upstream.tokens import Token

T0 = datetime(2026, 3, 1, 8, 0, 0)


def item(lsh: str, body: str = "v1", *, status: Status = Status.PENDING, reason: str | None = None,
         changed: datetime | None = None, key_crowd: str | None = None) -> Incoming:
    payload = json.dumps({"lsh": lsh, "body": body, "icdName": "肺结核"}, ensure_ascii=False)
    return Incoming(
        lsh=lsh, payload_json=payload, payload_hash=hashlib.sha256(payload.encode()).hexdigest(), status=status,
        key_crowd=key_crowd, reason=reason, source_changed_at=changed or T0, card_type="10",
        card_no="510100198506020036", visit_type="2", settlement_date=date(2026, 3, 1),
    )


def accepted(c: Claimed, *, body: str | None = None, at: datetime = T0) -> Sent:
    """The platform took ``c``: the outcome dispatch hands the store."""
    return Sent(claimed=c, body=body or c.payload_json, key_crowd="1", answer="新增成功", http_status=200, at=at)


def row(store: Store, lsh: str) -> sa.RowMapping:
    with store.engine.connect() as conn:
        r = conn.execute(sa.select(sync_outbox).where(sync_outbox.c.lsh == lsh)).mappings().one()
    return r


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'var' / 'outbox.db'}", lease_s=300)
    s.ensure_schema()
    yield s
    s.dispose()


# -- schema ------------------------------------------------------------------------


def test_a_fresh_sqlite_file_is_created_at_head(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 'new' / 'dir' / 'outbox.db'}")
    s.ensure_schema()
    assert current_revision(s.engine) == head_revision()
    assert (tmp_path / "new" / "dir" / "outbox.db").exists()
    s.ensure_schema()  # idempotent
    s.dispose()


def test_a_schema_newer_than_the_code_asks_to_upgrade_crowd_sync(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE sync_schema_version SET version_num = '9999'")
    with pytest.raises(ConfigError) as err:
        store.ensure_schema()
    assert "9999" in str(err.value)
    assert "upgrade crowd-sync" in err.value.hint


def test_tables_without_a_version_are_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM sync_schema_version")
    with pytest.raises(ConfigError, match="no schema version"):
        store.ensure_schema()


def test_password_is_hidden_from_humans() -> None:
    s = Store("postgresql+psycopg2://crowd:s3cret-pw@db.example/outbox")
    assert "s3cret-pw" not in s.url_for_humans
    assert "db.example/outbox" in s.url_for_humans
    s.dispose()


# -- enqueue ------------------------------------------------------------------------


def test_enqueue_twice_writes_nothing_the_second_time(store: Store) -> None:
    items = [item(f"L{i}") for i in range(3)]
    first = store.queue.enqueue(items, now=T0)
    assert (first.inserted, first.changed, first.unchanged) == (3, 0, 0)
    again = store.queue.enqueue(items, now=T0 + timedelta(hours=1))
    assert (again.inserted, again.changed, again.unchanged) == (0, 0, 3)
    r = row(store, "L1")
    assert r["updated_at"] == T0
    assert r["status"] == "pending"
    assert r["next_attempt_at"] == T0
    assert r["first_seen_at"] == T0


def test_a_resettled_sent_visit_goes_back_to_pending_with_a_fresh_retry_budget(store: Store) -> None:
    store.queue.enqueue([item("L1")], now=T0)
    [c] = store.leases.claim_due(now=T0, limit=10, owner="w1")
    store.leases.record([Failed(claimed=c, error="timeout", http_status=None, at=T0, retry_at=T0, generic=True)])
    [c] = store.leases.claim_due(now=T0 + timedelta(seconds=1), limit=10, owner="w1")
    assert store.leases.record([accepted(c)])[0]
    sent = row(store, "L1")
    assert sent["status"] == "sent"
    assert sent["last_answer"] == "新增成功"

    later = T0 + timedelta(days=1)
    result = store.queue.enqueue([item("L1", "v2")], now=later)
    assert (result.inserted, result.changed) == (0, 1)
    r = row(store, "L1")
    assert r["status"] == "pending"
    assert (r["attempts"], r["generic_failures"], r["first_failed_at"]) == (0, 0, None)
    assert r["next_attempt_at"] == later
    assert r["sent_hash"] == sent["payload_hash"]  # what the platform holds is still known
    assert r["first_seen_at"] == T0


def test_duplicates_in_one_batch_the_last_wins(store: Store) -> None:
    result = store.queue.enqueue([item("L1", "old"), item("L1", "new")], now=T0)
    assert result.inserted == 1
    assert json.loads(row(store, "L1")["payload"])["body"] == "new"


def test_skipped_and_invalid_rows_keep_their_reason_and_are_not_due(store: Store) -> None:
    store.queue.enqueue([
        item("S", status=Status.SKIPPED, reason="label lookup: not key population", key_crowd="0"),
        item("I", status=Status.INVALID, reason="cardNo: 必填"),
    ], now=T0)
    assert row(store, "S")["last_error"] == "label lookup: not key population"
    assert row(store, "I")["last_error"] == "cardNo: 必填"
    assert row(store, "I")["next_attempt_at"] is None
    assert store.leases.claim_due(now=T0 + timedelta(days=1), limit=10, owner="w") == []
    # The invalid visit is fixed in the HIS: it arrives re-validated, pending again.
    store.queue.enqueue([item("I", "fixed")], now=T0)
    assert [c.lsh for c in store.leases.claim_due(now=T0, limit=10, owner="w")] == ["I"]


def test_large_batches_are_chunked(store: Store) -> None:
    items = [item(f"L{i:05d}") for i in range(1200)]
    assert store.queue.enqueue(items, now=T0).inserted == 1200
    assert store.queue.enqueue(items, now=T0).unchanged == 1200


# -- cursor ------------------------------------------------------------------------


def test_cursor_moves_only_forward(store: Store) -> None:
    assert store.queue.get_cursor() is None
    store.queue.enqueue([], now=T0, cursor=(T0, "B"))
    store.queue.enqueue([], now=T0, cursor=(T0, "A"))  # same instant, smaller lsh: behind
    assert store.queue.get_cursor() == (T0, "B")
    store.queue.enqueue([], now=T0, cursor=(T0 - timedelta(minutes=5), "Z"))
    assert store.queue.get_cursor() == (T0, "B")
    store.queue.enqueue([], now=T0, cursor=(T0 + timedelta(seconds=1), "A"))
    assert store.queue.get_cursor() == (T0 + timedelta(seconds=1), "A")


def test_a_failed_enqueue_leaves_neither_rows_nor_cursor(store: Store) -> None:
    store.queue.enqueue([item("L0")], now=T0, cursor=(T0, "L0"))
    bad_cursor = ("not a time", "L9")  # fails after the rows are written, inside the transaction
    with pytest.raises(TypeError):
        store.queue.enqueue([item("L1"), item("L2")], now=T0, cursor=bad_cursor)  # type: ignore[arg-type]
    assert store.queue.get_cursor() == (T0, "L0")
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sync_outbox)).scalar() == 1


# -- claim and outcomes ---------------------------------------------------------------


def test_a_crashed_workers_rows_come_back_when_the_lease_ends(store: Store) -> None:
    store.queue.enqueue([item("L1"), item("L2")], now=T0)
    claimed = store.leases.claim_due(now=T0, limit=10, owner="crashed")
    assert {c.lsh for c in claimed} == {"L1", "L2"}
    assert store.leases.claim_due(now=T0 + timedelta(seconds=299), limit=10, owner="other") == []
    back = store.leases.claim_due(now=T0 + timedelta(seconds=301), limit=10, owner="other")
    assert {c.lsh for c in back} == {"L1", "L2"}
    # The crashed worker wakes up late: its outcome no longer counts.
    assert not store.leases.record([accepted(claimed[0], body="{}")])[0]
    assert row(store, claimed[0].lsh)["lease_owner"] == "other"
    assert row(store, claimed[0].lsh)["status"] == "pending"


def test_claim_respects_limit_and_due_order(store: Store) -> None:
    store.queue.enqueue([item("late")], now=T0 + timedelta(seconds=10))
    store.queue.enqueue([item("early")], now=T0)
    store.queue.enqueue([item("future")], now=T0 + timedelta(hours=1))
    assert [c.lsh for c in store.leases.claim_due(now=T0 + timedelta(minutes=1), limit=1, owner="w")] == ["early"]
    assert [c.lsh for c in store.leases.claim_due(now=T0 + timedelta(minutes=1), limit=5, owner="w")] == ["late"]


def test_mark_sent_with_a_stale_hash_leaves_the_new_payload_pending(store: Store) -> None:
    store.queue.enqueue([item("L1", "v1")], now=T0)
    [c] = store.leases.claim_due(now=T0, limit=10, owner="w")
    store.queue.enqueue([item("L1", "v2")], now=T0 + timedelta(seconds=5))  # re-settled while uploading
    assert not store.leases.record([accepted(c, at=T0 + timedelta(seconds=6))])[0]
    r = row(store, "L1")
    assert r["status"] == "pending"
    assert r["sent_at"] is None
    assert json.loads(r["payload"])["body"] == "v2"
    assert r["lease_owner"] is None
    [again] = store.leases.claim_due(now=T0 + timedelta(seconds=7), limit=10, owner="w")
    assert again.payload_hash == item("L1", "v2").payload_hash


def test_failures_count_and_the_first_failure_is_kept(store: Store) -> None:
    store.queue.enqueue([item("L1")], now=T0)
    [c] = store.leases.claim_due(now=T0, limit=10, owner="w")
    store.leases.record([Failed(claimed=c, error="502", http_status=502, at=T0, retry_at=T0 + timedelta(seconds=30), generic=False)])
    assert store.leases.claim_due(now=T0 + timedelta(seconds=29), limit=10, owner="w") == []
    [c] = store.leases.claim_due(now=T0 + timedelta(seconds=30), limit=10, owner="w")
    assert (c.attempts, c.generic_failures, c.first_failed_at) == (1, 0, T0)
    store.leases.record([Failed(claimed=c, error="中间请求异常", http_status=200, at=T0 + timedelta(seconds=31), retry_at=T0 + timedelta(seconds=90), generic=True)])
    r = row(store, "L1")
    assert (r["status"], r["attempts"], r["generic_failures"], r["first_failed_at"]) == ("failed", 2, 1, T0)
    assert r["last_error"] == "中间请求异常"
    assert r["last_http_status"] == 200


def test_dead_invalid_and_skipped_rows_wait_for_a_person(store: Store) -> None:
    store.queue.enqueue([item("D"), item("I"), item("S")], now=T0)
    claims = {c.lsh: c for c in store.leases.claim_due(now=T0, limit=10, owner="w")}
    store.leases.record([Parked(claimed=claims["D"], status=Status.DEAD, error="failing for 72 h", http_status=503, at=T0)])
    store.leases.record([Parked(claimed=claims["I"], status=Status.INVALID, error="参数校验错误: cardNo", http_status=200, at=T0)])
    store.leases.record([Parked(claimed=claims["S"], status=Status.SKIPPED, error="not key population (label API)", at=T0, http_status=None, key_crowd="0")])
    assert store.leases.claim_due(now=T0 + timedelta(days=30), limit=10, owner="w") == []
    assert row(store, "S")["key_crowd"] == "0"
    assert row(store, "I")["last_error"] == "参数校验错误: cardNo"
    assert row(store, "D")["status"] == "dead"

    assert store.queue.requeue(now=T0, statuses=[Status.DEAD, Status.INVALID]) == 2
    assert {c.lsh for c in store.leases.claim_due(now=T0, limit=10, owner="w")} == {"D", "I"}
    assert row(store, "D")["attempts"] == 0


def test_requeue_by_lsh(store: Store) -> None:
    store.queue.enqueue([item("A"), item("B")], now=T0)
    for c in store.leases.claim_due(now=T0, limit=10, owner="w"):
        store.leases.record([accepted(c)])
    assert store.queue.requeue(now=T0 + timedelta(hours=1), lshs=["B", "missing"]) == 1
    assert row(store, "A")["status"] == "sent"
    assert row(store, "B")["status"] == "pending"
    with pytest.raises(ValueError, match="lshs or statuses"):
        store.queue.requeue(now=T0)


def test_release_drops_leases_only(store: Store) -> None:
    store.queue.enqueue([item("A"), item("B")], now=T0)
    claims = store.leases.claim_due(now=T0, limit=10, owner="w")
    store.leases.release(claims[:1], now=T0)
    assert [c.lsh for c in store.leases.claim_due(now=T0, limit=10, owner="x")] == [claims[0].lsh]
    assert store.leases.release_owner("w") == 1
    assert row(store, claims[1].lsh)["attempts"] == 0


def test_recheck_skipped_asks_the_label_api_again_inside_the_window(store: Store) -> None:
    store.queue.enqueue([
        item("old", status=Status.SKIPPED, reason="no label", key_crowd="0", changed=T0 - timedelta(days=40)),
        item("recent", status=Status.SKIPPED, reason="no label", key_crowd="0", changed=T0 - timedelta(days=3)),
    ], now=T0)
    assert store.queue.recheck_skipped(now=T0, changed_since=T0 - timedelta(days=31)) == 1
    r = row(store, "recent")
    assert (r["status"], r["key_crowd"]) == ("pending", None)
    assert row(store, "old")["status"] == "skipped"


# -- status, runs, configuration pause ------------------------------------------------------


def test_summary_counts_every_status_and_the_last_runs(store: Store) -> None:
    store.queue.enqueue([item("A"), item("B"), item("C")], now=T0)
    claims = {c.lsh: c for c in store.leases.claim_due(now=T0, limit=10, owner="w")}
    store.leases.record([accepted(claims["A"], body="{}", at=T0 + timedelta(minutes=1))])
    store.leases.record([Failed(claimed=claims["B"], error="timeout", http_status=None, at=T0 + timedelta(minutes=2), retry_at=T0 + timedelta(minutes=3), generic=False)])
    ok = store.start_run("cycle", now=T0)
    store.finish_run(ok, now=T0 + timedelta(minutes=2), rows_read=3, enqueued=3, sent=1, failed=1)
    broken = store.start_run("poll", now=T0 + timedelta(minutes=5))
    store.finish_run(broken, now=T0 + timedelta(minutes=6), error="HIS unreachable")

    s = store.summary(now=T0 + timedelta(minutes=4))
    assert s.counts == {"pending": 1, "sent": 1, "failed": 1, "invalid": 0, "dead": 0, "skipped": 0}
    assert s.counts[Status.SENT] == 1
    assert s.oldest_pending_at == T0
    assert s.last_sent_at == T0 + timedelta(minutes=1)
    assert s.last_run is not None and s.last_run["error"] == "HIS unreachable"
    assert s.last_successful_run is not None and s.last_successful_run["id"] == ok
    assert s.last_successful_run["sent"] == 1
    assert s.leased == 1  # C is still claimed
    assert s.config_error is None


def test_a_configuration_error_is_recorded_until_cleared(store: Store) -> None:
    store.state.set_config_error(message="登录失败: 用户名或密码错误", hint="check upstream.username", now=T0)
    store.state.set_config_error(message="登录失败: 用户名或密码错误", hint="check upstream.username", now=T0 + timedelta(hours=1))
    err = store.state.get_config_error()
    assert err is not None
    assert err["message"] == "登录失败: 用户名或密码错误"
    assert err["since"].startswith("2026-03-01T08:00")  # the first occurrence
    assert store.summary(now=T0).config_error == err
    store.state.clear_config_error()
    assert store.state.get_config_error() is None


# -- label cache ------------------------------------------------------------------------------


def test_label_cache_keeps_answers_for_the_ttl_without_storing_id_numbers(store: Store) -> None:
    store.labels.put({"510100198506020036": '{"rkxBq": [], "jjxBq": [], "jkBq": [{"code": "H01.05"}]}', "510100198506020132": None}, now=T0)
    got = store.labels.get(["510100198506020036", "510100198506020132", "510100198506020028"], now=T0 + timedelta(hours=23), ttl_s=86400)
    assert set(got) == {"510100198506020036", "510100198506020132"}
    assert got["510100198506020132"] == (None,)
    labels = got["510100198506020036"][0]
    assert labels is not None and json.loads(labels)["jkBq"] == [{"code": "H01.05"}]
    assert store.labels.get(["510100198506020036"], now=T0 + timedelta(hours=25), ttl_s=86400) == {}
    store.labels.put({"510100198506020036": None}, now=T0 + timedelta(hours=25))
    assert store.labels.get(["510100198506020036"], now=T0 + timedelta(hours=25), ttl_s=86400) == {"510100198506020036": (None,)}
    with store.engine.connect() as conn:
        dump = " ".join(str(v) for r in conn.exec_driver_sql("SELECT * FROM sync_label_cache") for v in r)
    assert "510100198506020036" not in dump


def test_label_cache_keeps_label_codes_only(store: Store) -> None:
    """The decision needs whether the person is known and which labels they carry: not their name,
    ID number, counties or the label names."""
    data = {
        "xm": "张三", "zjhm": "510100198506020036", "hjdQh": "510104", "hjdQhName": "锦江区", "xjdQh": "510104",
        "xjdQhName": "锦江区", "ylbx": "1", "rkxBq": [], "glztBq": [],
        "jjxBq": [{"code": "J01.02", "name": "农村低保对象", "remark": "2024年认定", "attr1": "1", "attr2": None}],
        "jkBq": [{"code": "H01.05", "name": "结核病患者", "remark": None, "attr1": "0", "attr2": None}],
    }
    store.labels.put({"510100198506020036": json.dumps(data, ensure_ascii=False), "510100198506020028": "{}"}, now=T0)
    with store.engine.connect() as conn:
        dump = " ".join(str(v) for r in conn.exec_driver_sql("SELECT * FROM sync_label_cache") for v in r)
    for private in ("张三", "510100198506020036", "510104", "锦江区", "农村低保对象", "结核病患者", "2024年认定"):
        assert private not in dump, private
    got = store.labels.get(["510100198506020036", "510100198506020028"], now=T0, ttl_s=60)
    known = json.loads(got["510100198506020036"][0] or "null")
    assert [i["code"] for i in known["jjxBq"]] == ["J01.02"]
    assert [i["code"] for i in known["jkBq"]] == ["H01.05"]
    # Known to the platform without labels stays apart from "no data at all".
    empty = json.loads(got["510100198506020028"][0] or "null")
    assert empty is not None and not any(empty.values())


# -- token ------------------------------------------------------------------------------------


def test_a_slow_login_holds_up_no_write_to_the_outbox(store: Store) -> None:
    """The login waits on the network outside any outbox transaction: with SQLite's single
    writer, a login as slow as upstream.timeout_s allows used to hold every enqueue back
    (and past busy_timeout, 30 s, fail it with "database is locked")."""
    tokens = store.token_store()
    in_login, release = threading.Event(), threading.Event()
    now = datetime.now(UTC)

    def slow_login() -> Token:
        in_login.set()
        release.wait(10)
        return Token(value="slow", obtained_at=now, expires_at=now + timedelta(hours=12))

    renewer = threading.Thread(target=tokens.renew, args=(None, slow_login))
    renewer.start()
    try:
        assert in_login.wait(5)
        started = time.monotonic()
        assert store.queue.enqueue([item("MZ0001")], now=T0, cursor=(T0, "MZ0001")).inserted == 1
        store.state.set_config_error(message="m", hint="h", now=T0)
        took = time.monotonic() - started
    finally:
        release.set()
        renewer.join(15)
    assert took < 2.0, f"an enqueue waited {took:.1f} s for the login"
    assert tokens.current() is not None and tokens.current().value == "slow"  # type: ignore[union-attr]


def test_token_renewal_is_single_flight_across_threads(store: Store) -> None:
    tokens = store.token_store()
    assert tokens.current() is None
    logins: list[int] = []
    now = datetime.now(UTC)

    def login() -> Token:
        logins.append(1)
        return Token(value=f"tok{len(logins)}", obtained_at=now, expires_at=now + timedelta(hours=12))

    first = tokens.renew(None, login)
    barrier = threading.Barrier(8)
    results: list[str] = []

    def worker() -> None:
        barrier.wait()
        results.append(tokens.renew(first.value, login).value)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(logins) == 2
    assert set(results) == {"tok2"}
    assert store.token_store().current() == Token(value="tok2", obtained_at=now, expires_at=now + timedelta(hours=12))
    tokens.discard("tok1")  # no longer the stored one: nothing happens
    assert tokens.current() is not None
    tokens.discard("tok2")
    assert tokens.current() is None


# -- single instance ---------------------------------------------------------------------------


def test_a_second_instance_is_refused_naming_the_first(store: Store) -> None:
    with store.instance_lock(command="run"):
        other = Store(str(store.engine.url))
        with pytest.raises(AlreadyRunning) as err, other.instance_lock(command="once"):
            pass
        assert "command run" in str(err.value)
        assert isinstance(err.value, ConfigError)
        other.dispose()
    with store.instance_lock(command="once"):
        pass


def test_a_deleted_lock_file_is_a_lost_lock(store: Store) -> None:
    """flock holds the file that was opened: once it is deleted, a second process creates a
    new one and locks that. The first must see it has lost the lock, not send beside it."""
    database = store.engine.url.database
    assert database is not None
    first = store.instance_lock(command="run")
    first.acquire()
    try:
        Path(database + ".lock").unlink()
        assert not first.still_held()
        other = Store(str(store.engine.url))
        with other.instance_lock(command="run"), pytest.raises(AlreadyRunning):
            first.ensure()
        first.ensure()  # free again: taken back
        assert first.still_held()
        other.dispose()
    finally:
        first.release()
