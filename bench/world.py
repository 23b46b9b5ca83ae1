"""Wiring for the benchmark: settings, then outbox, client and pipeline as ``sync.app`` builds them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.seed import HIS_QUERY
from sync import settings as settings_mod
from sync.app import make_client, make_pipeline, open_store
from sync.outbox.store import Store
from sync.pipeline import Pipeline
from sync.settings import Settings
from sync.upstream.client import Client
from sync.upstream.simulator import TEST_APP_KEY, TEST_PASSWORD, TEST_USERNAME


def make_settings(
    *, his_url: str, outbox_url: str, base_url: str, concurrency: int = 16, rate_limit_per_s: float = 5000,
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
    store = open_store(settings)
    store.migrate()
    client = make_client(settings, store)
    return World(settings=settings, store=store, client=client, pipeline=make_pipeline(settings, store, client=client))


@contextmanager
def open_world(his_url: str, outbox_url: str, base_url: str, **settings: Any) -> Iterator[World]:
    """``make_world(make_settings(...))``, closed on leaving."""
    world = make_world(make_settings(his_url=his_url, outbox_url=outbox_url, base_url=base_url, **settings))
    try:
        yield world
    finally:
        world.close()
