"""The data path on the real MariaDB and PostgreSQL: HIS and outbox both on the server."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync.app import make_pipeline
from sync.outbox.store import Store
from sync.pipeline import Pipeline
from sync.upstream.simulator import SimConfig, Simulator
from tests.support import His, expected_payload, make_visit, write_settings


@pytest.fixture(params=["mariadb", "postgres"])
def server_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def setup(tmp_path: Path, server_url: str) -> Iterator[tuple[His, Pipeline, Simulator, Store]]:
    with Simulator(SimConfig()) as sim:
        his = His(server_url)
        settings = write_settings(
            tmp_path / "settings.yaml",
            his_url=server_url,
            outbox_url=server_url,
            base_url=sim.url,
            overrides={"his": {"batch_size": 4}},
        )
        store = Store(settings.outbox.url.get_secret_value(), lease_s=60)
        store.migrate()
        pipeline = make_pipeline(settings, store)
        try:
            yield his, pipeline, sim, store
        finally:
            pipeline.close()
            store.dispose()
            his.dispose()


def test_his_to_platform_exactly_then_resettlement(setup: tuple[His, Pipeline, Simulator, Store]) -> None:
    his, pipeline, sim, store = setup
    now = his.now()
    rng = random.Random(7)
    same = (now - timedelta(minutes=3)).replace(microsecond=0)
    # Ten rows share one timestamp across batch boundaries of 4; the rest spread out.
    visits = [make_visit(n, changed=same, rng=rng) for n in range(1, 11)]
    visits += [make_visit(n, changed=now - timedelta(hours=n), rng=rng) for n in range(11, 31)]
    his.insert(visits)

    pipeline.cycle()

    assert len(sim.records) == 30
    for v in visits:
        assert sim.records[v["serial_no"]] == expected_payload(v)

    # Unchanged second poll: nothing written, nothing sent.
    uploads = sim.counters["uploads"]
    stats = pipeline.cycle()
    assert stats.enqueued == 0 and stats.sent == 0 and sim.counters["uploads"] == uploads

    # Re-settled visit: one update upstream, nothing else re-sent.
    his.update("LSH000012", total=Decimal("1234.50"), changed=his.now().replace(microsecond=0) - timedelta(seconds=2))
    # And a row committed late, behind the cursor but inside the lookback.
    late = make_visit(99, changed=his.now().replace(microsecond=0) - timedelta(minutes=4))
    his.insert([late])
    stats = pipeline.cycle()
    assert stats.sent == 2 and stats.updated == 1 and stats.created == 1
    assert sim.records["LSH000012"]["totalFee"] == Decimal("1234.50")
    assert sim.records["LSH000099"] == expected_payload(late)

    with store.engine.connect() as conn:
        statuses = dict(conn.execute(sa.text("SELECT status, COUNT(*) FROM sync_outbox GROUP BY status")).all())
    assert statuses == {"sent": 31}


def test_invalid_rows_do_not_block_the_rest(setup: tuple[His, Pipeline, Simulator, Store]) -> None:
    his, pipeline, sim, store = setup
    now = his.now().replace(microsecond=0)
    his.insert(
        [
            make_visit(1, changed=now - timedelta(minutes=9), owed=Decimal("99999.00")),
            make_visit(2, changed=now - timedelta(minutes=8), kind=1, discharged=None),
            make_visit(3, changed=now - timedelta(minutes=7)),
        ]
    )
    stats = pipeline.cycle()
    assert stats.sent == 1 and "LSH000003" in sim.records
    with store.engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT lsh, last_error FROM sync_outbox WHERE status = 'invalid'")).all())
    assert set(rows) == {"LSH000001", "LSH000002"}
    assert "deficientFee" in rows["LSH000001"] and "leaveDate" in rows["LSH000002"]


