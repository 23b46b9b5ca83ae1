"""An outbox of one institution becomes an alliance's (revision 0007) in place, on every
dialect the service runs on: nothing is sent again, and its rows, its paused state and its
token are the institution's it served."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import migrations
from sync.app import make_pipeline
from sync.outbox.migrate import current_revision
from sync.outbox.store import Store
from sync.upstream.simulator import SimConfig, Simulator
from tests.support import His, his_now, make_visit, write_settings

CODE = "510115"


def _downgrade(store: Store, to: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, to)


@pytest.mark.parametrize("db", ["sqlite", "mariadb", "postgres"])
def test_a_single_institution_outbox_migrates_in_place_and_sends_nothing_again(
    db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url: str = request.getfixturevalue(f"{db}_url")
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    changed = (his_now() - timedelta(minutes=5)).replace(microsecond=0)
    his.insert([make_visit(n, changed=changed - timedelta(seconds=n)) for n in range(1, 6)])
    with Simulator(SimConfig()) as sim:
        # What an installation of the previous version holds: five visits sent, a pause on record.
        old = write_settings(tmp_path / "old.yaml", his_url=his.url, outbox_url=url, base_url=sim.url)
        store = Store(url)
        store.migrate()
        pipeline = make_pipeline(old, store)
        assert pipeline.cycle().sent == 5
        pipeline.close()
        _downgrade(store, "0006")
        with store.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO sync_state (name, value) VALUES ('config_error', '{\"message\": \"m\", \"hint\": \"h\"}')"
            ))
        assert "institution" not in {c["name"] for c in sa.inspect(store.engine).get_columns("sync_outbox")}

        # The operator names the institution (institution.code) and migrates.
        new = write_settings(tmp_path / "new.yaml", his_url=his.url, outbox_url=url, base_url=sim.url,
                             overrides={"institution": {"code": CODE}, "his": {"start_from": str(changed.date())}})
        store.migrate(institution=new.members[0].code)
        assert current_revision(store.engine) == "0008"
        with store.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT institution, status FROM sync_outbox")).all()
        assert sorted(rows) == [(CODE, "sent")] * 5
        assert store.state.get_config_error(CODE) == {"message": "m", "hint": "h"}
        store.state.clear_config_error(CODE)

        uploads = sim.counters["uploads"]
        store.queue.clear_cursor()  # read every visit again: each is found unchanged
        pipeline = make_pipeline(new, store)
        stats = pipeline.cycle()
        pipeline.close()
        assert (stats.rows_read, stats.enqueued, stats.sent) == (5, 0, 0)
        assert sim.counters["uploads"] == uploads
        # A visit settled after the migration goes up as before.
        his.insert([make_visit(9, changed=changed)])
        pipeline = make_pipeline(new, store)
        assert pipeline.cycle().sent == 1
        pipeline.close()
    store.dispose()
    his.dispose()
