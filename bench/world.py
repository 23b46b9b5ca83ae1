"""Wiring for the benchmark: settings, outbox, client and pipeline as the CLI builds them.

The one place in bench/ that constructs crowd-sync's objects: when the project's factory
(settings -> store, client, pipeline) exists, only ``make_world`` changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.seed import HIS_QUERY
from sync import settings as settings_mod
from sync.outbox.store import Store
from sync.pipeline import Pipeline
from sync.settings import Settings
from sync.upstream.client import Client
from sync.upstream.simulator import TEST_APP_KEY, TEST_PASSWORD, TEST_USERNAME


def make_settings(
    *, his_url: str, outbox_url: str, base_url: str, concurrency: int = 16, rate_limit_per_s: float = 1000,
    source: str = "column", batch_size: int = 1000, his_query: str = HIS_QUERY,
) -> Settings:
    raw: dict[str, Any] = {
        "institution": {"name": "基准测试医院", "county_code": "511425"},
        "upstream": {
            "env": "test", "base_url": base_url, "app_key": TEST_APP_KEY, "username": TEST_USERNAME,
            "password": TEST_PASSWORD, "timeout_s": 30, "concurrency": concurrency,
            "rate_limit_per_s": rate_limit_per_s,
        },
        "his": {
            "url": his_url, "query": his_query, "settle_delay_s": 0, "lookback_s": 0,
            "start_from": "2000-01-01", "batch_size": batch_size,
        },
        "key_crowd": {"source": source},
        "outbox": {"url": outbox_url, "lease_s": 600},
        "log": {"format": "json", "level": "warning"},
    }
    return settings_mod.parse(raw, env={}, base_dir=Path.cwd(), source="bench")


@dataclass
class World:
    settings: Settings
    store: Store
    client: Client
    pipeline: Pipeline

    def close(self) -> None:
        self.pipeline.close()
        self.store.dispose()


def make_world(settings: Settings) -> World:
    store = Store(settings.outbox.url.get_secret_value(), lease_s=settings.outbox.lease_s)
    store.migrate()
    client = Client(settings.upstream, store.token_store(), key_forms=store.key_form_memory())
    return World(settings=settings, store=store, client=client, pipeline=Pipeline(settings, store=store, client=client))


@contextmanager
def open_world(his_url: str, outbox_url: str, base_url: str, **settings: Any) -> Iterator[World]:
    """``make_world(make_settings(...))``, closed on leaving."""
    world = make_world(make_settings(his_url=his_url, outbox_url=outbox_url, base_url=base_url, **settings))
    try:
        yield world
    finally:
        world.close()
