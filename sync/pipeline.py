"""One cycle of work: poll the HIS into the outbox, then dispatch what is due.

This is the error boundary of a cycle: whatever one record does, the others go
on; a configuration error from the platform pauses sending (without burning any
record's attempts) until the platform accepts again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog

from sync import records
from sync.clock import ClockWatch, HisClock, cursor_ahead, human_offset
from sync.crashpoints import crash_point
from sync.errors import AuthError, ConfigError, InvalidRecord, SyncError, TransientError
from sync.his import HisSource, polling_window
from sync.outbox.store import Claimed, Incoming, Outcome, Status, Store
from sync.policy import MAX_UPLOAD_CRASHES, RetryPolicy
from sync.settings import Settings
from sync.upstream.client import Client, LookupResult, parse_person

log = structlog.get_logger(__name__)

# The outbox keys rows by lsh in a column of 255 characters; the platform allows 50.
_MAX_KEY = 255
RESIDENT_ID = "10"


def utcnow() -> datetime:
    """Outbox time: naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(kw_only=True)
class CycleStats:
    rows_read: int = 0
    enqueued: int = 0
    unchanged: int = 0
    sent: int = 0
    created: int = 0
    updated: int = 0
    failed: int = 0
    invalid: int = 0
    skipped: int = 0
    dead: int = 0
    lookups: int = 0
    cache_hits: int = 0
    duration_s: float = 0.0
    paused: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(kw_only=True)
class _Decision:
    key_crowd: str | None  # "1"/"0"; None: could not be decided now
    how: str
    error: SyncError | None = None


@dataclass
class _Progress:
    """Last time the pipeline made progress; the systemd watchdog is fed from it."""

    at: float = field(default_factory=time.monotonic)

    def tick(self) -> None:
        self.at = time.monotonic()


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


class _Recorder:
    """Writes upload outcomes to the outbox from one thread, many per transaction.

    An upload thread hands its outcome over and takes the next record at once instead of
    holding its slot through a transaction of its own (8 to 14 ms a record). Each outcome
    is still written only if the row is still ours and unchanged (``Store.record``).
    ``flush`` returns once everything handed over so far is written: dispatch flushes
    before it returns, so an orderly stop never leaves an outcome in memory when leases
    are released. A crash loses only outcomes not yet written; those rows stay leased
    until the lease runs out and are sent again, which the upsert by lsh makes harmless.
    """

    def __init__(self, store: Store, *, group: int = 256) -> None:
        self._store = store
        self._group = group
        self._cond = threading.Condition()
        self._queue: list[Outcome] = []
        self._handed = 0
        self._finished = 0  # handed over and written (or given up on, logged)
        self._thread: threading.Thread | None = None
        self._closed = False

    def put(self, outcome: Outcome) -> None:
        with self._cond:
            self._queue.append(outcome)
            self._handed += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="outbox-recorder", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            target = self._handed
            while self._finished < target and self._thread is not None and self._thread.is_alive():
                self._cond.wait(1.0)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                group, self._queue = self._queue[: self._group], self._queue[self._group :]
            self._write(group)
            with self._cond:
                self._finished += len(group)
                self._cond.notify_all()

    def _write(self, group: list[Outcome]) -> None:
        try:
            self._store.record(group)
            return
        except Exception as exc:  # noqa: BLE001 - the recorder thread must outlive any database error
            if len(group) == 1:
                self._lost(group[0], exc)
                return
            log.warning("outcomes_group_failed", records=len(group), error=f"{type(exc).__name__}: {exc}")
        # One by one, so that one record the database refuses does not cost the others.
        for item in group:
            try:
                self._store.record([item])
            except Exception as exc:  # noqa: BLE001 - logged, and the lease released for a later resend
                self._lost(item, exc)

    def _lost(self, item: Outcome, exc: Exception) -> None:
        log.error("outcome_not_recorded", lsh=item.claimed.lsh, error=f"{type(exc).__name__}: {exc}")
        try:
            self._store.release([item.claimed], now=utcnow())
        except Exception:
            # The lease runs out by itself; the record is then sent again.
            log.warning("release_failed", lsh=item.claimed.lsh, exc_info=True)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        client: Client,
        his: HisSource | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self._his = his
        self.clock = clock
        self.policy = RetryPolicy(
            first_delay_s=settings.retry.first_delay_s,
            max_delay_s=settings.retry.max_delay_s,
            give_up_after_h=settings.retry.give_up_after_h,
            max_generic_attempts=settings.retry.max_generic_attempts,
        )
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.progress = _Progress()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.upstream.concurrency, thread_name_prefix="upload"
        )
        self._lock = threading.Lock()
        self._recorder = _Recorder(store)
        # Raises unless this process may send (the instance lock is still ours): see InstanceLock.ensure.
        self.before_dispatch: Callable[[], None] | None = None
        self.clock_watch = ClockWatch(
            host_zone=settings.schedule.timezone, probe=lambda c: self.his.probe(c),
            keep=lambda reading: self.store.put_his_clock(reading, now=self.clock()), monotonic=time.monotonic,
        )

    # -- life cycle -------------------------------------------------------

    @property
    def his(self) -> HisSource:
        if self._his is None:
            self._his = HisSource(
                self.settings.his, need_key_crowd=self.settings.key_crowd.source == "column",
                zone=self.settings.his_timezone,
            )
        return self._his

    def request_stop(self) -> None:
        """Stop taking work: in-flight uploads finish, nothing new is claimed."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self, *, wait_s: float = 10.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + wait_s
        self._pool.shutdown(wait=False, cancel_futures=True)
        for t in list(getattr(self._pool, "_threads", ())):
            t.join(max(0.0, deadline - time.monotonic()))
        # Outcomes first: releasing the leases before would let them be claimed and sent again.
        self._recorder.close()
        self.store.release_owner(self.owner)
        self.client.close()
        if self._his is not None:
            self._his.dispose()

    # -- cycles ------------------------------------------------------------

    def cycle(self, kind: str = "cycle") -> CycleStats:
        """Poll new settlements, then dispatch everything due. Recorded as a run."""
        def work(stats: CycleStats) -> None:
            self.poll(stats)
            self.dispatch(stats)

        return self._run(kind, work)

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
                n = self.store.recheck_skipped(now=self.clock(), changed_since=start)
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
                error=error,
            )
        return stats

    # -- HIS -> outbox -----------------------------------------------------

    def poll(self, stats: CycleStats) -> None:
        cursor = self.store.get_cursor()
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
        newest = self.store.newest_source_changed_at(not_after=clock.now)
        to = (newest, "") if newest is not None else None
        ahead = (cursor[0] - clock.now).total_seconds()
        log.warning(
            "his_cursor_ahead", cursor=cursor[0].isoformat(), his_clock=clock.now.isoformat(), zone=clock.zone,
            ahead=human_offset(ahead), rewound_to=newest.isoformat() if newest else "his.start_from",
            fix="nothing to do: the poll reads again from there; if the HIS clock jumped, check its NTP",
        )
        if to is not None:
            self.store.rewind_cursor(to, now=self.clock())
        else:
            self.store.clear_cursor()
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
                item = self.incoming(row, today=today)
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
        result = self.store.enqueue(batch, now=self.clock(), cursor=cursor)
        stats.enqueued += result.inserted + result.changed
        stats.unchanged += result.unchanged
        stats.invalid += result.invalid
        stats.skipped += result.skipped
        self.progress.tick()

    def incoming(self, raw: dict[str, Any], *, today: date) -> Incoming:
        """One HIS row -> what the outbox should hold for it (pending, skipped or invalid)."""
        row = records.normalize_row(raw)
        lsh_raw = row.get("lsh")
        lsh = "" if lsh_raw is None else str(lsh_raw).strip()
        # The raw row's JSON is needed only to park an invalid row or name one without lsh:
        # not built for the valid majority of a back-fill.
        raw_json = records.raw_json(row) if not lsh else ""
        key = _outbox_key(lsh, raw_json)
        changed_at = row.get("changed_at")
        if not isinstance(changed_at, datetime):
            changed_at = None
        kc_setting = self.settings.key_crowd
        # With `key_crowd.source: column` (a back-fill's usual case) build() reads and checks
        # the column and the card itself; the raw card and column values below are needed
        # only to decide before a label lookup, or to describe a row build() refused.
        lookup = kc_setting.source != "column"
        card_type = _text(row.get("card_type")) if lookup else None

        decided: str | None
        reason: str | None = None
        if not lookup:
            decided = None  # build() reads and checks the column itself
        elif card_type == RESIDENT_ID:
            decided = "1"  # placeholder until the label lookup at dispatch decides
        elif (kc_column := _key_crowd_column(row)) is not None:
            decided = kc_column
            reason = f"card type {card_type}: no label lookup possible, key_crowd column = {kc_column}"
        else:
            decided = "0"
            reason = (
                f"card type {card_type or '(empty)'} is not a resident ID card (10): the label API cannot "
                "be asked; return a key_crowd column from his.query to decide these visits"
            )
        try:
            payload = records.build(row, key_crowd=decided, today=today)
        except InvalidRecord as exc:
            raw_json = raw_json or records.raw_json(row)
            card_type = _text(row.get("card_type"))
            card_no = _text(row.get("card_no"))
            if card_no and card_type == RESIDENT_ID:
                card_no = card_no.upper()
            return Incoming(
                lsh=key,
                payload_json=raw_json,
                payload_hash=_sha(raw_json),
                status=Status.INVALID,
                key_crowd=_key_crowd_column(row),
                reason=str(exc),
                source_changed_at=changed_at,
                card_type=card_type,
                card_no=card_no,
                visit_type=_text(row.get("visit_type")),
                settlement_date=_as_date(row.get("settlement_date")),
            )
        text = records.payload_json(payload)
        status = Status.PENDING
        key_crowd: str | None = payload["keyCrowd"]
        if lookup and card_type == RESIDENT_ID:
            key_crowd = None
        elif key_crowd == "0" and kc_setting.upload_only_key_crowd:
            status = Status.SKIPPED
            reason = reason or "key_crowd column = 0: the HIS says this patient is not in the key population"
        return Incoming(
            lsh=key,
            payload_json=text,
            payload_hash=records.text_hash(text),
            status=status,
            key_crowd=key_crowd,
            reason=reason if status is not Status.PENDING else None,
            source_changed_at=changed_at,
            # As sent: build() checked and normalised them (an ID number's x upper-cased).
            card_type=payload["cardType"],
            card_no=payload["cardNo"],
            visit_type=payload["type"],
            settlement_date=date.fromisoformat(payload["settlementDate"]),
        )

    # -- outbox -> platform ------------------------------------------------

    def dispatch(self, stats: CycleStats) -> None:
        """Send everything due, with ``upstream.concurrency`` uploads in flight; every outcome
        is in the outbox when this returns."""
        if self.before_dispatch is not None:
            self.before_dispatch()
        looked_up: dict[str, _Decision] = {}
        try:
            paused = self.store.get_config_error()
            if paused:
                message = self._probe(stats, looked_up, paused)
                if message is not None:
                    stats.paused = message
                    return
            message = self._stream(stats, looked_up)
            if message is not None:
                stats.paused = message
        finally:
            self._recorder.flush()

    def _probe(self, stats: CycleStats, looked_up: dict[str, _Decision], paused: dict[str, Any]) -> str | None:
        """Sending is paused: one record until the platform takes one without a configuration
        error. None when it did (sending resumes), else the message to keep reporting."""
        while not self._stop.is_set():
            claims = self.store.claim_due(now=self.clock(), limit=1, owner=self.owner)
            if not claims:
                break
            self.progress.tick()
            outcome = self._stream(stats, looked_up, only=claims)
            if outcome is not None:
                return outcome
            # The probe went through: the platform accepts again.
            self.store.clear_config_error()
            log.warning("sending_resumed", after=paused.get("message"))
            return None
        return str(paused.get("message"))

    def _stream(
        self, stats: CycleStats, looked_up: dict[str, _Decision], *, only: list[Claimed] | None = None
    ) -> str | None:
        """Keep ``concurrency`` uploads in flight, claiming the next batch while the previous one
        drains (``only``: send these and claim nothing more). Returns the configuration
        error's message if sending paused."""
        concurrency = self.settings.upstream.concurrency
        batch_size = max(32, concurrency * 8)
        queue: deque[tuple[Claimed, str, str | None]] = deque()
        pending: dict[Future[None], Claimed] = {}
        config_error: list[ConfigError] = []
        if only is not None:
            self._prepare(only, stats, looked_up, queue, config_error)
        drained = only is not None
        while True:
            halted = self._stop.is_set() or bool(config_error)
            # Claimed before the queue runs dry: no slot waits for a batch's slowest upload.
            if not halted and not drained and len(queue) < concurrency:
                claims = self.store.claim_due(now=self.clock(), limit=batch_size, owner=self.owner)
                if claims:
                    self.progress.tick()
                    self._prepare(claims, stats, looked_up, queue, config_error)
                else:
                    drained = True
                continue
            while queue and len(pending) < concurrency and not (self._stop.is_set() or config_error):
                c, kc, new_hash = queue.popleft()
                pending[self._pool.submit(self._upload_one, c, kc, stats, config_error, new_hash)] = c
            if not pending:
                if halted or drained:
                    break
                continue
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                c = pending.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    self._crashed(c, exc, stats)
        if queue:
            self.store.release([c for c, _, _ in queue], now=self.clock())
        if config_error:
            self._pause(config_error[0], [])
            return config_error[0].message
        return None

    def _prepare(
        self, claims: list[Claimed], stats: CycleStats, looked_up: dict[str, _Decision],
        queue: deque[tuple[Claimed, str, str | None]], config_error: list[ConfigError],
    ) -> None:
        """Decide one claimed batch: park what is not to be sent, queue the rest for upload."""
        rebuilt: dict[str, str] = {}
        claims = [r for r in (self._revalidate(c, stats, rebuilt) for c in claims) if r is not None]
        decisions = self._decide(claims, stats, looked_up)
        blocking = next((d.error for d in decisions.values() if isinstance(d.error, ConfigError)), None)
        if isinstance(blocking, ConfigError):
            self.store.release(claims, now=self.clock())
            config_error.append(blocking)
            return
        for c in claims:
            d = decisions.get(c.lsh)
            if d is None:
                queue.append((c, c.key_crowd or "1", rebuilt.get(c.lsh)))
            elif d.key_crowd is None:
                self._failed(c, d.error or TransientError("label lookup failed"), stats, prefix="label lookup failed: ")
            elif d.key_crowd == "0" and self.settings.key_crowd.upload_only_key_crowd:
                self.store.mark_skipped(c, reason=d.how, now=self.clock())
                stats.skipped += 1
            else:
                queue.append((c, d.key_crowd, rebuilt.get(c.lsh)))

    def _revalidate(self, c: Claimed, stats: CycleStats, rebuilt: dict[str, str]) -> Claimed | None:
        """A requeued record that local validation had parked still holds its raw HIS row:
        validate it again by today's rules before anything is sent."""
        try:
            data = json.loads(c.payload_json, parse_float=Decimal)
        except ValueError:
            data = None
        if not isinstance(data, dict) or "cardType" in data:
            return c
        item = self.incoming(data, today=datetime.now(self.settings.schedule.tz).date())
        if item.status is Status.INVALID:
            self.store.mark_invalid(c, error=item.reason or "invalid", http_status=None, now=self.clock())
            stats.invalid += 1
            return None
        if item.status is Status.SKIPPED:
            self.store.mark_skipped(c, reason=item.reason or "not in the key population", now=self.clock())
            stats.skipped += 1
            return None
        rebuilt[c.lsh] = item.payload_hash
        return replace(c, payload_json=item.payload_json, key_crowd=item.key_crowd)

    def _upload_one(
        self, c: Claimed, key_crowd: str, stats: CycleStats, config_error: list[ConfigError], new_hash: str | None
    ) -> None:
        body = _with_key_crowd(c.payload_json, key_crowd)
        try:
            result = self.client.upload(body, lsh=c.lsh)
            crash_point("after_upload_accepted")
        except ConfigError as exc:
            config_error.append(exc)
            self.store.release([c], now=self.clock())
            return
        except InvalidRecord as exc:
            self._recorder.put(
                self.store.invalid_outcome(c, error=_describe(exc), http_status=exc.http_status, now=self.clock())
            )
            with self._lock:
                stats.invalid += 1
            log.warning("record_rejected", lsh=c.lsh, error=_describe(exc))
            return
        except (TransientError, AuthError) as exc:
            self._failed(c, exc, stats)
            return
        self._recorder.put(
            self.store.sent_outcome(
                c, sent_json=body, key_crowd=key_crowd, answer=result.message, http_status=result.http_status,
                now=self.clock(), payload_hash=new_hash,
            )
        )
        self.progress.tick()
        with self._lock:
            stats.sent += 1
            if result.created:
                stats.created += 1
            else:
                stats.updated += 1
        log.debug("record_sent", lsh=c.lsh, answer=result.message)

    def _crashed(self, c: Claimed, exc: BaseException, stats: CycleStats) -> None:
        """The upload path raised where it should not: counted against the record, which is
        parked invalid at the MAX_UPLOAD_CRASHES-th time instead of crashing every cycle."""
        now = self.clock()
        error = (
            f"crowd-sync crashed uploading this record: {type(exc).__name__}: {exc} — if its payload was "
            "edited by hand, correct it and run `crowd-sync retry --lsh` (or let the HIS row change); "
            "otherwise report it as a bug with this text"
        )
        status = self.store.record_crash(
            c, error=error, now=now, next_attempt_at=self.policy.next_attempt_at(now, c.attempts + 1),
            limit=MAX_UPLOAD_CRASHES,
        )
        log.error("upload_crashed", lsh=c.lsh, error=f"{type(exc).__name__}: {exc}", now_status=status)
        with self._lock:
            if status is Status.INVALID:
                stats.invalid += 1
            elif status is Status.FAILED:
                stats.failed += 1

    def _failed(self, c: Claimed, exc: SyncError, stats: CycleStats, prefix: str = "") -> None:
        now = self.clock()
        generic = isinstance(exc, TransientError) and exc.generic
        error = prefix + _describe(exc)
        if self.policy.gives_up(
            now=now, first_failed_at=c.first_failed_at, generic_failures=c.generic_failures, generic=generic
        ):
            self._recorder.put(self.store.dead_outcome(c, error=error, http_status=exc.http_status, now=now))
            with self._lock:
                stats.dead += 1
            log.error("record_dead", lsh=c.lsh, attempts=c.attempts + 1, error=error)
            return
        nxt = self.policy.next_attempt_at(now, c.attempts + 1)
        self._recorder.put(
            self.store.failed_outcome(
                c, error=error, http_status=exc.http_status, now=now, next_attempt_at=nxt, generic=generic
            )
        )
        with self._lock:
            stats.failed += 1
        log.info("record_failed", lsh=c.lsh, attempts=c.attempts + 1, retry_at=nxt.isoformat(), error=error)

    def _pause(self, exc: ConfigError, claims: Iterable[Claimed]) -> None:
        self.store.release(list(claims), now=self.clock())
        already = self.store.get_config_error()
        self.store.set_config_error(message=_describe(exc), hint=exc.hint, now=self.clock())
        if not already or already.get("message") != _describe(exc):
            log.error("sending_paused", error=exc.message, fix=exc.hint, platform_message=exc.platform_message)

    # -- key population ------------------------------------------------------

    def _decide(
        self, claims: list[Claimed], stats: CycleStats, looked_up: dict[str, _Decision]
    ) -> dict[str, _Decision]:
        """Label lookups for rows still undecided: each card at most once per cycle, cache first."""
        need = [c for c in claims if c.key_crowd is None and c.card_no]
        if not need:
            return {}
        cards = sorted({c.card_no for c in need if c.card_no and c.card_no not in looked_up})
        if cards:
            ttl_s = self.settings.key_crowd.cache_ttl_h * 3600
            cached = self.store.cache_get(cards, now=self.clock(), ttl_s=ttl_s) if ttl_s > 0 else {}
            for card, (data_json,) in cached.items():
                looked_up[card] = _decision_from_data(
                    json.loads(data_json) if data_json else None, how_prefix="label cache"
                )
                stats.cache_hits += 1
            missing = [c for c in cards if c not in looked_up]
            fresh: dict[str, str | None] = {}
            futures = {self._pool.submit(self._lookup_one, card): card for card in missing}
            for fut, card in futures.items():
                try:
                    res = fut.result()
                except ConfigError as exc:
                    looked_up[card] = _Decision(key_crowd=None, how="", error=exc)
                    continue
                except SyncError as exc:
                    looked_up[card] = _Decision(key_crowd=None, how="", error=exc)
                    continue
                stats.lookups += 1
                looked_up[card] = _decision_from_data(res.data, how_prefix="label API")
                fresh[card] = json.dumps(res.data, ensure_ascii=False) if res.data is not None else None
            if fresh:
                self.store.cache_put(fresh, now=self.clock())
        out: dict[str, _Decision] = {}
        for c in need:
            d = looked_up.get(c.card_no or "")
            if d is not None:
                out[c.lsh] = d
                if d.error is not None and not isinstance(d.error, ConfigError):
                    # A failed lookup is retried with the record's backoff, not again this cycle.
                    looked_up.pop(c.card_no or "", None)
        return out

    def _lookup_one(self, card: str) -> LookupResult:
        return self.client.lookup(card)


def _decision_from_data(data: Any, *, how_prefix: str) -> _Decision:
    person = parse_person(data)
    checked = utcnow().strftime("%Y-%m-%d %H:%M UTC")
    if person is not None and person.is_key_population:
        codes = ",".join(lbl.code for lbl in person.labels)
        return _Decision(key_crowd="1", how=f"{how_prefix} {checked}: key population ({codes})")
    if person is not None:
        return _Decision(key_crowd="0", how=f"{how_prefix} {checked}: known to the platform but without labels")
    return _Decision(key_crowd="0", how=f"{how_prefix} {checked}: not in the key population (no labels returned)")


def _describe(exc: SyncError) -> str:
    text = exc.message
    if exc.platform_message and exc.platform_message not in text:
        text += f" [platform: {exc.platform_message}]"
    if exc.hint:
        text += f" — {exc.hint}"
    return text


def _with_key_crowd(payload_json: str, key_crowd: str) -> str:
    """The stored payload with keyCrowd as decided; money stays Decimal (never float)."""
    payload = json.loads(payload_json, parse_float=Decimal)
    if payload.get("keyCrowd") == key_crowd:
        return payload_json
    payload["keyCrowd"] = key_crowd
    return records.payload_json(payload)


def _key_crowd_column(row: dict[str, Any]) -> str | None:
    return records.decode_key_crowd(row.get("key_crowd")) if "key_crowd" in row else None


def _outbox_key(lsh: str, raw_json: str) -> str:
    if not lsh:
        return f"(missing lsh) {_sha(raw_json)[:16]}"
    if len(lsh) > _MAX_KEY:
        return lsh[:200] + "…" + _sha(lsh)[:16]
    return lsh


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(int(value)) if float(value).is_integer() else str(value)
    text = str(value).strip()
    return text or None


def _as_date(value: Any) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return None
