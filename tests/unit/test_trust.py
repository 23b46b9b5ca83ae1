"""Trust under faults, point by point: never a visit that must not go, `sent` only on the
document's success answers, platform faults pause sending instead of costing records,
leases of a dead process come back at once, FAQ 11 and repeated kick-outs pause with the fix.

Real simulator over loopback, SQLite HIS and outbox, the Pipeline driven cycle by cycle.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync import cli, intake
from sync.app import make_pipeline
from sync.outbox.model import Status
from sync.outbox.store import Store
from sync.stats import CycleStats
from sync.upstream.client import KICKS_TO_PAUSE
from sync.upstream.signing import ENDPOINTS
from sync.upstream.simulator import TEST_IDS, TEST_USERNAME, Simulator
from tests.support import capture_all_logs, expected_payload, his_now, id_number, make_visit
from tests.world import World as BaseWorld
from tests.world import past, utcnow

UPLOAD_PATH = ENDPOINTS["upload"].path


class World(BaseWorld):
    """The installation as `run` and `once` drive it: the only sender (leases of a dead
    process come back at once), long leases, quick retries."""

    def __init__(self, tmp: Path, sim: Simulator, **overrides: dict[str, object]) -> None:
        overrides.setdefault("retry", {"first_delay_s": 0.05, "max_delay_s": 0.5})
        super().__init__(tmp, sim, lease_s=300, sole_sender=True, **overrides)


def _wait_probe(w: World) -> None:
    nxt = w.pipeline.next_probe_at
    if nxt is not None:
        time.sleep(max(0.0, (nxt - utcnow()).total_seconds()) + 0.02)


# -- 1. the key-population decision ----------------------------------------------------------------


NOT_KEY = id_number(random.Random(5))  # a person the platform does not know: data null


@pytest.mark.parametrize("fault", ["middle", "save_failed", "504", "reset"])
def test_a_failed_lookup_never_lets_another_visit_of_that_person_through(
    tmp_path: Path, sim: Simulator, fault: str
) -> None:
    """Was: the second visit of a person whose lookup failed went up as keyCrowd "1"."""
    person = id_number(random.Random(3))
    w = World(tmp_path, sim, key_crowd={"source": "lookup"})
    try:
        visits = [make_visit(n, changed=past(40 - n), id_no=person, is_key=None) for n in range(1, 4)]
        visits += [make_visit(n, changed=past(40 - n), id_no=TEST_IDS[0], is_key=None) for n in range(4, 6)]
        w.his.insert(visits)
        w.login_now()
        sim.faults.labels_fail = {person: fault}

        for _ in range(3):
            w.pipeline.cycle()
            _wait_probe(w)

        rows = w.rows()
        assert all(rows[f"LSH{n:06d}"]["status"] == "sent" for n in (4, 5)), rows
        assert [u["lsh"] for u in w.uploads() if u["cardNo"] == person] == []
        for n in (1, 2, 3):
            r = rows[f"LSH{n:06d}"]
            assert r["status"] in ("failed", "pending") and r["key_crowd"] is None, r
        assert w.counts()["dead"] == 0

        # The lookup works again: the person is not key population, every visit is skipped.
        sim.faults.labels_fail = {}
        time.sleep(0.6)  # max_delay_s: every back-off has run out
        _wait_probe(w)
        w.pipeline.cycle()
        rows = w.rows()
        assert {rows[f"LSH{n:06d}"]["status"] for n in (1, 2, 3)} == {"skipped"}
        assert {rows[f"LSH{n:06d}"]["status"] for n in (4, 5)} == {"sent"}
        assert [u["lsh"] for u in w.uploads() if u["cardNo"] == person] == []
        assert {u["keyCrowd"] for u in w.uploads()} == {"1"}
    finally:
        w.close()


@pytest.mark.parametrize("how", ["status", "lsh"])
def test_a_requeued_skipped_visit_is_decided_again_never_sent_as_not_key(
    tmp_path: Path, sim: Simulator, how: str, restore_logging: None
) -> None:
    """Was: `retry --status skipped` requeued with key_crowd '0' and it went up as keyCrowd "0"."""
    w = World(tmp_path, sim, key_crowd={"source": "lookup"})
    try:
        w.his.insert([
            make_visit(1, changed=past(20), id_no=NOT_KEY, is_key=None),
            make_visit(2, changed=past(19), id_no=TEST_IDS[0], is_key=None),
        ])
        w.pipeline.cycle()
        assert w.rows()["LSH000001"]["status"] == "skipped"
        lookups = sim.counters["lookups"]

        args = ("retry", "--status", "skipped") if how == "status" else ("retry", "--lsh", "LSH000001")
        assert w.cli(*args) == 0
        stats = w.pipeline.cycle()

        assert stats.sent == 0 and stats.skipped == 1
        assert w.rows()["LSH000001"]["status"] == "skipped"
        assert "LSH000001" not in sim.records
        assert sim.counters["lookups"] == lookups + 1, "the label API must be asked again, not the cache"

        # The county imports the labels late: the next requeue sends it, as key population.
        sim.add_person(NOT_KEY, jjxBq=[{"code": "J01.02", "name": "农村低保对象", "remark": None, "attr1": "1",
                                        "attr2": None}])
        assert w.cli(*args) == 0
        stats = w.pipeline.cycle()
        assert stats.sent == 1 and sim.records["LSH000001"]["keyCrowd"] == "1"
        assert [u["keyCrowd"] for u in w.uploads()] == ["1", "1"]
    finally:
        w.close()


def test_column_mode_requeue_of_a_skipped_visit_stays_home(
    tmp_path: Path, sim: Simulator, restore_logging: None
) -> None:
    w = World(tmp_path, sim)  # key_crowd.source: column
    try:
        w.his.insert([make_visit(1, changed=past(20), is_key="0"), make_visit(2, changed=past(19))])
        w.pipeline.cycle()
        assert w.cli("retry", "--status", "skipped") == 0
        assert w.cli("retry", "--lsh", "LSH000001", "LSH000002") == 0
        w.pipeline.cycle()
        assert w.rows()["LSH000001"]["status"] == "skipped"
        assert [u["lsh"] for u in w.uploads()] == ["LSH000002", "LSH000002"]
        assert {u["keyCrowd"] for u in w.uploads()} == {"1"}
    finally:
        w.close()


def test_upload_only_key_crowd_off_sends_known_non_key_as_0_and_unknown_never(tmp_path: Path, sim: Simulator) -> None:
    w = World(tmp_path, sim, key_crowd={"source": "lookup", "upload_only_key_crowd": False})
    try:
        unknown = id_number(random.Random(9))
        w.his.insert([
            make_visit(1, changed=past(20), id_no=NOT_KEY, is_key=None),
            make_visit(2, changed=past(19), id_no=TEST_IDS[0], is_key=None),
            make_visit(3, changed=past(18), id_no=unknown, is_key=None),
        ])
        w.login_now()
        sim.faults.labels_fail = {unknown: "middle"}
        w.pipeline.cycle()
        assert sim.records["LSH000001"]["keyCrowd"] == "0"
        assert sim.records["LSH000002"]["keyCrowd"] == "1"
        assert "LSH000003" not in sim.records and w.rows()["LSH000003"]["status"] == "failed"
    finally:
        w.close()


# -- 2. requeued invalid rows are validated on what the HIS returned --------------------------------


def test_retry_of_an_invalid_row_validates_the_values_the_his_returned(
    tmp_path: Path, sim: Simulator, restore_logging: None
) -> None:
    """Was: bytes became hex text and a DOUBLE lost digits, and values rightly refused then passed."""
    w = World(tmp_path, sim)
    try:
        today = his_now().date()
        good = make_visit(9, changed=past(30))
        canonical = {
            "lsh": "LSH000009", "code": good["visit_no"], "card_type": "10", "card_no": good["id_no"],
            "visit_type": good["kind"], "enter_date": good["admitted"], "leave_date": good["discharged"],
            "key_crowd": "1", "icd_name": None, "icd_code": None, "total_fee": good["total"],
            "ins_fee": good["insurance"], "total_prepayment": good["deposit"], "deficient_fee": good["owed"],
            "settlement_date": good["settled"], "changed_at": good["changed"],
        }
        rows = {
            # Raw bytes from a binary column: not text. Their hex spells a valid ID number.
            "BYTES1": {**canonical, "lsh": "BYTES1", "card_no": b"\x51\x01\x00\x19\x85\x06\x02\x00\x36"},
            # An ID number from a DOUBLE column: its last digits are already gone.
            "FLOAT1": {**canonical, "lsh": "FLOAT1", "card_no": 510100198506020036.0},
        }
        items = [intake.incoming(r, key_crowd=w.settings.key_crowd, today=today) for r in rows.values()]
        assert {i.status for i in items} == {Status.INVALID}
        w.store.queue.enqueue(items, now=utcnow())
        # A row parked by an earlier version, in the old untyped form (bytes already hex text).
        legacy_json = json.dumps({**{k: str(v) for k, v in canonical.items()}, "lsh": "OLD1",
                                  "card_no": "510100198506020036"})
        w.store.queue.enqueue([replace(items[0], lsh="OLD1", payload_json=legacy_json, payload_hash="0" * 64)],
                        now=utcnow())
        before = {lsh: r["last_error"] for lsh, r in w.rows().items()}

        assert w.cli("retry", "--status", "invalid") == 0
        stats = w.pipeline.cycle()

        after = w.rows()
        assert stats.sent == 0 and w.uploads() == []
        assert {after[lsh]["status"] for lsh in ("BYTES1", "FLOAT1", "OLD1")} == {"invalid"}
        assert after["BYTES1"]["last_error"] == before["BYTES1"] and "UTF-8" in str(after["BYTES1"]["last_error"])
        assert "float" in str(after["FLOAT1"]["last_error"])
        assert "reconcile" in str(after["OLD1"]["last_error"])
    finally:
        w.close()


# -- 3. success means the document's success answers ----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "charged"),
    [("save_failed", True), ("middle", True), ("bare500", False), ("html200", False), ("truncated", False)],
)
def test_only_the_documents_success_answers_make_a_record_sent(
    tmp_path: Path, sim: Simulator, kind: str, charged: bool
) -> None:
    w = World(tmp_path, sim, upstream={"concurrency": 1})
    try:
        visit = make_visit(1, changed=past(10))
        w.his.insert([visit])
        w.login_now()
        sim.faults.fake = (kind,)
        sim.faults.next_fake = 1
        sim.faults.endpoints = frozenset({"upload"})

        w.pipeline.cycle()
        row = w.rows()["LSH000001"]
        if charged:
            # The platform's application said no, without a reason: the record's back-off, never `sent`.
            assert (row["status"], row["attempts"], row["sent_at"]) == ("failed", 1, None), row
            time.sleep(0.1)
            w.pipeline.cycle()
            row = w.rows()["LSH000001"]
        else:
            # Nothing any application said: the platform's fault, tried again at once, nothing charged.
            assert row["attempts"] == 0, row
        assert row["status"] == "sent" and row["last_answer"] in ("新增成功", "修改成功"), row
        assert sim.records["LSH000001"] == expected_payload(visit)
        assert w.counts()["dead"] == 0
    finally:
        w.close()


# -- 4. platform-wide faults pause sending ---------------------------------------------------------


@pytest.mark.parametrize("down_with", ["502", "reset"])
def test_an_outage_pauses_sending_charges_nothing_and_logs_in_once_per_step(
    tmp_path: Path, sim: Simulator, down_with: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    w = World(tmp_path, sim, retry={"first_delay_s": 0.2, "max_delay_s": 1})
    try:
        visits = [make_visit(n, changed=past(60 - n)) for n in range(1, 43)]
        w.his.insert(visits)
        sim.faults.down = True
        sim.faults.down_with = down_with

        stats = w.pipeline.cycle()
        assert sim.counters["requests_login"] == 1, "42 records waiting, one login"
        assert sim.counters["requests"] == 1
        assert stats.unreachable and stats.unreachable.startswith("platform unreachable since"), stats
        assert {(r["status"], r["attempts"]) for r in w.rows().values()} == {("pending", 0)}

        # Cycles during the outage: one login attempt per back-off step at most.
        started = time.monotonic()
        cycles = 0
        while time.monotonic() - started < 3:
            w.pipeline.cycle()
            cycles += 1
            time.sleep(0.05)
        logins = sim.counters["requests_login"]
        assert sim.counters["requests"] == logins and 2 <= logins <= 6, (logins, cycles)
        assert {(r["status"], r["attempts"]) for r in w.rows().values()} == {("pending", 0)}

        capsys.readouterr()
        assert w.cli("status", "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert status["platform_unreachable"]["since"] and "login" in status["platform_unreachable"]["reason"]
        assert w.cli("status") == 0
        assert "platform unreachable since" in capsys.readouterr().out

        sim.faults.down = False
        _wait_probe(w)
        time.sleep(1.0)  # the client's own login back-off
        recovered = time.monotonic()
        for _ in range(20):
            stats = w.pipeline.cycle()
            if stats.sent:
                break
            _wait_probe(w)
        assert stats.sent == len(visits) and stats.unreachable is None, stats
        assert time.monotonic() - recovered < 3
        assert all(sim.records[v["serial_no"]] == expected_payload(v) for v in visits)
        assert w.counts()["dead"] == 0 and w.store.state.get_platform_down() is None
        capsys.readouterr()
        assert w.cli("status", "--json") == 0
        assert json.loads(capsys.readouterr().out)["platform_unreachable"] is None
    finally:
        w.close()


def test_once_during_an_outage_exits_75(tmp_path: Path, sim: Simulator, restore_logging: None) -> None:
    w = World(tmp_path, sim)
    try:
        w.his.insert([make_visit(1, changed=past(10))])
        sim.faults.down = True
        assert w.cli("once") == cli.EXIT_TEMPFAIL
        sim.faults.down = False
    finally:
        w.close()


def test_a_record_the_platform_keeps_refusing_does_not_hold_up_the_others(tmp_path: Path, sim: Simulator) -> None:
    w = World(tmp_path, sim)
    try:
        visits = [make_visit(n, changed=past(40 - n)) for n in range(1, 21)]
        w.his.insert(visits)
        sim.faults.reject_lsh = {"LSH000003": "middle", "LSH000007": "invalid"}
        for _ in range(4):
            w.pipeline.cycle()
            time.sleep(0.2)
        rows = w.rows()
        assert rows["LSH000003"]["status"] == "failed" and rows["LSH000003"]["attempts"] >= 2
        assert rows["LSH000007"]["status"] == "invalid" and "业务流水号" in str(rows["LSH000007"]["last_error"])
        assert sum(r["status"] == "sent" for r in rows.values()) == 18
        assert w.store.state.get_platform_down() is None and w.counts()["dead"] == 0
    finally:
        w.close()


def test_the_platform_refusing_everything_pauses_sending(tmp_path: Path, sim: Simulator) -> None:
    w = World(tmp_path, sim)
    try:
        w.his.insert(make_visit(n, changed=past(60 - n)) for n in range(1, 43))
        w.login_now()
        sim.faults.p_fake = 1.0
        sim.faults.fake = ("middle",)
        stats = w.pipeline.cycle()
        assert stats.unreachable and "without a reason" in stats.unreachable
        charged = [r for r in w.rows().values() if r["attempts"]]
        assert len(charged) <= w.settings.upstream.concurrency + 1
        assert w.counts()["dead"] == 0
    finally:
        w.close()


# -- 5. crash recovery within one poll ------------------------------------------------------------


def test_leases_of_a_pipeline_that_died_mid_dispatch_are_taken_back_at_once(tmp_path: Path, sim: Simulator) -> None:
    w = World(tmp_path, sim)
    dead_store = Store(w.settings.outbox.url.get_secret_value(), lease_s=300)
    crashed = make_pipeline(w.settings, dead_store)
    try:
        visits = [make_visit(n, changed=past(60 - n)) for n in range(1, 41)]
        w.his.insert(visits)
        w.login_now()
        sim.faults.latency_s = 0.01
        crashed.poll(CycleStats())

        # The process dies after 10 uploads: from then on it writes nothing, its leases stay.
        @sa.event.listens_for(dead_store.engine, "before_cursor_execute")
        def _dead(*_args: Any) -> None:
            if sim.counters["creates"] >= 10:
                raise RuntimeError("process killed")

        with pytest.raises(Exception, match="process killed"):
            crashed.dispatch(CycleStats())
        crashed.dispatcher.close()  # what was in flight reached the platform; its leases stay
        leased = [r for r in w.rows().values() if r["lease_owner"] == crashed.owner]
        assert leased, "the crash left no leases behind"

        started = time.monotonic()
        w.pipeline.cycle()  # the lock holder's next cycle: the dead process's leases are taken back
        assert w.counts()["sent"] == len(visits), w.counts()
        assert time.monotonic() - started < 10
        assert all(sim.records[v["serial_no"]] == expected_payload(v) for v in visits)
    finally:
        sim.faults.latency_s = 0
        w.close()
        dead_store.dispose()


def test_only_the_instance_lock_holder_takes_other_leases(tmp_path: Path, sim: Simulator) -> None:
    w = World(tmp_path, sim)
    try:
        w.his.insert([make_visit(1, changed=past(10))])
        w.pipeline.poll(CycleStats())
        claimed = w.store.leases.claim_due(now=utcnow(), limit=5, owner="elsewhere:1:dead")
        assert [c.lsh for c in claimed] == ["LSH000001"]
        other = make_pipeline(w.settings, w.store, client=w.client)  # not the lock holder
        try:
            other.dispatch(CycleStats())
        finally:
            other.dispatcher.close()
        assert w.rows()["LSH000001"]["lease_owner"] == "elsewhere:1:dead"
        stats = CycleStats()
        w.pipeline.dispatch(stats)
        assert stats.sent == 1 and w.rows()["LSH000001"]["lease_owner"] is None
    finally:
        w.close()


# -- 6. FAQ 11 and repeated kick-outs ----------------------------------------------------------------


def test_first_production_login_pauses_with_the_web_sites_address(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    w = World(tmp_path, sim)
    try:
        w.his.insert(make_visit(n, changed=past(60 - n)) for n in range(1, 43))
        sim.config.password_change = {TEST_USERNAME}
        stats = w.pipeline.cycle()
        assert stats.paused and sim.counters["requests_login"] == 1
        error = w.store.state.get_config_error()
        assert error is not None and "https://ehr.scwjxx.cn/login.html" in error["hint"]
        assert "upstream.password" in error["hint"]
        assert {(r["status"], r["attempts"]) for r in w.rows().values()} == {("pending", 0)}
        assert w.cli("status") == 0
        assert "ehr.scwjxx.cn/login.html" in capsys.readouterr().out

        sim.config.password_change = set()  # the password was changed on the web site
        time.sleep(1.1)  # the client's login back-off
        stats = w.pipeline.cycle()
        assert stats.sent == 42 and stats.paused is None and w.store.state.get_config_error() is None
    finally:
        w.close()


def test_another_program_logging_in_again_and_again_pauses_with_faq_4s_fix(tmp_path: Path, sim: Simulator) -> None:
    w = World(tmp_path, sim, upstream={"concurrency": 2})
    stop = threading.Event()
    try:
        w.his.insert(make_visit(n, changed=past(100 - n)) for n in range(1, 81))
        sim.faults.latency_s = 0.01

        def other_program() -> None:
            # Logs in with the same account each time crowd-sync has: crowd-sync's token is pushed out.
            seen = 0
            while not stop.wait(0.002):
                if sim.counters["logins"] > seen:
                    time.sleep(0.03)
                    sim.kick()
                    seen = sim.counters["logins"]

        thread = threading.Thread(target=other_program, daemon=True)
        thread.start()
        with capture_all_logs() as logged:
            started = time.monotonic()
            stats = w.pipeline.cycle()
            took = time.monotonic() - started
        assert stats.paused and "another program" in stats.paused, stats
        error = w.store.state.get_config_error()
        assert error is not None and "do not let other programs log in" in error["hint"]
        assert sim.counters["logins"] <= KICKS_TO_PAUSE + 1
        assert took < 20
        assert any(e["event"] == "sending_paused" for e in logged)
        assert w.counts()["dead"] == 0 and all(r["attempts"] == 0 for r in w.rows().values())
    finally:
        stop.set()
        sim.faults.latency_s = 0
        w.close()


# -- 7. what an operator sees ----------------------------------------------------------------------


def test_healthz_and_metrics_say_platform_unreachable(tmp_path: Path, sim: Simulator) -> None:
    from sync.metrics import Metrics

    w = World(tmp_path, sim)
    try:
        metrics = Metrics(store=w.store, poll_every_s=120)
        w.his.insert([make_visit(1, changed=past(10))])
        sim.faults.down = True
        stats = w.pipeline.cycle()
        metrics.job_finished("cycle", stats=stats, error=None, duration_s=0.1)
        health = metrics.health()
        assert not health.ok and health.status == "unreachable"
        assert health.reason is not None and health.reason.startswith("platform unreachable since")
        text = metrics.registry.get_sample_value("crowd_sync_platform_unreachable")
        since = metrics.registry.get_sample_value("crowd_sync_platform_unreachable_since_timestamp_seconds")
        assert text == 1 and since is not None and abs(since - time.time()) < 60

        sim.faults.down = False
        time.sleep(1.1)
        _wait_probe(w)
        stats = w.pipeline.cycle()
        metrics.job_finished("cycle", stats=stats, error=None, duration_s=0.1)
        assert metrics.health().ok and stats.sent == 1
        assert metrics.registry.get_sample_value("crowd_sync_platform_unreachable") == 0
    finally:
        w.close()


def test_money_survives_every_path_as_decimal(tmp_path: Path, sim: Simulator) -> None:
    w = World(tmp_path, sim)
    try:
        w.his.insert([make_visit(1, changed=past(10), total=Decimal("0.30"), insurance=Decimal("0.10"))])
        w.pipeline.cycle()
        assert sim.records["LSH000001"]["totalFee"] == Decimal("0.30")
    finally:
        w.close()
