"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sync.outbox.store import Store


@pytest.fixture
def store(any_db_url: str) -> Iterator[Store]:
    """An outbox migrated to head on SQLite, MariaDB and PostgreSQL in turn."""
    s = Store(any_db_url)
    s.migrate()
    yield s
    s.dispose()
