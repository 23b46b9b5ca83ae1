"""The outbox store: the only code that reads or writes the local database.

``Store`` opens the outbox (schema checked or created) and hands out its parts, one
job each:

- ``queue`` (outbox/queue.py): visits from the HIS into ``sync_outbox``, with the poll
  cursor; rows made due again (``retry``, the reconcile);
- ``leases`` (outbox/leases.py): due rows leased to a sender, and their outcomes;
- ``state`` (outbox/state.py): small shared facts in ``sync_state``;
- ``labels`` (outbox/cache.py): the label cache;
- ``token_store()`` (outbox/tokens.py): the shared login token;
- ``instance_lock()`` (outbox/lock.py): one crowd-sync per outbox.

What people read (``status``, the month's report) and the run log are queried here.
Every timestamp handed in is UTC; aware values are converted and stored naive
(see ``sync.outbox.schema``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa

from sync.outbox import history, migrate
from sync.outbox.cache import LabelCache, card_hash
from sync.outbox.engine import make_engine, utc
from sync.outbox.leases import Leases
from sync.outbox.lock import InstanceLock, holder_alive
from sync.outbox.model import DEFAULT_INSTITUTION, DUE, Status, Summary
from sync.outbox.queue import Queue
from sync.outbox.schema import sync_outbox, sync_run
from sync.outbox.state import CONFIG_ERROR, INSTANCE, KEY_FORM, PLATFORM_DOWN, SCHEDULE, State, named
from sync.outbox.tokens import DbTokenStore
from sync.upstream.keyform import KeyFormMemory
from sync.upstream.tokens import TokenStore

__all__ = ["Store", "month_queries"]

# Rows fetched per round trip while streaming a month's sent payloads.
_BATCH = 1000


class Store:
    """The outbox database."""

    def __init__(self, url: str, *, lease_s: int = 300, create: bool = True) -> None:
        """``create=False`` (commands that only read): never create or migrate the outbox."""
        self.engine: sa.Engine = make_engine(url, create=create)
        self.create = create
        self.url_for_humans: str = self.engine.url.render_as_string(hide_password=True)
        self.queue = Queue(self.engine)
        self.leases = Leases(self.engine, lease_s=lease_s)
        self.state = State(self.engine)
        self.labels = LabelCache(self.engine)
        self._token_stores: dict[str, DbTokenStore] = {}

    @property
    def lease_s(self) -> int:
        return self.leases.lease_s

    # -- schema --------------------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Refuse to run against a schema other than head (a fresh SQLite file is created,
        unless this store only reads)."""
        migrate.ensure_schema(self.engine, create=self.create, shown=self.url_for_humans)

    def migrate(self, *, institution: str | None = None) -> tuple[str | None, str]:
        """Upgrade to head; returns the revisions before and after. ``institution``: the code
        of the rows already there (the institution this outbox served so far)."""
        return migrate.upgrade(self.engine, shown=self.url_for_humans, institution=institution)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- shared with the platform client ----------------------------------------------------
    def token_store(self, institution: str = DEFAULT_INSTITUTION) -> TokenStore:
        """``institution``'s login token, shared through ``sync_token`` by every thread and process."""
        if institution not in self._token_stores:
            self._token_stores[institution] = DbTokenStore(self.engine, institution=institution)
        return self._token_stores[institution]

    def key_form_memory(self, institution: str = DEFAULT_INSTITUTION) -> KeyFormMemory:
        """For ``Client(key_forms=...)``: the reading of ``institution``'s app key the platform accepted."""
        return self.state.key_form_memory(institution)

    # -- single instance ----------------------------------------------------------------------
    def instance_lock(self, *, command: str) -> InstanceLock:
        """Context manager: one crowd-sync per outbox; raises ``AlreadyRunning`` naming the holder."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}

        def read_holder() -> dict[str, Any] | None:
            return self.state.get(INSTANCE)

        def on_acquired() -> None:
            started = datetime.now(UTC).replace(tzinfo=None)
            self.state.put(INSTANCE, {**me, "started_at": started.isoformat(timespec="seconds") + "Z"}, now=started)

        def on_released() -> None:
            holder = read_holder()
            if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                self.state.delete(INSTANCE)

        return InstanceLock(
            self.engine, command=command, read_holder=read_holder, on_acquired=on_acquired, on_released=on_released
        )

    # -- runs ----------------------------------------------------------------------------------
    def start_run(self, kind: str, *, now: datetime) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.insert(sync_run).values(kind=kind, started_at=utc(now), host=socket.gethostname()[:255], pid=os.getpid())
            )
            pk = result.inserted_primary_key
        assert pk is not None
        return int(pk[0])

    def finish_run(
        self, run_id: int, *, now: datetime, rows_read: int = 0, enqueued: int = 0, sent: int = 0, failed: int = 0,
        invalid: int = 0, skipped: int = 0, dead: int = 0, error: str | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(sync_run)
                .where(sync_run.c.id == run_id)
                .values(
                    finished_at=utc(now), rows_read=rows_read, enqueued=enqueued, sent=sent, failed=failed,
                    invalid=invalid, skipped=skipped, dead=dead, error=error,
                )
            )

    # -- what people read ------------------------------------------------------------------------
    def summary(self, *, now: datetime, institutions: Sequence[str] = (DEFAULT_INSTITUTION,)) -> Summary:
        """What ``crowd-sync status``, /metrics and the exit codes are made of; ``institutions``:
        the codes of the settings (those the outbox holds rows of are shown too)."""
        now = utc(now)
        o = sync_outbox
        with self.engine.connect() as conn:
            counts = {s.value: 0 for s in Status}
            apart: dict[str, dict[str, Any]] = {code: {"counts": {s.value: 0 for s in Status}} for code in institutions}
            grouped = sa.select(o.c.institution, o.c.status, sa.func.count()).group_by(o.c.institution, o.c.status)
            for institution, status, n in conn.execute(grouped):
                counts[str(status)] += int(n)
                mine = apart.setdefault(str(institution), {"counts": {s.value: 0 for s in Status}})
                mine["counts"][str(status)] = int(n)
            for code, mine in apart.items():
                mine["config_error"] = State.read(conn, named(CONFIG_ERROR, code))
                mine["key_form"] = State.read(conn, named(KEY_FORM, code))
                mine["configured"] = code in institutions
            oldest = conn.execute(
                sa.select(sa.func.min(sa.func.coalesce(o.c.first_failed_at, o.c.updated_at))).where(o.c.status.in_(DUE))
            ).scalar()
            last_sent = conn.execute(sa.select(sa.func.max(o.c.sent_at))).scalar()
            leased = conn.execute(sa.select(sa.func.count()).select_from(o).where(o.c.lease_until > now)).scalar()
            last_run = conn.execute(sa.select(sync_run).order_by(sync_run.c.id.desc()).limit(1)).first()
            last_ok = conn.execute(
                sa.select(sync_run)
                .where(sync_run.c.finished_at.is_not(None), sync_run.c.error.is_(None))
                .order_by(sync_run.c.id.desc())
                .limit(1)
            ).first()
            platform_down = State.read(conn, PLATFORM_DOWN)
        paused = [(code, mine["config_error"]) for code, mine in apart.items() if mine["config_error"]]
        config_error = paused[0][1] if paused else None
        if config_error is not None and len(apart) > 1:
            config_error = {**config_error, "institution": paused[0][0]}
        return Summary(
            counts=counts, oldest_pending_at=oldest, last_sent_at=last_sent, last_run=_row_dict(last_run),
            last_successful_run=_row_dict(last_ok), config_error=config_error, leased=int(leased or 0),
            key_form=apart[institutions[0]]["key_form"] if institutions else None, platform_down=platform_down,
            institutions=apart,
        )

    def month_counts(
        self, first: date, after: date, institution: str | None = None
    ) -> list[tuple[str, str | None, int]]:
        """(status, visit type, visits) of the rows not sent, settled in ``[first, after)``
        (of ``institution``, when given)."""
        counts, _ = month_queries(first, after, institution)
        with self.engine.connect() as conn:
            return [(str(status), visit_type, int(n)) for status, visit_type, n in conn.execute(counts)]

    def month_sent(self, first: date, after: date, institution: str | None = None) -> Iterator[tuple[str, str]]:
        """(lsh, payload) of the sent rows settled in ``[first, after)`` (of ``institution``, when
        given), streamed: a month of a large hospital need not fit in memory."""
        _, sent = month_queries(first, after, institution)
        with self.engine.connect() as conn:
            for row in conn.execution_options(stream_results=True, yield_per=_BATCH).execute(sent):
                yield row.lsh, row.payload

    # -- what people read: failures, one visit's story, the service, the history's retention ------
    # (sync.outbox.history holds the queries; `failures`, `show`, `status` and the daemon use these.)
    def problems(self, statuses: Sequence[str], *, since: datetime | None = None) -> list[dict[str, Any]]:
        """Rows in ``statuses`` changed at or after ``since`` (UTC), oldest change first."""
        with self.engine.connect() as conn:
            return history.problems(conn, statuses, since=None if since is None else utc(since))

    def visit(self, lsh: str, institution: str | None = None) -> dict[str, Any] | None:
        """The whole outbox row of one visit (of ``institution``: lsh is unique only within one;
        None: the first); None when the outbox has none."""
        with self.engine.connect() as conn:
            return history.visit(conn, lsh, institution)

    def attempts(self, lsh: str, institution: str | None = None) -> list[dict[str, Any]]:
        """Each attempt kept for one visit (of ``institution``, when given), oldest first (``sync_attempt``)."""
        with self.engine.connect() as conn:
            return history.attempts(conn, lsh, institution)

    def cached_labels(self, card_no: str) -> dict[str, Any] | None:
        """What the label cache holds for one person (codes, key_crowd, fetched_at)."""
        with self.engine.connect() as conn:
            return history.label_cache(conn, card_hash(card_no))

    def count_due(self, *, now: datetime) -> int:
        """Pending and failed rows due by ``now``: what a dispatch has before it."""
        o = sync_outbox
        with self.engine.connect() as conn:
            n = conn.execute(
                sa.select(sa.func.count()).select_from(o).where(o.c.status.in_(DUE), o.c.next_attempt_at <= utc(now))
            ).scalar()
        return int(n or 0)

    def service(self) -> dict[str, Any]:
        """Whether a crowd-sync holds this outbox's instance lock (asked of the lock itself: None
        when it cannot be told), who recorded itself as holding it, and the service's next jobs."""
        return {
            "holder": self.state.get(INSTANCE), "alive": holder_alive(self.engine), "schedule": self.state.get(SCHEDULE),
        }

    def put_schedule(self, value: dict[str, Any], *, now: datetime) -> None:
        """The running service's next poll and next reconcile, for `status`."""
        self.state.put(SCHEDULE, value, now=now)

    def prune_history(self, *, now: datetime, keep_runs_days: int, keep_attempts_days: int) -> tuple[int, int]:
        """Delete sync_run and sync_attempt rows past their retention; (runs, attempts) deleted."""
        with self.engine.begin() as conn:
            return history.prune(
                conn, now=utc(now), keep_runs_days=keep_runs_days, keep_attempts_days=keep_attempts_days
            )

    def put_timezone(self, zone: str, *, offset_minutes: int, now: datetime) -> bool:
        """Keep sync_timezone (read by the DBA views) equal to schedule.timezone."""
        with self.engine.begin() as conn:
            return history.put_timezone(conn, zone=zone, offset_minutes=offset_minutes, now=utc(now))


def month_queries(
    first: date, after: date, institution: str | None = None
) -> tuple[sa.Select[Any], sa.Select[Any]]:
    """The two reads of a month: counts of rows not sent, and the sent payloads.

    Both filter on settlement_date in SQL with a half-open range (no function
    around the column), so the settlement_date index serves them.
    """
    o = sync_outbox
    in_month = sa.and_(o.c.settlement_date >= first, o.c.settlement_date < after)
    if institution is not None:
        in_month = sa.and_(in_month, o.c.institution == institution)
    counts = (
        sa.select(o.c.status, o.c.visit_type, sa.func.count())
        .where(in_month, o.c.status != Status.SENT.value)
        .group_by(o.c.status, o.c.visit_type)
    )
    # status goes through lower() on purpose: a planner without statistics (SQLite
    # unless ANALYZE ran) prefers the status index for `status = 'sent'` and walks
    # the sent rows of every month; the month range is the selective condition.
    sent = sa.select(o.c.lsh, o.c.payload).where(in_month, sa.func.lower(o.c.status) == Status.SENT.value)
    return counts, sent


def _row_dict(row: sa.Row[Any] | None) -> dict[str, Any] | None:
    return None if row is None else dict(row._mapping)
