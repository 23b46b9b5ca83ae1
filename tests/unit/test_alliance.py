"""A county medical alliance (医共体): several institutions on one HIS, one crowd-sync.

Each visit goes up under its own institution's key and account ("每个对接机构都有自己的
hie_app_key"), two members' equal lsh stay two records (lsh is "只能保证院内唯一"), one
member's refused key pauses that member alone, and a visit of an institution the settings
do not list is parked with the fix.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from sync.app import make_pipeline
from sync.outbox.store import Store
from sync.pipeline import Pipeline
from sync.settings import Settings
from sync.upstream.client import LOGIN_BACKOFF_MAX_S
from sync.upstream.simulator import TEST_APP_KEY, TEST_ORG_ID, TEST_PASSWORD, TEST_USERNAME, SimConfig, Simulator
from tests.support import His, alliance_settings, his_now, make_visit

TOWNSHIP = "510115002"


@dataclass
class Alliance:
    sim: Simulator
    his: His
    store: Store
    pipeline: Pipeline
    settings: Settings


def members(sim: Simulator) -> list[dict[str, str]]:
    township = sim.add_institution(TOWNSHIP, name="万春镇卫生院")
    ((user, password),) = township.accounts.items()
    return [
        {"code": TEST_ORG_ID, "name": "县医院", "app_key": TEST_APP_KEY, "username": TEST_USERNAME,
         "password": TEST_PASSWORD},
        {"code": TOWNSHIP, "name": "万春镇卫生院", "app_key": township.app_key, "username": user,
         "password": password},
    ]


@pytest.fixture
def alliance(tmp_path: Path) -> Iterator[Alliance]:
    with Simulator(SimConfig()) as sim:
        his = His(f"sqlite:///{tmp_path / 'his.db'}")
        settings = alliance_settings(
            tmp_path / "settings.yaml", his_url=his.url, outbox_url=f"sqlite:///{tmp_path / 'outbox.db'}",
            base_url=sim.url, members=members(sim),
        )
        store = Store(settings.outbox.url.get_secret_value(), lease_s=60)
        store.ensure_schema()
        pipeline = make_pipeline(settings, store)
        try:
            yield Alliance(sim, his, store, pipeline, settings)
        finally:
            pipeline.close()
            store.dispose()
            his.dispose()


def visits(first: int, count: int, *, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    changed = (his_now() - timedelta(minutes=5)).replace(microsecond=0)
    return [make_visit(n, changed=changed - timedelta(seconds=n), rng=rng) for n in range(first, first + count)]


def test_colliding_lsh_of_two_members_are_two_records_each_under_its_own_account(alliance: Alliance) -> None:
    county, township = visits(1, 6, seed=1), visits(1, 4, seed=2)  # LSH000001.. in both
    alliance.his.insert_alliance(TEST_ORG_ID, county)
    alliance.his.insert_alliance(TOWNSHIP, township)

    stats = alliance.pipeline.cycle()

    assert (stats.rows_read, stats.sent) == (10, 10)
    sim = alliance.sim
    assert set(sim.records_of(TEST_ORG_ID)) == {v["serial_no"] for v in county}
    assert set(sim.records_of(TOWNSHIP)) == {v["serial_no"] for v in township}
    # The same lsh, two people: each record is its own institution's visit.
    for mine, code in ((county, TEST_ORG_ID), (township, TOWNSHIP)):
        for v in mine:
            assert sim.records_of(code)[str(v["serial_no"])]["cardNo"] == v["id_no"]
    # Each member logged in with its own account and uploaded only its own visits.
    assert sim.counters_of(TEST_ORG_ID)["uploads"] == 6 and sim.counters_of(TOWNSHIP)["uploads"] == 4
    assert sim.counters_of(TEST_ORG_ID)["logins"] == 1 and sim.counters_of(TOWNSHIP)["logins"] == 1
    assert sim.counters_of(TOWNSHIP)["key_mismatches"] == 0
    summary = alliance.store.summary(now=alliance.pipeline.clock(), institutions=(TEST_ORG_ID, TOWNSHIP))
    assert summary.counts["sent"] == 10
    assert {code: apart["counts"]["sent"] for code, apart in summary.institutions.items()} == {
        TEST_ORG_ID: 6, TOWNSHIP: 4,
    }
    # Read again, nothing changed: nothing is sent again.
    assert alliance.pipeline.cycle().sent == 0


def test_the_service_counts_every_members_logins_and_uploads(alliance: Alliance) -> None:
    from sync.daemon import Daemon

    daemon = Daemon(alliance.settings, alliance.pipeline)
    alliance.his.insert_alliance(TEST_ORG_ID, visits(1, 3, seed=1))
    alliance.his.insert_alliance(TOWNSHIP, visits(1, 2, seed=2))

    assert alliance.pipeline.cycle().sent == 5

    registry = daemon.metrics.registry
    assert registry.get_sample_value("crowd_sync_logins_total") == 2  # one per member's account
    count = "crowd_sync_upstream_request_duration_seconds_count"
    assert registry.get_sample_value(count, {"endpoint": "upload"}) == 5
    assert registry.get_sample_value(count, {"endpoint": "login"}) == 2


def test_one_members_revoked_key_pauses_only_that_member(alliance: Alliance) -> None:
    alliance.his.insert_alliance(TEST_ORG_ID, visits(1, 5, seed=3))
    alliance.his.insert_alliance(TOWNSHIP, visits(1, 5, seed=4))
    alliance.sim.faults.app_key_revoked_for = {TOWNSHIP}

    stats = alliance.pipeline.cycle()

    assert len(alliance.sim.records_of(TEST_ORG_ID)) == 5
    assert alliance.sim.records_of(TOWNSHIP) == {}
    state = alliance.store.state
    assert state.get_config_error(TEST_ORG_ID) is None
    paused = state.get_config_error(TOWNSHIP)
    assert paused is not None and paused["hint"]
    assert stats.paused is not None and stats.paused.startswith(f"{TOWNSHIP}: ")
    assert state.get_platform_down() is None  # a refused key is no outage
    summary = alliance.store.summary(now=alliance.pipeline.clock(), institutions=(TEST_ORG_ID, TOWNSHIP))
    assert summary.institutions[TOWNSHIP]["counts"]["pending"] == 5
    assert summary.config_error is not None and summary.config_error["institution"] == TOWNSHIP

    # The county hospital goes on meanwhile; the township's records wait, nothing charged.
    alliance.his.insert_alliance(TEST_ORG_ID, visits(20, 2, seed=5))
    alliance.pipeline.cycle()
    assert len(alliance.sim.records_of(TEST_ORG_ID)) == 7 and alliance.sim.records_of(TOWNSHIP) == {}

    # Key fixed on the platform: the township resumes by itself (once its login back-off is over).
    alliance.sim.faults.app_key_revoked_for = set()
    time.sleep(LOGIN_BACKOFF_MAX_S / 4)
    alliance.pipeline.cycle()
    assert len(alliance.sim.records_of(TOWNSHIP)) == 5
    assert state.get_config_error(TOWNSHIP) is None


def test_a_visit_of_an_institution_not_in_the_settings_is_parked_with_the_value_and_the_fix(
    alliance: Alliance,
) -> None:
    alliance.his.insert_alliance(TEST_ORG_ID, visits(1, 2, seed=6))
    alliance.his.insert_alliance("510115099", visits(1, 1, seed=7))

    stats = alliance.pipeline.cycle()

    assert (stats.sent, stats.invalid) == (2, 1)
    (row,) = alliance.store.problems(["invalid"])
    assert row["institution"] == "510115099" and row["lsh"] == "LSH000001"
    assert "'510115099' is none of the settings' institutions[].code" in row["last_error"]
    assert "add that institution" in row["last_error"]
    assert alliance.sim.all_records().keys() == {(TEST_ORG_ID, "LSH000001"), (TEST_ORG_ID, "LSH000002")}


def test_status_failures_report_metrics_and_commands_show_each_institution(
    alliance: Alliance, capsys: pytest.CaptureFixture[str]
) -> None:
    from sync import cli
    from sync.metrics import Metrics

    alliance.his.insert_alliance(TEST_ORG_ID, visits(1, 3, seed=8))
    alliance.his.insert_alliance(TOWNSHIP, visits(1, 2, seed=9))
    alliance.his.insert_alliance("510115099", visits(7, 1, seed=10))
    alliance.sim.faults.app_key_revoked_for = {TOWNSHIP}
    alliance.pipeline.cycle()
    config = str(alliance.settings.source_path)
    capsys.readouterr()

    assert cli.main(["status", "--json", "--config", config]) == 0
    status = json.loads(capsys.readouterr().out)
    apart = {m["code"]: m for m in status["institutions"]}
    assert apart[TEST_ORG_ID]["counts"]["sent"] == 3 and apart[TEST_ORG_ID]["config_error"] is None
    assert apart[TOWNSHIP]["counts"]["pending"] == 2 and apart[TOWNSHIP]["config_error"]["message"]
    assert apart["510115099"]["configured"] is False and apart["510115099"]["counts"]["invalid"] == 1
    assert status["counts"]["sent"] == 3  # together

    assert cli.main(["failures", "--config", config]) == 0
    assert "510115099/LSH000007" in capsys.readouterr().out

    month = f"{his_now():%Y-%m}"
    assert cli.main(["report", "--month", month, "--config", config]) == 0
    text = capsys.readouterr().out
    assert f"机构 institution {TEST_ORG_ID} 县医院" in text and f"机构 institution {TOWNSHIP} 万春镇卫生院" in text

    alliance.sim.faults.app_key_revoked_for = set()
    assert cli.main(["lookup", "510100198506020036", "--json", "--institution", TOWNSHIP, "--config", config]) == 0
    capsys.readouterr()
    assert alliance.sim.counters_of(TOWNSHIP)["lookups"] == 1 and alliance.sim.counters_of(TEST_ORG_ID)["lookups"] == 0
    assert cli.main(["lookup", "510100198506020036", "--config", config]) == 2  # several: name one
    assert "--institution" in capsys.readouterr().err

    assert cli.main(["check", "--institution", TOWNSHIP, "--config", config]) == 0
    out = capsys.readouterr().out
    assert "platform login" in out and f"[{TOWNSHIP} 万春镇卫生院]" in out

    metrics = Metrics(store=alliance.store, poll_every_s=60, institutions=(TEST_ORG_ID, TOWNSHIP))
    registry = metrics.registry
    assert registry.get_sample_value(
        "crowd_sync_institution_records", {"institution": TOWNSHIP, "status": "pending"}
    ) == 2
    assert registry.get_sample_value("crowd_sync_institution_config_error", {"institution": TOWNSHIP}) == 1
    assert registry.get_sample_value("crowd_sync_institution_config_error", {"institution": TEST_ORG_ID}) == 0
    assert metrics.institution_states() == {TEST_ORG_ID: "ok", TOWNSHIP: metrics.institution_states()[TOWNSHIP]}
    assert metrics.institution_states()[TOWNSHIP].startswith("paused: ")


def test_the_alliance_demo_sends_each_members_visits_under_its_own_account(tmp_path: Path) -> None:
    import io

    from sync import demo_alliance

    out = io.StringIO()
    assert demo_alliance.main(str(tmp_path / "demo"), out=out, institutions=2) == 0
    text = out.getvalue()
    assert "510115 " in text and "510115002 " in text and "FAQ 14 mismatches 0" in text
    assert "demo finished as expected" in text


def test_rows_of_an_institution_no_longer_in_the_settings_are_parked_not_left_waiting(tmp_path: Path) -> None:
    """An outbox kept from an earlier configuration (institution.code renamed, a member removed):
    its due rows have no credentials to go with; they are parked with the fix, never lost."""
    from dataclasses import replace

    from sync.intake import incoming
    from tests.support import write_settings

    with Simulator(SimConfig()) as sim:
        his = His(f"sqlite:///{tmp_path / 'his.db'}")
        settings = write_settings(tmp_path / "settings.yaml", his_url=his.url,
                                  outbox_url=f"sqlite:///{tmp_path / 'outbox.db'}", base_url=sim.url)
        store = Store(settings.outbox.url.get_secret_value())
        store.ensure_schema()
        today = his_now().date()
        row = {**visits(1, 1, seed=11)[0]}
        canonical = {
            "lsh": row["serial_no"], "code": row["visit_no"], "card_type": row["id_type"], "card_no": row["id_no"],
            "visit_type": row["kind"], "enter_date": row["admitted"], "leave_date": row["discharged"],
            "key_crowd": row["is_key"], "icd_name": row["diag_name"], "icd_code": row["diag_code"],
            "total_fee": row["total"], "ins_fee": row["insurance"], "total_prepayment": row["deposit"],
            "deficient_fee": row["owed"], "settlement_date": row["settled"], "changed_at": row["changed"],
        }
        item = incoming(canonical, key_crowd=settings.key_crowd, today=today)
        store.queue.enqueue([replace(item, institution="old-member")], now=his_now())
        pipeline = make_pipeline(settings, store)
        try:
            stats = pipeline.cycle()
        finally:
            pipeline.close()
        (parked,) = store.problems(["invalid"])
        assert stats.invalid == 1 and sim.all_records() == {}
        assert parked["institution"] == "old-member" and "add it to institutions:" in parked["last_error"]
        store.dispose()
        his.dispose()


def test_show_tells_the_story_of_each_institutions_visit_with_the_same_lsh(
    alliance: Alliance, capsys: pytest.CaptureFixture[str]
) -> None:
    from sync import cli

    alliance.his.insert_alliance(TEST_ORG_ID, visits(1, 1, seed=12))
    broken = visits(1, 1, seed=13)
    broken[0]["owed"] = broken[0]["total"] + 1  # parked invalid: a story of its own
    alliance.his.insert_alliance(TOWNSHIP, broken)
    alliance.pipeline.cycle()
    config = str(alliance.settings.source_path)
    capsys.readouterr()
    for code, status in ((TEST_ORG_ID, "sent"), (TOWNSHIP, "invalid")):
        assert cli.main(["show", "LSH000001", "--institution", code, "--json", "--config", config]) == 0
        story = json.loads(capsys.readouterr().out)
        assert story["status"] == status
        assert [a["outcome"] for a in story["attempts"]] == [status]


@pytest.mark.parametrize("seed", [5, 17])
def test_random_schedule_of_an_alliance_loses_nothing_and_crosses_no_accounts(alliance: Alliance, seed: int) -> None:
    """Visits arrive for either member (equal lsh included) while keys are revoked and
    restored per member, tokens revoked, the platform goes down and answers 504s. Once the
    faults stop and the queue drains: each member holds exactly its own visits, as the HIS
    holds them, and no upload ever reached the platform under the other member's account."""
    from tests.support import expected_payload

    rng = random.Random(seed)
    his: dict[tuple[str, str], dict[str, object]] = {}
    serial = {TEST_ORG_ID: 0, TOWNSHIP: 0}
    sim = alliance.sim
    for _ in range(40):
        action = rng.choices(["visits", "cycle", "revoke", "restore", "tokens", "down", "flaky"],
                             weights=[6, 10, 2, 2, 1, 1, 2])[0]
        if action == "visits":
            code = rng.choice([TEST_ORG_ID, TOWNSHIP])
            first = serial[code] + 1
            serial[code] += rng.randint(1, 4)
            rows = visits(first, serial[code] - first + 1, seed=rng.randrange(10**6))
            alliance.his.insert_alliance(code, rows)
            his.update({(code, str(r["serial_no"])): r for r in rows})
        elif action == "cycle":
            alliance.pipeline.cycle()
        elif action == "revoke":
            sim.faults.app_key_revoked_for = {rng.choice([TEST_ORG_ID, TOWNSHIP])}
        elif action == "restore":
            sim.faults.app_key_revoked_for = set()
        elif action == "tokens":
            sim.revoke_tokens()
        elif action == "down":
            sim.faults.down = not sim.faults.down
        else:
            sim.faults.p_504 = rng.choice([0.0, 0.2])
    sim.faults.clear()
    sim.faults.app_key_revoked_for = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alliance.pipeline.cycle()
        counts = alliance.store.summary(now=alliance.pipeline.clock(), institutions=(TEST_ORG_ID, TOWNSHIP)).counts
        if counts["sent"] == len(his):
            break
        nxt = alliance.pipeline.next_probe_at
        time.sleep(0.3 if nxt is None else min(2.0, max(0.05, (nxt - alliance.pipeline.clock()).total_seconds())))
    assert set(sim.all_records()) == set(his), "lost or unexpected visits"
    for (code, lsh), v in his.items():
        assert sim.records_of(code)[lsh] == expected_payload(v), f"{code}/{lsh} differs upstream"
    assert sim.counters_of(TEST_ORG_ID)["key_mismatches"] == sim.counters_of(TOWNSHIP)["key_mismatches"] == 0
