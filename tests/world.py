"""One hospital's installation in a test: a HIS, an outbox, a client and a pipeline against
one simulator, driven cycle by cycle; and a clock the test moves by hand."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sync import cli
from sync.app import make_client, make_pipeline
from sync.outbox.schema import sync_outbox
from sync.outbox.store import Store
from sync.settings import Settings
from sync.upstream.signing import ENDPOINTS
from sync.upstream.simulator import Simulator
from tests.support import His, his_now, write_settings

UPLOAD_PATH = ENDPOINTS["upload"].path


def utcnow() -> datetime:
    """Outbox time: naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


def past(minutes: float) -> datetime:
    """A HIS time ``minutes`` ago (China time, as the HIS writes it)."""
    return his_now() - timedelta(minutes=minutes)


class FakeClock:
    """Outbox time the test moves by hand: naive UTC, as the Pipeline's clock returns."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


class World:
    """A HIS, an outbox, a client and a pipeline against one simulator.

    ``sole_sender``: the pipeline runs as `run`/`once` do, holding the instance lock.
    """

    def __init__(
        self, tmp: Path, sim: Simulator, *, clock: Callable[[], datetime] | None = None, lease_s: float = 60,
        sole_sender: bool = False, **overrides: dict[str, object],
    ) -> None:
        self.sim = sim
        self.tmp = tmp
        self.settings_path = tmp / "settings.yaml"
        self.his = His(f"sqlite:///{tmp / 'his.db'}")
        self.settings: Settings = write_settings(
            self.settings_path, his_url=self.his.url, outbox_url=f"sqlite:///{tmp / 'outbox.db'}",
            base_url=sim.url, overrides=overrides,
        )
        self.store = Store(self.settings.outbox.url.get_secret_value(), lease_s=lease_s)
        self.store.ensure_schema()
        self.client = make_client(self.settings, self.store)
        self.pipeline = make_pipeline(
            self.settings, self.store, client=self.client, clock=clock or utcnow, sole_sender=sole_sender
        )

    def rows(self) -> dict[str, dict[str, Any]]:
        with self.store.engine.connect() as conn:
            return {r["lsh"]: dict(r) for r in conn.execute(sa.select(sync_outbox)).mappings()}

    def counts(self) -> dict[str, int]:
        return self.store.summary(now=utcnow()).counts

    def waiting(self) -> int:
        counts = self.counts()
        return counts["pending"] + counts["failed"]

    def login_now(self) -> None:
        """Put a token in the shared store, so the next request is the one under test."""
        self.store.token_store().renew(None, self.client.login)

    def uploads(self) -> list[dict[str, Any]]:
        """Every upload body the platform received, in order."""
        return [json.loads(r.body) for r in list(self.sim.requests_log) if r.path == UPLOAD_PATH]

    def cli(self, *args: str) -> int:
        return cli.main([*args, "--config", str(self.settings_path)])

    def close(self) -> None:
        self.pipeline.close()
        self.store.dispose()
        self.his.dispose()
