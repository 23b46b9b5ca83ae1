"""HIS -> outbox: read a window of the HIS and enqueue what each row becomes.

A poll reads from the cursor (minus ``his.lookback_s``) up to the HIS clock minus
``his.settle_delay_s``; the reconcile reads a window of days. Rows go through
``intake`` and into the outbox batch by batch, the cursor moving in the same
transaction as the rows it covers. A cursor found ahead of the HIS clock is rewound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from sync import building
from sync.clock import ClockWatch, HisClock, cursor_ahead, human_offset
from sync.crashpoints import crash_point
from sync.his import HisSource, polling_window
from sync.outbox.model import Incoming
from sync.outbox.store import Store
from sync.settings import Settings
from sync.stats import CycleStats, Progress

log = structlog.get_logger(__name__)


class Poller:
    """Reads the HIS into the outbox; one per pipeline."""

    def __init__(
        self, settings: Settings, *, store: Store, his: HisSource, clock: Callable[[], datetime], progress: Progress,
        stop: threading.Event,
    ) -> None:
        self._settings = settings
        self._store = store
        self._his = his
        self._clock = clock
        self._progress = progress
        self._stop = stop
        self.clock_watch = ClockWatch(
            host_zone=settings.schedule.timezone, probe=lambda c: self._his.probe(c),
            keep=lambda reading: self._store.state.put_his_clock(reading, now=self._clock()), monotonic=time.monotonic,
        )

    def poll(self, stats: CycleStats) -> None:
        """Read what settled since the cursor (minus the lookback), up to the HIS clock minus the settle delay."""
        cursor = self._store.queue.get_cursor()
        clock = self._his.clock()
        db_now = clock.now
        if cursor is not None and cursor_ahead(cursor[0], clock):
            cursor = self._rewind(cursor, clock)
        self.clock_watch.observe(clock, cursor[0] if cursor else None)
        start = self._settings.his.start_from
        if start is not None:
            start_from = datetime(start.year, start.month, start.day)
        else:
            d = db_now.date() - timedelta(days=31)
            start_from = datetime(d.year, d.month, d.day)
        window = polling_window(
            cursor[0] if cursor else None,
            db_now=db_now,
            start_from=start_from,
            lookback_s=self._settings.his.lookback_s,
            settle_delay_s=self._settings.his.settle_delay_s,
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
        newest = self._store.queue.newest_source_changed_at(not_after=clock.now)
        to = (newest, "") if newest is not None else None
        ahead = (cursor[0] - clock.now).total_seconds()
        log.warning(
            "his_cursor_ahead", cursor=cursor[0].isoformat(), his_clock=clock.now.isoformat(), zone=clock.zone,
            ahead=human_offset(ahead), rewound_to=newest.isoformat() if newest else "his.start_from",
            fix="nothing to do: the poll reads again from there; if the HIS clock jumped, check its NTP",
        )
        if to is not None:
            self._store.queue.rewind_cursor(to, now=self._clock())
        else:
            self._store.queue.clear_cursor()
        self.clock_watch.rewound = {
            "at": self._clock().isoformat(timespec="seconds"), "cursor_was": cursor[0].isoformat(timespec="seconds"),
            "ahead_s": round(ahead), "rewound_to": newest.isoformat(timespec="seconds") if newest else None,
        }
        return to

    def read_window(self, since: datetime, until: datetime, stats: CycleStats, *, move_cursor: bool) -> None:
        """Stream the window into the outbox batch by batch; with ``move_cursor`` the cursor
        moves in the same transaction as the rows it covers, and to ``until`` at the end.

        Rows are read here, built by ``sync.building`` (in a worker process once the window
        proves large) and written by a writer thread, in order: the three overlap."""
        size = self._settings.his.batch_size
        today = datetime.now(self._settings.schedule.tz).date()
        codes = tuple(m.code for m in self._settings.members)
        builder = building.Builder(key_crowd=self._settings.key_crowd, today=today, institutions=codes)
        writer = _BatchWriter(lambda b, c: self._enqueue(b, stats, c))
        building_now: deque[Any] = deque()  # batches being built, oldest first
        last: tuple[datetime, str] | None = None

        def hand_over(keep: int) -> None:
            """Pass built batches to the writer, oldest first, until ``keep`` remain in building."""
            nonlocal last
            while len(building_now) > keep:
                items: list[Incoming] = building_now.popleft().result()
                for item in reversed(items):
                    if item.source_changed_at is not None:
                        last = (item.source_changed_at, item.lsh)
                        break
                self._progress.read_up_to(last[0] if last else None)
                writer.submit(items, last if move_cursor else None)

        self._progress.reading(since, until)
        rows: list[dict[str, Any]] = []
        try:
            for row in self._his.rows(since, until):
                stats.rows_read += 1
                rows.append(row)
                if len(rows) >= size:
                    building_now.append(builder.submit(rows))
                    rows = []
                    hand_over(builder.in_flight)
                    if self._stop.is_set():
                        # The cursor covers what was recorded; the rest is read again next time.
                        hand_over(0)
                        writer.wait()
                        return
            hand_over(0)
            writer.submit(builder.here(rows), (until, "") if move_cursor else None)
            writer.wait()
        finally:
            builder.close()
            writer.close()

    def _enqueue(self, batch: list[Incoming], stats: CycleStats, cursor: tuple[datetime, str] | None) -> None:
        crash_point("before_cursor_move")
        result = self._store.queue.enqueue(batch, now=self._clock(), cursor=cursor)
        stats.enqueued += result.inserted + result.changed
        stats.unchanged += result.unchanged
        stats.invalid += result.invalid
        stats.skipped += result.skipped
        self._progress.tick()


class _BatchWriter:
    """Writes batches to the outbox in order, in a thread of its own.

    While one write runs (mostly inside the database driver, outside the GIL) the next
    batches are read and built. Batches that arrive during a write are written together
    by the next one, in one transaction with the cursor of the last of them (fewer,
    larger commits when the outbox is the slower side); at most ``most`` batches wait. A
    batch and the cursor covering it are committed only after every earlier batch,
    exactly as when writing inline.
    """

    def __init__(self, write: Callable[[list[Incoming], tuple[datetime, str] | None], None], *, most: int = 2) -> None:
        self._write = write
        self._most = most
        self._waiting: list[tuple[list[Incoming], tuple[datetime, str] | None]] = []
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="enqueue", daemon=True)
        self._thread.start()

    def submit(self, batch: list[Incoming], cursor: tuple[datetime, str] | None) -> None:
        """Queue a batch (raising the error of an earlier write); waits while ``most`` batches wait."""
        with self._changed:
            while len(self._waiting) >= self._most and self._error is None:
                self._changed.wait()
            self._raise()
            self._waiting.append((batch, cursor))
            self._changed.notify_all()

    def wait(self) -> None:
        """Until every batch submitted is written (raising a write's error)."""
        with self._changed:
            while (self._waiting or self._busy) and self._error is None:
                self._changed.wait()
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._waiting.clear()
            raise error

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if not self._waiting:
                    return
                taken, self._waiting = self._waiting, []
                self._busy = True
                self._changed.notify_all()
            try:
                items = taken[0][0] if len(taken) == 1 else [item for batch, _ in taken for item in batch]
                self._write(items, taken[-1][1])
            except BaseException as exc:  # noqa: BLE001 - raised in the reading thread
                with self._changed:
                    self._error = exc
                    self._waiting.clear()  # written after a failed batch, they would move the cursor past it
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def close(self) -> None:
        """Write what was handed over (the reader may be leaving on an error of the HIS: what
        it read is kept), then stop the thread; a write's error is logged, not raised (the
        caller is already leaving with one of its own, or waited)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()
        if self._error is not None:
            log.warning("outbox_batch_failed", error=repr(self._error))
