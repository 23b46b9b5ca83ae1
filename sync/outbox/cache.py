"""The label cache (``sync_label_cache``): what the label API said about a person, briefly.

Keyed by the sha256 of the ID number, and holding only the label codes the
key-population decision needs: never the name, the ID number or the counties the
answer also holds (migration 0004).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from sync.outbox.engine import chunks, utc
from sync.outbox.schema import sync_label_cache
from sync.upstream.person import LABEL_LISTS

# The label lists of the answer, in the order the decision reads them.
_LISTS = tuple(name for name, _ in LABEL_LISTS)


class LabelCache:
    """Recently looked-up labels, shared by every process using the outbox."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def get(self, card_nos: Sequence[str], *, now: datetime, ttl_s: float) -> dict[str, tuple[str | None]]:
        """Fresh cached labels: card_no -> (label data JSON holding the label codes only, or None
        when the platform returned no data)."""
        by_hash = {card_hash(c): c for c in card_nos}
        fresh_from = utc(now) - timedelta(seconds=ttl_s)
        t = sync_label_cache
        found: dict[str, tuple[str | None]] = {}
        with self._engine.connect() as conn:
            for chunk in chunks(list(by_hash)):
                rows = conn.execute(
                    sa.select(t.c.card_hash, t.c.labels).where(t.c.card_hash.in_(chunk), t.c.fetched_at >= fresh_from)
                )
                for r in rows:
                    found[by_hash[r.card_hash]] = (_labels_as_data(r.labels),)
        return found

    def put(self, entries: Mapping[str, str | None], *, now: datetime) -> None:
        """Remember labels (card_no -> the label API's data JSON, or None): only the label codes
        are kept, never the name, the ID number or the counties the answer also holds."""
        if not entries:
            return
        now = utc(now)
        rows: dict[str, dict[str, Any]] = {}
        for card, data in entries.items():
            labels = _label_codes(data)
            rows[card_hash(card)] = {
                "card_hash": card_hash(card), "labels": labels,
                "key_crowd": "1" if labels and any(json.loads(labels).values()) else "0", "fetched_at": now,
            }
        t = sync_label_cache
        for attempt in (1, 2):
            try:
                with self._engine.begin() as conn:
                    # Delete then insert: the same two statements on every dialect.
                    for chunk in chunks(list(rows)):
                        conn.execute(sa.delete(t).where(t.c.card_hash.in_(chunk)))
                    conn.execute(sa.insert(t), list(rows.values()))
                return
            except sa.exc.IntegrityError:
                # Another process cached the same person at the same moment.
                if attempt == 2:
                    raise

    @staticmethod
    def forget(conn: sa.Connection, card_nos: Iterable[str]) -> None:
        """Drop what is cached about these people, inside the caller's transaction (a requeue:
        the label API is asked afresh)."""
        hashes = sorted({card_hash(c) for c in card_nos if c})
        for chunk in chunks(hashes):
            conn.execute(sa.delete(sync_label_cache).where(sync_label_cache.c.card_hash.in_(chunk)))


def _label_codes(data_json: str | None) -> str | None:
    """The label API's ``data`` JSON reduced to its label codes per list (what the label cache
    keeps); None when the platform returned no data."""
    if data_json is None:
        return None
    try:
        data = json.loads(data_json)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return None
    codes: dict[str, list[str]] = {}
    for name in _LISTS:
        items = data.get(name)
        codes[name] = [
            str(item.get("code") or "") for item in (items if isinstance(items, list) else []) if isinstance(item, dict)
        ]
    return json.dumps(codes, separators=(",", ":"))


def _labels_as_data(labels: str | None) -> str | None:
    """A cached ``labels`` value back in the shape of the label API's ``data`` (codes only)."""
    if labels is None:
        return None
    try:
        codes = json.loads(labels)
    except ValueError:
        return None
    if not isinstance(codes, dict):
        return None
    return json.dumps(
        {name: [{"code": c} for c in codes.get(name) or []] for name in _LISTS}, ensure_ascii=False
    )


def card_hash(card_no: str) -> str:
    """The label cache key: sha256 of the ID number, so the cache need not repeat it."""
    return hashlib.sha256(card_no.strip().upper().encode("utf-8")).hexdigest()
