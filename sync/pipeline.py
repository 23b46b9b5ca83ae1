"""One cycle of work: poll the HIS into the outbox, then dispatch what is due.

The orchestration and the error boundary of a run: whatever one record does, the
others go on, and every run is recorded in ``sync_run`` with what it did. Reading the
HIS into the outbox happens here (``intake`` says what each row becomes; the cursor
moves in the same transaction as the rows it covers); sending is ``sync.dispatch``'s.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import date, datetime, timedelta

import structlog

from sync import intake
from sync.clock import ClockWatch, HisClock, cursor_ahead, human_offset, utcnow
from sync.crashpoints import crash_point
from sync.dispatch import Dispatcher
from sync.errors import SyncError
from sync.his import HisSource, polling_window
from sync.outbox.model import Incoming
from sync.outbox.store import Store
from sync.settings import Settings
from sync.stats import CycleStats, Progress
from sync.upstream.client import Client

log = structlog.get_logger(__name__)


class _BatchWriter:
    """Writes batches to the outbox one at a time, in order, in a thread of its own.

    A back-fill is bound by one core: while one batch is written (time spent mostly
    inside the database driver, outside the GIL) the next is read and built. At most
    one batch is in flight, so a batch and the cursor covering it are committed only
    after every earlier batch, exactly as when writing inline.
    """

    def __init__(self, write: Callable[[list[Incoming], tuple[datetime, str] | None], None]) -> None:
        self._write = write
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enqueue")
        self._inflight: Future[None] | None = None

    def submit(self, batch: list[Incoming], cursor: tuple[datetime, str] | None) -> None:
        """Wait for the batch in flight (raising its error), then start writing this one."""
        self.wait()
        self._inflight = self._pool.submit(self._write, batch, cursor)

    def wait(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    def close(self) -> None:
        """Let a batch still in flight finish (its error is not raised: the caller is already
        leaving with one of its own), then stop the thread."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            wait([inflight])
            if inflight.exception() is not None:
                log.warning("outbox_batch_failed", error=repr(inflight.exception()))
        self._pool.shutdown(wait=True)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        client: Client,
        his: HisSource,
        clock: Callable[[], datetime] = utcnow,
        sole_sender: bool = False,
    ) -> None:
        """``sole_sender``: this process holds the instance lock (run, once, reconcile), so any
        lease held by another owner belongs to a process that died and is released at once."""
        self.settings = settings
        self.store = store
        self.client = client
        self.his = his
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.progress = Progress()
        self._stop = threading.Event()
        self.dispatcher = Dispatcher(
            settings, store=store, client=client, owner=self.owner, clock=clock, sole_sender=sole_sender,
            progress=self.progress, stop=self._stop,
        )
        # Raises unless this process may send (the instance lock is still ours): see InstanceLock.ensure.
        self.before_dispatch: Callable[[], None] | None = None
        self.clock_watch = ClockWatch(
            host_zone=settings.schedule.timezone, probe=lambda c: self.his.probe(c),
            keep=lambda reading: self.store.state.put_his_clock(reading, now=self.clock()), monotonic=time.monotonic,
        )

    # -- life cycle -------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking work: in-flight uploads finish, nothing new is claimed."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self, *, wait_s: float = 10.0) -> None:
        self._stop.set()
        # Outcomes first: releasing the leases before would let them be claimed and sent again.
        self.dispatcher.close(wait_s=wait_s)
        self.store.leases.release_owner(self.owner)
        self.client.close()
        self.his.dispose()

    @property
    def next_probe_at(self) -> datetime | None:
        """While the platform is unreachable: when to probe it next (outbox time)."""
        return self.dispatcher.circuit.next_probe_at

    def probe_due(self, now: datetime | None = None) -> bool:
        """Whether a probe of the unreachable platform is due (the daemon runs a dispatch then)."""
        return self.dispatcher.circuit.probe_due(now)

    # -- cycles ------------------------------------------------------------

    def cycle(self, kind: str = "cycle") -> CycleStats:
        """Poll new settlements, then dispatch everything due. Recorded as a run."""
        def work(stats: CycleStats) -> None:
            self.poll(stats)
            self.dispatch(stats)

        return self._run(kind, work)

    def dispatch(self, stats: CycleStats) -> None:
        """Send everything due (``sync.dispatch``), once this process may still send."""
        if self.before_dispatch is not None:
            self.before_dispatch()
        self.dispatcher.dispatch(stats)

    def dispatch_only(self) -> CycleStats:
        """Dispatch what is due without polling the HIS (a probe of an unreachable platform)."""
        return self._run("dispatch", self.dispatch)

    def reconcile(self, since: date, until: date | None = None) -> CycleStats:
        """Re-read a window of the HIS (catches re-settlements, late commits), re-check
        skipped visits against the label API, then dispatch."""

        def work(stats: CycleStats) -> None:
            start = datetime(since.year, since.month, since.day)
            if until is None:
                end = self.his.now() - timedelta(seconds=self.settings.his.settle_delay_s)
            else:
                nxt = until + timedelta(days=1)
                end = datetime(nxt.year, nxt.month, nxt.day)
            if end > start:
                self.read_window(start, end, stats, move_cursor=False)
            if self.settings.key_crowd.source == "lookup":
                n = self.store.queue.recheck_skipped(now=self.clock(), changed_since=start)
                if n:
                    log.info("skipped_rechecked", records=n)
            self.dispatch(stats)

        return self._run("reconcile", work)

    def _run(self, kind: str, work: Callable[[CycleStats], object]) -> CycleStats:
        stats = CycleStats()
        started = time.monotonic()
        run_id = self.store.start_run(kind, now=self.clock())
        error: str | None = None
        try:
            work(stats)
        except SyncError as exc:
            error = str(exc)
            stats.error = error
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            stats.error = error
            raise
        finally:
            stats.duration_s = round(time.monotonic() - started, 3)
            try:
                self.store.finish_run(
                    run_id,
                    now=self.clock(),
                    rows_read=stats.rows_read,
                    enqueued=stats.enqueued,
                    sent=stats.sent,
                    failed=stats.failed,
                    invalid=stats.invalid,
                    skipped=stats.skipped,
                    dead=stats.dead,
                    error=error,
                )
            except Exception:
                log.warning("run_record_failed", run_id=run_id, exc_info=True)
            log.info(
                "cycle_finished",
                kind=kind,
                read=stats.rows_read,
                enqueued=stats.enqueued,
                sent=stats.sent,
                failed=stats.failed,
                invalid=stats.invalid,
                skipped=stats.skipped,
                dead=stats.dead,
                lookups=stats.lookups,
                duration_s=stats.duration_s,
                paused=stats.paused,
                unreachable=stats.unreachable,
                error=error,
            )
        return stats

    # -- HIS -> outbox -----------------------------------------------------

    def poll(self, stats: CycleStats) -> None:
        cursor = self.store.queue.get_cursor()
        clock = self.his.clock()
        db_now = clock.now
        if cursor is not None and cursor_ahead(cursor[0], clock):
            cursor = self._rewind(cursor, clock)
        self.clock_watch.observe(clock, cursor[0] if cursor else None)
        start = self.settings.his.start_from
        if start is not None:
            start_from = datetime(start.year, start.month, start.day)
        else:
            d = db_now.date() - timedelta(days=31)
            start_from = datetime(d.year, d.month, d.day)
        window = polling_window(
            cursor[0] if cursor else None,
            db_now=db_now,
            start_from=start_from,
            lookback_s=self.settings.his.lookback_s,
            settle_delay_s=self.settings.his.settle_delay_s,
        )
        if window is None:
            return
        since, until = window
        log.debug("poll_window", since=since.isoformat(), until=until.isoformat())
        self.read_window(since, until, stats, move_cursor=True)

    def _rewind(self, cursor: tuple[datetime, str], clock: HisClock) -> tuple[datetime, str] | None:
        """The cursor is ahead of the HIS clock (it jumped forward and back, or his.timezone
        changed): every poll would read nothing. Go back to the newest visit read that is not
        in the HIS's future; the lookback re-reads what settled around it, and re-reading is
        harmless (enqueue skips unchanged rows). None (no visit read yet): back-fill again."""
        newest = self.store.queue.newest_source_changed_at(not_after=clock.now)
        to = (newest, "") if newest is not None else None
        ahead = (cursor[0] - clock.now).total_seconds()
        log.warning(
            "his_cursor_ahead", cursor=cursor[0].isoformat(), his_clock=clock.now.isoformat(), zone=clock.zone,
            ahead=human_offset(ahead), rewound_to=newest.isoformat() if newest else "his.start_from",
            fix="nothing to do: the poll reads again from there; if the HIS clock jumped, check its NTP",
        )
        if to is not None:
            self.store.queue.rewind_cursor(to, now=self.clock())
        else:
            self.store.queue.clear_cursor()
        self.clock_watch.rewound = {
            "at": self.clock().isoformat(timespec="seconds"), "cursor_was": cursor[0].isoformat(timespec="seconds"),
            "ahead_s": round(ahead), "rewound_to": newest.isoformat(timespec="seconds") if newest else None,
        }
        return to

    def read_window(self, since: datetime, until: datetime, stats: CycleStats, *, move_cursor: bool) -> None:
        """Stream the window into the outbox batch by batch; with ``move_cursor`` the cursor
        moves in the same transaction as the rows it covers, and to ``until`` at the end."""
        batch: list[Incoming] = []
        last: tuple[datetime, str] | None = None
        size = self.settings.his.batch_size
        today = datetime.now(self.settings.schedule.tz).date()
        writer = _BatchWriter(lambda b, c: self._enqueue(b, stats, c))
        try:
            for row in self.his.rows(since, until):
                stats.rows_read += 1
                item = intake.incoming(row, key_crowd=self.settings.key_crowd, today=today)
                batch.append(item)
                changed_at = row.get("changed_at")
                if isinstance(changed_at, datetime):
                    last = (changed_at, item.lsh)
                if len(batch) >= size:
                    writer.submit(batch, last if move_cursor else None)
                    batch = []
                    if self._stop.is_set():
                        # The cursor covers what was recorded; the rest is read again next time.
                        writer.wait()
                        return
            writer.submit(batch, (until, "") if move_cursor else None)
            writer.wait()
        finally:
            writer.close()

    def _enqueue(self, batch: list[Incoming], stats: CycleStats, cursor: tuple[datetime, str] | None) -> None:
        crash_point("before_cursor_move")
        result = self.store.queue.enqueue(batch, now=self.clock(), cursor=cursor)
        stats.enqueued += result.inserted + result.changed
        stats.unchanged += result.unchanged
        stats.invalid += result.invalid
        stats.skipped += result.skipped
        self.progress.tick()
