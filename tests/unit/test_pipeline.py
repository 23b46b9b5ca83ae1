"""The data path end to end: HIS rows -> outbox -> simulator, on SQLite."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync.app import make_client, make_pipeline
from sync.outbox.store import Store
from sync.settings import Settings
from sync.upstream.simulator import TEST_IDS, Simulator
from tests.support import His, expected_payload, his_now, make_visit, write_settings


class World:
    def __init__(self, tmp: Path, sim: Simulator, his_url: str, outbox_url: str, **overrides: dict[str, object]) -> None:
        self.sim = sim
        self.his = His(his_url)
        self.settings: Settings = write_settings(
            tmp / "settings.yaml", his_url=his_url, outbox_url=outbox_url, base_url=sim.url, overrides=overrides
        )
        self.store = Store(self.settings.outbox.url.get_secret_value(), lease_s=60)
        self.store.ensure_schema()
        self.client = make_client(self.settings, self.store)
        self.pipeline = make_pipeline(self.settings, self.store, client=self.client)

    def outbox(self) -> dict[str, dict[str, object]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM sync_outbox")).mappings().all()
        return {r["lsh"]: dict(r) for r in rows}

    def login_now(self) -> None:
        """Put a token in the shared store, so the next request is the one under test."""
        self.store.token_store().renew(None, self.client.login)

    def close(self) -> None:
        self.pipeline.close()
        self.store.dispose()
        self.his.dispose()


@pytest.fixture
def world(tmp_path: Path, sim: Simulator) -> Iterator[World]:
    w = World(tmp_path, sim, f"sqlite:///{tmp_path / 'his.db'}", f"sqlite:///{tmp_path / 'outbox.db'}")
    yield w
    w.close()


def _past(minutes: float) -> datetime:
    return his_now() - timedelta(minutes=minutes)


def test_seeded_his_arrives_exactly(world: World) -> None:
    rng = random.Random(1)
    visits = [make_visit(n, changed=_past(500 - n), rng=rng) for n in range(1, 41)]
    world.his.insert(visits)

    stats = world.pipeline.cycle()

    assert stats.rows_read == 40
    assert stats.sent == 40
    assert world.sim.counters["creates"] == 40
    for v in visits:
        assert world.sim.records[v["serial_no"]] == expected_payload(v)
    assert {r["status"] for r in world.outbox().values()} == {"sent"}


def test_resettled_visit_is_updated_and_nothing_else_resent(world: World) -> None:
    visits = [make_visit(n, changed=_past(300 - n)) for n in range(1, 11)]
    world.his.insert(visits)
    world.pipeline.cycle()
    uploads = world.sim.counters["uploads"]

    world.his.update("LSH000004", total=Decimal("999.99"), owed=Decimal("10.00"), changed=_past(0.1))
    stats = world.pipeline.cycle()

    assert stats.sent == 1 and stats.updated == 1
    assert world.sim.counters["uploads"] == uploads + 1
    assert world.sim.records["LSH000004"]["totalFee"] == Decimal("999.99")
    assert world.sim.records["LSH000004"]["deficientFee"] == Decimal("10.00")


def test_second_poll_of_unchanged_data_writes_nothing(world: World) -> None:
    world.his.insert(make_visit(n, changed=_past(9 - n * 0.2)) for n in range(1, 21))
    world.pipeline.cycle()
    before = world.outbox()
    uploads = world.sim.counters["uploads"]

    stats = world.pipeline.cycle()

    assert stats.rows_read > 0  # the lookback re-read them
    assert stats.enqueued == 0 and stats.sent == 0
    assert world.outbox() == before
    assert world.sim.counters["uploads"] == uploads


def test_equal_timestamps_across_batch_boundary_all_arrive(tmp_path: Path, sim: Simulator) -> None:
    w = World(
        tmp_path, sim, f"sqlite:///{tmp_path / 'his.db'}", f"sqlite:///{tmp_path / 'outbox.db'}",
        his={"batch_size": 3},
    )
    try:
        same = _past(5)
        w.his.insert(make_visit(n, changed=same) for n in range(1, 11))
        w.pipeline.cycle()
        # More rows with that same second, committed after the first poll read it.
        w.his.insert(make_visit(n, changed=same) for n in range(11, 14))
        w.his.insert(make_visit(n, changed=_past(4)) for n in range(14, 16))
        w.pipeline.cycle()
        assert set(sim.records) == {f"LSH{n:06d}" for n in range(1, 16)}
    finally:
        w.close()


def test_row_committed_late_inside_lookback_arrives(world: World) -> None:
    world.his.insert(make_visit(n, changed=_past(60 - n)) for n in range(1, 6))
    world.pipeline.cycle()
    # A transaction that settled 3 minutes ago but committed only now: behind the cursor.
    world.his.insert([make_visit(99, changed=_past(3))])

    world.pipeline.cycle()

    assert "LSH000099" in world.sim.records


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"total": Decimal("-1.00")}, "not be negative"),
        ({"total": Decimal("10.00"), "owed": Decimal("20.00")}, "deficientFee"),
        ({"kind": 1, "discharged": None}, "leaveDate"),
        ({"id_type": "99"}, "cardType"),
        ({"serial_no": "L" * 51}, "lsh"),
        ({"diag_name": "病" * 201}, "icdName"),
        ({"total": Decimal("1000000.00")}, "999999.99"),
        ({"id_no": "51010419900101001X"}, "cardNo"),
    ],
)
def test_each_document_rule_parks_the_record_invalid(world: World, over: dict[str, object], fragment: str) -> None:
    bad = make_visit(7, changed=_past(20), **over)
    good = make_visit(8, changed=_past(19))
    world.his.insert([bad, good])

    stats = world.pipeline.cycle()

    rows = world.outbox()
    bad_row = next(r for k, r in rows.items() if k.startswith(str(bad["serial_no"])[:40]))
    assert bad_row["status"] == "invalid"
    assert fragment in str(bad_row["last_error"])
    assert stats.sent == 1 and good["serial_no"] in world.sim.records
    assert bad["serial_no"] not in world.sim.records


def test_invalid_record_is_revalidated_when_its_source_changes(world: World) -> None:
    world.his.insert([make_visit(5, changed=_past(20), total=Decimal("-5.00"))])
    world.pipeline.cycle()
    assert world.outbox()["LSH000005"]["status"] == "invalid"

    world.his.update("LSH000005", total=Decimal("50.00"), changed=_past(1))
    world.pipeline.cycle()

    assert world.outbox()["LSH000005"]["status"] == "sent"
    assert world.sim.records["LSH000005"]["totalFee"] == Decimal("50.00")


def test_not_key_population_is_skipped_by_column(world: World) -> None:
    world.his.insert([make_visit(1, changed=_past(10), is_key="0"), make_visit(2, changed=_past(9))])
    stats = world.pipeline.cycle()
    rows = world.outbox()
    assert rows["LSH000001"]["status"] == "skipped"
    assert "key_crowd" in str(rows["LSH000001"]["last_error"])
    assert stats.skipped == 1 and "LSH000001" not in world.sim.records


def test_lookup_mode_decides_by_labels_once_per_card(tmp_path: Path, sim: Simulator) -> None:
    w = World(
        tmp_path, sim, f"sqlite:///{tmp_path / 'his.db'}", f"sqlite:///{tmp_path / 'outbox.db'}",
        key_crowd={"source": "lookup"},
    )
    try:
        visits = [make_visit(n, changed=_past(50 - n), id_no=TEST_IDS[0], is_key=None) for n in range(1, 6)]
        visits += [make_visit(n, changed=_past(50 - n), is_key=None) for n in range(6, 9)]  # no labels
        w.his.insert(visits)

        stats = w.pipeline.cycle()

        assert sim.counters["lookups"] == 4  # one per distinct card, not per visit
        assert stats.sent == 5 and stats.skipped == 3
        rows = w.outbox()
        assert all(rows[f"LSH{n:06d}"]["status"] == "sent" for n in range(1, 6))
        assert "not in the key population" in str(rows["LSH000006"]["last_error"])
        # The next cycle's new visit of a known card is served from the cache.
        w.his.insert([make_visit(20, changed=_past(1), id_no=TEST_IDS[0], is_key=None)])
        w.pipeline.cycle()
        assert sim.counters["lookups"] == 4
        assert "LSH000020" in sim.records
    finally:
        w.close()


def test_failed_lookup_leaves_the_visit_to_retry_not_skipped(tmp_path: Path, sim: Simulator) -> None:
    w = World(
        tmp_path, sim, f"sqlite:///{tmp_path / 'his.db'}", f"sqlite:///{tmp_path / 'outbox.db'}",
        key_crowd={"source": "lookup"},
    )
    try:
        w.his.insert([make_visit(1, changed=_past(10), id_no=TEST_IDS[1], is_key=None)])
        sim.faults.labels_fail = {TEST_IDS[1]: "middle"}  # 中间请求异常 for this person's labels
        stats = w.pipeline.cycle()
        row = w.outbox()["LSH000001"]
        assert row["status"] == "failed" and stats.skipped == 0 and row["attempts"] == 1
        assert "label lookup failed" in str(row["last_error"])
        assert "LSH000001" not in sim.records
    finally:
        w.close()


def test_configuration_error_pauses_without_burning_attempts_then_resumes(world: World) -> None:
    world.his.insert(make_visit(n, changed=_past(30 - n)) for n in range(1, 6))
    world.login_now()
    world.sim.faults.app_key_revoked = True

    stats = world.pipeline.cycle()

    assert stats.paused and stats.sent == 0
    assert world.store.state.get_config_error() is not None
    assert all(r["attempts"] == 0 and r["status"] == "pending" for r in world.outbox().values())

    world.sim.faults.app_key_revoked = False
    stats = world.pipeline.cycle()
    assert stats.sent == 5
    assert world.store.state.get_config_error() is None


def test_a_gateway_timeout_costs_the_record_nothing(world: World) -> None:
    world.his.insert([make_visit(1, changed=_past(10))])
    world.login_now()
    world.sim.faults.next_504 = 1
    stats = world.pipeline.cycle()
    row = world.outbox()["LSH000001"]
    # Tried again at once: the 504 was the network's, not the record's.
    assert (row["status"], row["attempts"], stats.sent) == ("sent", 0, 1)


def test_an_unconfirmed_upload_is_retried_with_backoff(world: World) -> None:
    world.his.insert([make_visit(1, changed=_past(10))])
    world.login_now()
    world.sim.faults.next_fake = 1  # {"code":200,"data":"保存失败"}: code 200, but not stored
    world.pipeline.cycle()
    row = world.outbox()["LSH000001"]
    assert row["status"] == "failed" and row["attempts"] == 1
    assert "保存失败" in str(row["last_error"])
    # The outbox keeps naive UTC; SQLite hands it back as text.
    assert datetime.fromisoformat(str(row["next_attempt_at"])) > datetime.now(UTC).replace(tzinfo=None)


def test_requeued_invalid_record_is_validated_again_not_sent_raw(world: World) -> None:
    world.his.insert([make_visit(5, changed=_past(20), total=Decimal("-5.00"))])
    world.pipeline.cycle()
    uploads = world.sim.counters["uploads"]

    assert world.store.queue.requeue(now=datetime.now(UTC).replace(tzinfo=None), lshs=["LSH000005"]) == 1
    stats = world.pipeline.cycle()

    row = world.outbox()["LSH000005"]
    assert row["status"] == "invalid" and "negative" in str(row["last_error"])
    assert stats.invalid == 1
    assert world.sim.counters["uploads"] == uploads  # the raw HIS row never went upstream
