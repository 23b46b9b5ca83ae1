"""The platform misbehaving: flaky gateway, trickled answers, a day-long outage, a
revoked app key. Real simulator over loopback, SQLite HIS and outbox, the Pipeline
driven cycle by cycle (with a controllable clock where simulated time is needed).
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync import cli
from sync.outbox.schema import sync_outbox
from sync.stats import CycleStats
from sync.upstream.simulator import SimConfig, Simulator
from tests.support import capture_all_logs, expected_payload, make_visit
from tests.world import FakeClock, World, past, utcnow

# -- 1. a flaky platform ------------------------------------------------------------------


def test_flaky_platform_with_token_storms_delivers_everything_with_few_logins(tmp_path: Path) -> None:
    ttl_s = 2.0
    with Simulator(SimConfig(token_ttl_s=ttl_s)) as sim:
        sim.faults.seed = 20240718
        sim.faults.p_504 = 0.2
        sim.faults.p_reset = 0.05
        sim.faults.p_commit_then_reset = 0.05
        # 50 ms a request, 4 at a time: the run spans several token lifetimes on any machine.
        sim.faults.latency_s = 0.05
        w = World(
            tmp_path, sim,
            upstream={"concurrency": 4, "timeout_s": 5, "token_ttl_h": 12},
            retry={"first_delay_s": 0.05, "max_delay_s": 0.2},
        )
        visits = [make_visit(n, changed=past(400 - n)) for n in range(1, 301)]
        w.his.insert(visits)

        kicks = 0
        stop = threading.Event()

        def kicker() -> None:
            # Another program logging in with the hospital's account, early in the run: at
            # points of progress, not of time, so each kick lands on a live token however
            # slow the machine (kicks before the first login would kick nothing). After the
            # last one at least 200 uploads remain, 50 ms each, 4 at a time: 2.5 s under one
            # token, so the platform must also expire a token (ttl_s = 2).
            nonlocal kicks
            for creates in (20, 50, 80):
                while sim.counters["creates"] < creates:
                    if stop.wait(0.005):
                        return
                sim.kick()
                kicks += 1

        thread = threading.Thread(target=kicker, daemon=True)
        started = time.monotonic()
        thread.start()
        cycles = 0
        try:
            with capture_all_logs() as logged:
                # As the daemon would: a cycle, then another soon (a probe while sending pauses).
                while time.monotonic() - started < 90:
                    cycles += 1
                    w.pipeline.cycle()
                    if w.waiting() == 0:
                        break
                    time.sleep(0.05)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            thread.join()
        try:
            counts = w.counts()
            assert counts["sent"] == len(visits) and counts["dead"] == 0, (
                f"after {cycles} cycles: {counts}, simulator faults injected: {sim.counters['faults']}"
            )
            missing = [v["serial_no"] for v in visits if sim.records.get(v["serial_no"]) != expected_payload(v)]
            assert not missing, f"{len(missing)} of {len(visits)} records missing or different upstream: {missing[:5]}"
            assert sim.counters["faults"] > 50, f"only {sim.counters['faults']} faults injected"
            assert sim.counters["updates"] > 0, "no commit-then-reset upload was sent again"

            refused = [str(e.get("platform_message")) for e in logged if e["event"] == "token_refused"]
            expired_seen = sum("登录过期" in m for m in refused)
            kicked_seen = sum("被挤出" in m for m in refused)
            assert expired_seen >= 1 and kicked_seen >= 1, f"refusals seen: {refused}"

            logins = sim.counters["logins"]
            # A token that expired lived ttl_s, and each login ends the previous token, so at
            # most elapsed / ttl_s expiries can have happened; every other login needs a kick.
            expiries = int(elapsed / ttl_s)
            assert logins <= 1 + expiries + kicks, (
                f"{logins} logins for at most {expiries} expiries and {kicks} kicks in {elapsed:.1f} s"
            )
            assert logins * 10 < len(visits), f"{logins} logins for {len(visits)} records"
            print(
                f"flaky: {len(visits)} records in {cycles} cycles, {elapsed:.1f} s, {sim.counters['requests']} "
                f"requests, {sim.counters['faults']} faults, {logins} logins ({kicks} kicks, "
                f"{expired_seen} expiry and {kicked_seen} kick refusals)"
            )
        finally:
            w.close()


# -- 2. a server that trickles its answer ---------------------------------------------------


def test_trickled_answer_is_cut_at_the_deadline_then_sent_when_the_server_recovers(
    tmp_path: Path, sim: Simulator
) -> None:
    timeout_s = 1.0
    w = World(tmp_path, sim, upstream={"timeout_s": timeout_s, "concurrency": 1}, retry={"first_delay_s": 0.2})
    try:
        visit = make_visit(1, changed=past(10))
        w.his.insert([visit])
        w.login_now()
        sim.faults.trickle_s = timeout_s / 2  # a byte every half timeout: a read timeout alone would never fire
        uploads = sim.counters["requests_upload"]

        started = time.monotonic()
        stats = w.pipeline.cycle()
        took = time.monotonic() - started

        row = w.rows()["LSH000001"]
        tries = sim.counters["requests_upload"] - uploads
        # Every try was cut at timeout_s; a few in a row mean the platform is down, not the record.
        assert 2 <= tries <= 4 and took <= tries * (timeout_s + 0.5), f"{tries} tries held the cycle {took:.1f} s"
        assert stats.unreachable and "timeout_s" in stats.unreachable, stats
        assert (row["status"], row["attempts"], row["lease_owner"]) == ("pending", 0, None), row
        assert w.store.state.get_platform_down() is not None

        sim.faults.trickle_s = 0.0
        next_probe = w.pipeline.next_probe_at
        assert next_probe is not None
        time.sleep(max(0.0, (next_probe - utcnow()).total_seconds()) + 0.05)
        stats = w.pipeline.cycle()

        assert stats.sent == 1 and w.rows()["LSH000001"]["status"] == "sent"
        assert sim.records["LSH000001"] == expected_payload(visit)
        assert w.store.state.get_platform_down() is None
    finally:
        w.close()


# -- 3. the platform down for hours (simulated time) -------------------------------------------

# Hours of simulated downtime: the probes reach their one-a-minute pace within minutes, the rest
# is that pace held; ``CROWD_SYNC_DOWNTIME_H`` runs a longer outage.
DOWNTIME_H = float(os.environ.get("CROWD_SYNC_DOWNTIME_H", "3"))


def test_hours_of_downtime_charge_no_record_probe_politely_and_drain_when_back(
    tmp_path: Path, sim: Simulator
) -> None:
    clock = FakeClock(utcnow())
    start = clock.now
    w = World(tmp_path, sim, clock=clock, retry={"first_delay_s": 30, "max_delay_s": 3600})
    try:
        visits = [make_visit(n, changed=past(60 - n)) for n in range(1, 41)]
        w.his.insert(visits)
        w.login_now()
        sim.faults.down = True
        sim.faults.down_with = "502"
        requests = sim.counters["requests"]

        stats = w.pipeline.cycle()
        assert stats.unreachable and "since" in stats.unreachable, stats
        tripped = sim.counters["requests"] - requests
        assert tripped <= w.settings.upstream.concurrency + 1, f"{tripped} requests before sending paused"
        gaps: list[float] = []
        while clock.now - start < timedelta(hours=DOWNTIME_H):
            nxt = w.pipeline.next_probe_at
            assert nxt is not None and nxt > clock.now
            gaps.append((nxt - clock.now).total_seconds())
            clock.now = nxt
            w.pipeline.dispatch_only()
            # Nobody's fault but the platform's: no record is charged, none is given up.
            rows = w.rows().values()
            assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 0)}, clock.now - start
        made = sim.counters["requests"] - requests
        assert made <= 1 + len(gaps) + tripped, f"{made} requests for {len(gaps)} probes"
        # Soon at first (an outage is often short), then once a minute at most, never hammering.
        assert gaps[0] <= 5 and max(gaps) <= 60 and min(gaps) >= 2.5, gaps[:8]
        assert DOWNTIME_H * 3600 / 60 <= len(gaps) <= DOWNTIME_H * 3600 / 30 + 10, len(gaps)

        sim.faults.down = False
        recovered = clock.now
        clock.now = w.pipeline.next_probe_at or clock.now
        stats = w.pipeline.dispatch_only()

        assert stats.sent == len(visits) and w.waiting() == 0, stats
        assert (clock.now - recovered).total_seconds() <= 60
        assert all(sim.records[v["serial_no"]] == expected_payload(v) for v in visits)
        assert w.store.state.get_platform_down() is None
        print(f"{DOWNTIME_H:g} h down: {len(gaps)} probes, {made} requests, {len(visits)} records drained at the first probe after")
    finally:
        w.close()


def test_dead_rows_of_earlier_versions_come_back_on_retry(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    w = World(tmp_path, sim)
    try:
        visits = [make_visit(n, changed=past(30 - n)) for n in range(1, 4)]
        w.his.insert(visits)
        w.login_now()
        sim.faults.down = True
        w.pipeline.cycle()
        # An earlier version gave up on transient failures after retry.give_up_after_h.
        with w.store.engine.begin() as conn:
            conn.execute(sa.update(sync_outbox).values(status="dead", attempts=40, generic_failures=0))
        sim.faults.down = False

        assert cli.main(["retry", "--status", "dead", "--config", str(w.settings_path)]) == 0
        assert f"requeued {len(visits)} record(s)" in capsys.readouterr().out
        w.store.state.clear_platform_down()
        stats = w.pipeline.cycle()

        assert stats.sent == len(visits) and w.counts()["sent"] == len(visits)
        assert set(sim.records) == {v["serial_no"] for v in visits}
    finally:
        w.close()


# -- 4. a configuration error in the middle of a run ----------------------------------------------


def test_revoked_app_key_mid_run_pauses_at_once_without_burning_attempts_then_resumes(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    concurrency = 4
    w = World(tmp_path, sim, upstream={"concurrency": concurrency})
    try:
        visits = [make_visit(n, changed=past(300 - n)) for n in range(1, 201)]
        w.his.insert(visits)
        w.login_now()
        sim.faults.latency_s = 0.02  # the backlog takes a second: time for the key to be revoked mid-batch
        revoked_after = 30

        def revoke_mid_run() -> None:
            while sim.counters["creates"] < revoked_after:
                time.sleep(0.001)
            sim.faults.app_key_revoked = True

        revoker = threading.Thread(target=revoke_mid_run, daemon=True)
        revoker.start()
        with capture_all_logs() as logged:
            stats = w.pipeline.cycle()
        revoker.join(timeout=10)

        rejected = sim.counters["gateway_rejections"]
        sent_before = sim.counters["creates"]
        assert stats.paused, stats
        assert revoked_after <= sent_before < len(visits), f"{sent_before} sent before the pause"
        # Each upload in flight is refused, then tried once in the other reading of the key
        # (upstream.app_key_form: auto), and that is all.
        assert 2 <= rejected <= 2 * concurrency, f"{rejected} requests refused after the app key was revoked"
        rows = w.rows()
        left = [r for r in rows.values() if r["status"] != "sent"]
        assert len(left) == len(visits) - sent_before
        assert all(r["status"] == "pending" and r["attempts"] == 0 for r in left), {
            (r["status"], r["attempts"]) for r in left
        }
        assert all(r["lease_owner"] is None for r in rows.values()), "leases left behind by the pause"

        error = w.store.state.get_config_error()
        assert error is not None and "app_key" in error["hint"], error
        paused = [e for e in logged if e["event"] == "sending_paused"]
        assert len(paused) == 1 and "app_key" in paused[0]["fix"], paused

        assert cli.main(["status", "--config", str(w.settings_path)]) == 0
        out = capsys.readouterr().out
        assert "sending paused" in out and "app_key" in out, out

        # Still revoked: each cycle sends one probe (in each reading of the key), not the backlog.
        requests = sim.counters["requests"]
        stats = w.pipeline.cycle()
        assert sim.counters["requests"] == requests + 2, f"{sim.counters['requests'] - requests} requests while paused"
        assert stats.sent == 0 and all(r["attempts"] == 0 for r in w.rows().values() if r["status"] != "sent")

        sim.faults.app_key_revoked = False
        stats = w.pipeline.cycle()

        assert stats.sent == len(left) and stats.paused is None, stats
        assert w.store.state.get_config_error() is None
        assert w.counts()["sent"] == len(visits)
        assert all(sim.records[v["serial_no"]] == expected_payload(v) for v in visits)
        assert sim.counters["logins"] == 1, "the pause must not cost a new login"
    finally:
        w.close()


# -- 5. a poison payload ----------------------------------------------------------------------------


def _next_due_at(w: World) -> datetime | None:
    """When the next pending or failed row falls due (a leased one: not before its lease ends)."""
    o = sync_outbox
    due_at = sa.case((o.c.lease_until > o.c.next_attempt_at, o.c.lease_until), else_=o.c.next_attempt_at)
    with w.store.engine.connect() as conn:
        value = conn.execute(sa.select(sa.func.min(due_at)).where(o.c.status.in_(["pending", "failed"]))).scalar()
    assert value is None or isinstance(value, datetime)
    return value


def _advance_to_next_due(w: World, clock: FakeClock) -> None:
    nxt = _next_due_at(w)
    assert nxt is not None
    clock.now = max(clock.now, nxt)


def test_a_payload_that_crashes_the_upload_is_parked_invalid_after_three_crashes(tmp_path: Path, sim: Simulator) -> None:
    """A DBA edits a pending row's payload into broken JSON: the upload path raises where no
    platform answer is involved. It used to be released and crash again every cycle, for ever,
    never gaining an attempt or a status."""
    clock = FakeClock(utcnow())
    w = World(tmp_path, sim, clock=clock)
    try:
        w.his.insert([make_visit(1, changed=past(5)), make_visit(2, changed=past(4))])
        w.pipeline.poll(CycleStats())
        with w.store.engine.begin() as conn:
            conn.execute(sa.update(sync_outbox).where(sync_outbox.c.lsh == "LSH000001").values(payload='{"lsh": "LSH0'))
        stats = w.pipeline.cycle()
        assert stats.sent == 1 and stats.failed == 1, stats  # the good record is not held up
        assert w.rows()["LSH000001"]["status"] == "failed"

        for _ in range(5):
            if w.rows()["LSH000001"]["status"] == "invalid":
                break
            _advance_to_next_due(w, clock)
            w.pipeline.cycle()
        row = w.rows()["LSH000001"]
        assert row["status"] == "invalid", row
        assert row["crashes"] == 3 and row["attempts"] == 3
        assert "JSONDecodeError" in str(row["last_error"]) and "crowd-sync retry --lsh" in str(row["last_error"])
        assert _next_due_at(w) is None  # nothing left to crash on

        # Requeued (after a correction), it starts over with a fresh count.
        assert w.store.queue.requeue(now=clock.now, lshs=["LSH000001"]) == 1
        assert w.rows()["LSH000001"]["crashes"] == 0
    finally:
        w.close()
