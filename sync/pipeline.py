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
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog

from sync import keycrowd, records
from sync.clock import ClockWatch, HisClock, cursor_ahead, human_offset
from sync.crashpoints import crash_point
from sync.errors import (
    AuthError,
    ConfigError,
    InvalidRecord,
    PlatformUnavailable,
    SyncError,
    TransientError,
    describe,
)
from sync.his import HisSource, polling_window
from sync.keycrowd import Decision, LabelResult, LabelState, Verdict
from sync.outbox.model import Claimed, Failed, Incoming, Outcome, Parked, Sent, Status
from sync.outbox.store import Store
from sync.policy import MAX_UPLOAD_CRASHES, RetryPolicy
from sync.settings import Settings
from sync.upstream.client import Client, LookupResult
from sync.upstream.person import parse_person

log = structlog.get_logger(__name__)

# The outbox keys rows by lsh in a column of 255 characters; the platform allows 50.
_MAX_KEY = 255
RESIDENT_ID = "10"
# The keyCrowd a pending payload of a resident ID card holds in lookup mode (see incoming()).
_PAYLOAD_KEY_CROWD = "1"


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
    unreachable: str | None = None  # "platform unreachable since …" while sending waits for it
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
            self._store.leases.record(group)
            return
        except Exception as exc:  # noqa: BLE001 - the recorder thread must outlive any database error
            if len(group) == 1:
                self._lost(group[0], exc)
                return
            log.warning("outcomes_group_failed", records=len(group), error=f"{type(exc).__name__}: {exc}")
        # One by one, so that one record the database refuses does not cost the others.
        for item in group:
            try:
                self._store.leases.record([item])
            except Exception as exc:  # noqa: BLE001 - logged, and the lease released for a later resend
                self._lost(item, exc)

    def _lost(self, item: Outcome, exc: Exception) -> None:
        log.error("outcome_not_recorded", lsh=item.claimed.lsh, error=f"{type(exc).__name__}: {exc}")
        try:
            self._store.leases.release([item.claimed], now=utcnow())
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
        sole_sender: bool = False,
    ) -> None:
        """``sole_sender``: this process holds the instance lock (run, once, reconcile), so any
        lease held by another owner belongs to a process that died and is released at once."""
        self.settings = settings
        self.store = store
        self.client = client
        self._his = his
        self.clock = clock
        self.sole_sender = sole_sender
        self.policy = RetryPolicy(first_delay_s=settings.retry.first_delay_s, max_delay_s=settings.retry.max_delay_s)
        self.probe_policy = self.policy.probes()
        # While the platform is unreachable: when to probe it next (outbox time).
        self.next_probe_at: datetime | None = None
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
            keep=lambda reading: self.store.state.put_his_clock(reading, now=self.clock()), monotonic=time.monotonic,
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
        self.store.leases.release_owner(self.owner)
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
        result = self.store.queue.enqueue(batch, now=self.clock(), cursor=cursor)
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
        column = _key_crowd_column(row) if lookup and card_type != RESIDENT_ID else None

        # build() needs a keyCrowd to check the rest of the row. What the stored payload holds
        # is never sent as it is: every upload takes keyCrowd from keycrowd.decide() at
        # dispatch. (For resident ID cards in lookup mode it stays "1" as in earlier versions,
        # so that their payload hashes, and the visits already sent, stay as they are.)
        decided: str | None
        if not lookup:
            decided = None  # build() reads and checks the column itself
        elif card_type == RESIDENT_ID:
            decided = _PAYLOAD_KEY_CROWD
        else:
            decided = column or "0"
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
        reason: str | None = None
        # What the outbox knows of the key population: the HIS's column (None: nothing yet).
        key_crowd = payload["keyCrowd"] if not lookup else column
        if not keycrowd.needs_lookup(source=kc_setting.source, card_type=payload["cardType"]):
            # Decided by the column alone: park what must not go at once (dispatch decides
            # again, the same way, before anything is sent).
            d = keycrowd.decide(
                source=kc_setting.source, upload_only_key_crowd=kc_setting.upload_only_key_crowd,
                card_type=payload["cardType"], column=key_crowd, labels=_NOT_ASKED,
            )
            if d.verdict is Verdict.SKIP:
                status, reason = Status.SKIPPED, d.how
        return Incoming(
            lsh=key,
            payload_json=text,
            payload_hash=records.text_hash(text),
            status=status,
            key_crowd=key_crowd,
            reason=reason,
            source_changed_at=changed_at,
            # As sent: build() checked and normalised them (an ID number's x upper-cased).
            card_type=payload["cardType"],
            card_no=payload["cardNo"],
            visit_type=payload["type"],
            settlement_date=date.fromisoformat(payload["settlementDate"]),
        )

    # -- outbox -> platform ------------------------------------------------
    #
    # Whose fault a failure is decides what it costs (STYLE 12):
    # - the platform's (PlatformUnavailable: network, timeouts, 5xx, HTML, unreadable
    #   answers, failed logins; a token refused even after a new login): nothing is charged,
    #   the record goes back as it was and is tried again in the same dispatch. Several bad
    #   answers in a row with no good one between them mean the platform is down: sending
    #   pauses and the platform is probed, one record per back-off step, until it answers
    #   (``platform_down`` in sync_state: seen by every process, `status`, /healthz, metrics);
    # - the configuration's (ConfigError): nothing is charged; sending pauses until fixed;
    # - unexplained (a bare 中间请求异常, a 200 without 新增成功/修改成功, an unknown message):
    #   the record is retried with its own back-off and never given up on, since nothing says
    #   it is wrong; they also count as bad answers in a row;
    # - the record's (参数校验错误): parked invalid.
    # So `dead` never comes from the platform, by construction: the only answer the document
    # has that names a record's problem is 参数校验错误, and that one parks it as invalid.

    def dispatch(self, stats: CycleStats) -> None:
        """Send everything due, with ``upstream.concurrency`` uploads in flight; every outcome
        is in the outbox when this returns."""
        if self.before_dispatch is not None:
            self.before_dispatch()
        looked_up: dict[str, LabelResult] = {}
        try:
            if self.sole_sender:
                self._recover_leases()
            paused = self.store.state.get_config_error()
            down = self.store.state.get_platform_down()
            if down is not None:
                due = _state_time(down.get("next_probe_at"))
                if due is not None and self.clock() < due:
                    # Not yet time to probe: no request at all.
                    self.next_probe_at = due
                    stats.unreachable = unreachable_text(down)
                    stats.paused = str(paused.get("message")) if paused else None
                    return
            if paused or down:
                # One record first; the backlog follows only once the platform takes it.
                claims = self.store.leases.claim_due(now=self.clock(), limit=1, owner=self.owner)
                if not claims:
                    stats.paused = str(paused.get("message")) if paused else None
                    stats.unreachable = unreachable_text(down) if down else None
                    return
                self.progress.tick()
                halt = self._stream(stats, looked_up, only=claims, refusals_to_halt=1 if down else None)
                if self._settle(halt, stats, paused=paused, down=down):
                    if self.next_probe_at is not None:
                        # The next probe takes another record: one the platform cannot take
                        # must not keep the others waiting.
                        self.store.leases.postpone([c.lsh for c in claims], until=self.next_probe_at)
                    return
            halt = self._stream(stats, looked_up)
            self._settle(halt, stats, paused=None, down=None)
        finally:
            self._recorder.flush()

    def probe_due(self, now: datetime | None = None) -> bool:
        """Whether a probe of the unreachable platform is due (the daemon runs a dispatch then)."""
        due = self.next_probe_at
        return due is not None and (now or self.clock()) >= due

    def _recover_leases(self) -> None:
        """This process holds the instance lock: it is the only one sending, so leases held by
        anyone else belong to a process that died. Free them now rather than after lease_s."""
        n = self.store.leases.release_other_leases(self.owner)
        if n:
            log.warning("leases_recovered", records=n, reason="held by a process that is no longer running")

    def _settle(
        self, halt: list[SyncError], stats: CycleStats, *, paused: dict[str, Any] | None, down: dict[str, Any] | None
    ) -> bool:
        """Record why sending stopped, or that it works again. True when it stopped."""
        config = next((e for e in halt if isinstance(e, ConfigError)), None)
        if config is not None:
            self._pause(config, [])
            stats.paused = config.message
            if down is not None:
                # A configuration error is an answer: the platform is reachable.
                self.store.state.clear_platform_down()
                self.next_probe_at = None
            return True
        if halt:
            error = halt[0]
            reason = describe(error)
            previous = self.store.state.get_platform_down()
            probes = int(previous.get("probes") or 0) + 1 if previous else 0
            now = self.clock()
            nxt = now + timedelta(seconds=self.probe_policy.delay_s(probes + 1))
            state = self.store.state.set_platform_down(reason=reason, now=now, next_probe_at=nxt)
            self.next_probe_at = nxt
            stats.unreachable = unreachable_text(state)
            stats.paused = str(paused.get("message")) if paused else None
            if previous is None:
                log.error(
                    "platform_unreachable", error=error.message, platform_message=error.platform_message,
                    next_probe_at=nxt.isoformat(timespec="seconds"),
                    consequence="sending paused; no record is charged; probing with back-off",
                )
            else:
                log.warning("platform_probe_failed", probes=probes, error=error.message,
                            next_probe_at=nxt.isoformat(timespec="seconds"))
            return True
        if paused:
            self.store.state.clear_config_error()
            log.warning("sending_resumed", after=paused.get("message"))
        if down is not None:
            self.store.state.clear_platform_down()
            log.warning("platform_reachable_again", unreachable_since=down.get("since"), probes=down.get("probes"))
        self.next_probe_at = None
        return False

    def _stream(
        self, stats: CycleStats, looked_up: dict[str, LabelResult], *, only: list[Claimed] | None = None,
        refusals_to_halt: int | None = None,
    ) -> list[SyncError]:
        """Keep ``concurrency`` uploads in flight, claiming the next batch while the previous one
        drains (``only``: send these and claim nothing more). Returns why sending had to stop
        (configuration errors, platform faults), empty when it did not."""
        concurrency = self.settings.upstream.concurrency
        batch_size = max(32, concurrency * 8)
        queue: deque[tuple[Claimed, Decision, str | None]] = deque()
        pending: dict[Future[None], Claimed] = {}
        halt = _Halt(refusals_to_halt or max(_BAD_IN_A_ROW, concurrency + 1))
        if only is not None:
            self._prepare(only, stats, looked_up, queue, halt)
        drained = only is not None
        while True:
            halted = self._stop.is_set() or bool(halt.errors)
            if drained and only is None and halt.take_released():
                drained = False  # records went back untouched after a platform fault: try them again
            # Claimed before the queue runs dry: no slot waits for a batch's slowest upload.
            if not halted and not drained and len(queue) < concurrency:
                claims = self.store.leases.claim_due(now=self.clock(), limit=batch_size, owner=self.owner)
                if claims:
                    self.progress.tick()
                    self._prepare(claims, stats, looked_up, queue, halt)
                else:
                    drained = True
                if not queue and not pending and not drained:
                    continue  # nothing to send or wait for yet: claim more first
            while queue and len(pending) < concurrency and not (self._stop.is_set() or halt.errors):
                c, d, new_hash = queue.popleft()
                pending[self._pool.submit(self._upload_one, c, d, stats, halt, new_hash)] = c
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
            # Not sent: back as they were, nothing charged.
            self.store.leases.release([c for c, _, _ in queue], now=self.clock())
        return list(halt.errors)

    def _prepare(
        self, claims: list[Claimed], stats: CycleStats, looked_up: dict[str, LabelResult],
        queue: deque[tuple[Claimed, Decision, str | None]], halt: _Halt,
    ) -> None:
        """Decide one claimed batch (``keycrowd.decide``, every row, every time): park what is
        not to be sent, queue the rest for upload."""
        rebuilt: dict[str, str] = {}
        claims = [r for r in (self._revalidate(c, stats, rebuilt) for c in claims) if r is not None]
        kc = self.settings.key_crowd
        labels = self._labels(claims, stats, looked_up, halt)
        if halt.errors:
            # The platform is down or refuses the configuration: the batch goes back untouched.
            self.store.leases.release(claims, now=self.clock())
            return
        unasked: list[Claimed] = []
        for c in claims:
            d = keycrowd.decide(
                source=kc.source, upload_only_key_crowd=kc.upload_only_key_crowd, card_type=c.card_type,
                column=c.key_crowd, labels=labels.get(c.card_no or "", _NOT_ASKED),
            )
            if d.verdict is Verdict.SEND:
                queue.append((c, d, rebuilt.get(c.lsh)))
            elif d.verdict is Verdict.SKIP:
                self._park(c, Status.SKIPPED, d.how, key_crowd=d.key_crowd)
                stats.skipped += 1
            elif d.needs_lookup:
                unasked.append(c)  # its lookup hit a platform fault: nothing known, nothing charged
            else:
                # Undecided: never sent on a guess; tried again with the record's back-off.
                self._failed(c, TransientError(d.how), stats)
        if unasked:
            halt.release(self.store, unasked, now=self.clock())

    def _revalidate(self, c: Claimed, stats: CycleStats, rebuilt: dict[str, str]) -> Claimed | None:
        """A requeued record that local validation had parked holds its raw HIS row: validate
        it again by today's rules, from exactly the values the HIS returned, before anything
        is sent (and decide its key population again at ``_prepare``)."""
        if c.payload_json.startswith('{"cardType"'):
            return c  # a built payload (the usual case): records.payload_json starts so
        try:
            data = json.loads(c.payload_json)
        except ValueError:
            data = None
        if not isinstance(data, dict) or "cardType" in data:
            return c
        restored = records.parse_raw_json(c.payload_json)
        reason: str | None = None
        if restored is None:
            reason = (
                "parked by an earlier version of crowd-sync, which did not keep the HIS values exactly "
                "(bytes as hex, numbers through floats): not rebuilt from that copy. Read it again from the HIS: "
                "`crowd-sync reconcile --since <its settlement date>`, or change the HIS row"
            )
        elif restored[1]:
            lost = ", ".join(f"{column} ({kind})" for column, kind in sorted(restored[1].items()))
            reason = (
                f"the HIS returned values the outbox cannot keep exactly: {lost}; cast these columns in his.query "
                "(text: CAST(x AS CHAR), amounts: CAST(x AS DECIMAL(10,2)), dates: CAST(x AS DATE)); "
                "the row is validated again when it is read next (reconcile, or a change in the HIS)"
            )
        if reason is not None:
            self._park(c, Status.INVALID, reason)
            stats.invalid += 1
            return None
        assert restored is not None
        item = self.incoming(restored[0], today=datetime.now(self.settings.schedule.tz).date())
        if item.status is Status.INVALID:
            self._park(c, Status.INVALID, item.reason or "invalid")
            stats.invalid += 1
            return None
        if item.status is Status.SKIPPED:
            self._park(c, Status.SKIPPED, item.reason or "not in the key population", key_crowd=item.key_crowd)
            stats.skipped += 1
            return None
        rebuilt[c.lsh] = item.payload_hash
        return replace(
            c, payload_json=item.payload_json, key_crowd=item.key_crowd, card_type=item.card_type, card_no=item.card_no
        )

    def _upload_one(self, c: Claimed, d: Decision, stats: CycleStats, halt: _Halt, new_hash: str | None) -> None:
        kc = self.settings.key_crowd
        if d.verdict is not Verdict.SEND or not keycrowd.may_upload(
            upload_only_key_crowd=kc.upload_only_key_crowd, key_crowd=d.key_crowd
        ):  # pragma: no cover - decide() is the only way here; refuse rather than send
            log.error("upload_refused", lsh=c.lsh, verdict=str(d.verdict), key_crowd=d.key_crowd)
            self.store.leases.release([c], now=self.clock())
            return
        assert d.key_crowd is not None
        body = _with_key_crowd(c.payload_json, d.key_crowd)
        if not halt.begin():
            # Sending just stopped (platform down, configuration): this one goes back untouched.
            self.store.leases.release([c], now=self.clock())
            return
        try:  # the request's slot is given back once its outcome is known
            try:
                result = self.client.upload(body, lsh=c.lsh)
                crash_point("after_upload_accepted")
            except ConfigError as exc:
                halt.add(exc)
                self.store.leases.release([c], now=self.clock())
                return
            except (PlatformUnavailable, AuthError) as exc:
                # The platform's fault, not the record's: nothing charged, tried again.
                halt.bad(exc)
                halt.release(self.store, [c], now=self.clock())
                return
            except InvalidRecord as exc:
                halt.answered()
                self._recorder.put(
                    Parked(claimed=c, status=Status.INVALID, error=describe(exc), http_status=exc.http_status, at=self.clock())
                )
                with self._lock:
                    stats.invalid += 1
                log.warning("record_rejected", lsh=c.lsh, error=describe(exc))
                return
            except TransientError as exc:
                if exc.generic:
                    halt.bad(exc)
                self._failed(c, exc, stats)
                return
            halt.answered()
        finally:
            halt.end()
        self._recorder.put(
            Sent(
                claimed=c, body=body, key_crowd=d.key_crowd, answer=result.message, http_status=result.http_status,
                at=self.clock(), payload_hash=new_hash,
            )
        )
        self.progress.tick()
        with self._lock:
            stats.sent += 1
            if result.created:
                stats.created += 1
            else:
                stats.updated += 1
        log.debug("record_sent", lsh=c.lsh, answer=result.message, key_population=d.how)

    def _park(self, c: Claimed, status: Status, reason: str, *, key_crowd: str | None = None) -> None:
        """Not to be sent now: ``invalid`` or ``skipped``, written at once."""
        self.store.leases.record(
            [Parked(claimed=c, status=status, error=reason, http_status=None, at=self.clock(), key_crowd=key_crowd)]
        )

    def _crashed(self, c: Claimed, exc: BaseException, stats: CycleStats) -> None:
        """The upload path raised where it should not: counted against the record, which is
        parked invalid at the MAX_UPLOAD_CRASHES-th time instead of crashing every cycle."""
        now = self.clock()
        error = (
            f"crowd-sync crashed uploading this record: {type(exc).__name__}: {exc} — if its payload was "
            "edited by hand, correct it and run `crowd-sync retry --lsh` (or let the HIS row change); "
            "otherwise report it as a bug with this text"
        )
        status = self.store.leases.record_crash(
            c, error=error, now=now, next_attempt_at=self.policy.next_attempt_at(now, c.attempts + 1),
            limit=MAX_UPLOAD_CRASHES,
        )
        log.error("upload_crashed", lsh=c.lsh, error=f"{type(exc).__name__}: {exc}", now_status=status)
        with self._lock:
            if status is Status.INVALID:
                stats.invalid += 1
            elif status is Status.FAILED:
                stats.failed += 1

    def _failed(self, c: Claimed, exc: SyncError, stats: CycleStats) -> None:
        """A failure charged to the record: tried again after its back-off, never given up on."""
        now = self.clock()
        generic = isinstance(exc, TransientError) and exc.generic
        error = describe(exc)
        nxt = self.policy.next_attempt_at(now, c.attempts + 1)
        self._recorder.put(
            Failed(claimed=c, error=error, http_status=exc.http_status, at=now, retry_at=nxt, generic=generic)
        )
        with self._lock:
            stats.failed += 1
        refusals = c.generic_failures + 1
        if generic and refusals >= self.settings.retry.max_generic_attempts:
            log.error(
                "record_refused_repeatedly", lsh=c.lsh, refusals=refusals, retry_at=nxt.isoformat(), error=error,
                fix="平台多次拒收且未说明原因：把此日志交给平台支持 / the platform keeps refusing this record without "
                "a reason: give this log to the platform's support; it is retried with back-off meanwhile",
            )
        else:
            log.info("record_failed", lsh=c.lsh, attempts=c.attempts + 1, retry_at=nxt.isoformat(), error=error)

    def _pause(self, exc: ConfigError, claims: Iterable[Claimed]) -> None:
        self.store.leases.release(list(claims), now=self.clock())
        already = self.store.state.get_config_error()
        self.store.state.set_config_error(message=describe(exc), hint=exc.hint, now=self.clock())
        if not already or already.get("message") != describe(exc):
            log.error("sending_paused", error=exc.message, fix=exc.hint, platform_message=exc.platform_message)

    # -- key population ------------------------------------------------------

    def _labels(
        self, claims: list[Claimed], stats: CycleStats, looked_up: dict[str, LabelResult], halt: _Halt
    ) -> dict[str, LabelResult]:
        """What the label API says about each card the batch needs it for: cache first, each
        card at most once per dispatch. A failure is remembered for the whole dispatch, so
        every visit of that person waits (never one decided without the answer)."""
        source = self.settings.key_crowd.source
        need = sorted({
            c.card_no for c in claims if c.card_no and keycrowd.needs_lookup(source=source, card_type=c.card_type)
        })
        cards = [card for card in need if card not in looked_up]
        if cards:
            ttl_s = self.settings.key_crowd.cache_ttl_h * 3600
            cached = self.store.labels.get(cards, now=self.clock(), ttl_s=ttl_s) if ttl_s > 0 else {}
            for card, (data_json,) in cached.items():
                looked_up[card] = _label_result(json.loads(data_json) if data_json else None, via="label cache")
                stats.cache_hits += 1
            missing = [card for card in cards if card not in looked_up]
            fresh: dict[str, str | None] = {}
            futures = {self._pool.submit(self._lookup_one, card, halt): card for card in missing}
            for fut, card in futures.items():
                try:
                    res = fut.result()
                except ConfigError as exc:
                    halt.add(exc)
                    continue
                except (PlatformUnavailable, AuthError) as exc:
                    halt.bad(exc)  # not the person's fault: not remembered as their failure
                    continue
                except SyncError as exc:
                    if isinstance(exc, TransientError) and exc.generic:
                        halt.bad(exc)
                    looked_up[card] = LabelResult(state=LabelState.FAILED, error=describe(exc))
                    continue
                if res is None:
                    continue  # not asked: sending stopped meanwhile
                halt.answered()
                stats.lookups += 1
                looked_up[card] = _label_result(res.data, via="label API")
                fresh[card] = json.dumps(res.data, ensure_ascii=False) if res.data is not None else None
            if fresh:
                self.store.labels.put(fresh, now=self.clock())
        return {card: looked_up[card] for card in need if card in looked_up}

    def _lookup_one(self, card: str, halt: _Halt) -> LookupResult | None:
        if not halt.begin():
            return None  # sending stopped (platform down, configuration): do not ask
        try:
            return self.client.lookup(card)
        finally:
            halt.end()


# Bad answers in a row (platform faults, unexplained refusals), with no good one between
# them, that mean the platform is down: at least this many, or one more than the uploads
# in flight (an outage fails all of those at once).
_BAD_IN_A_ROW = 4
_NOT_ASKED = LabelResult.not_asked()


class _Halt:
    """Why one dispatch must stop sending, and the platform's recent answers; shared by the
    upload and lookup threads.

    Every request is made between ``begin`` and ``end``. After a bad answer, requests go
    one at a time until a good answer comes back: an outage costs the requests already in
    flight and one more, not a request per record waiting.
    """

    def __init__(self, bad_to_halt: int) -> None:
        self._lock = threading.Condition()
        self._limit = bad_to_halt
        self._bad = 0
        self._inflight = 0
        self._released = False
        self.errors: list[SyncError] = []

    def begin(self) -> bool:
        """Wait for a slot to send; False when sending stopped meanwhile."""
        with self._lock:
            while not self.errors and self._bad > 0 and self._inflight > 0:
                self._lock.wait()
            if self.errors:
                return False
            self._inflight += 1
            return True

    def end(self) -> None:
        with self._lock:
            self._inflight -= 1
            self._lock.notify_all()

    def add(self, exc: SyncError) -> None:
        """Stop sending now (a configuration error)."""
        with self._lock:
            self.errors.append(exc)
            self._lock.notify_all()

    def answered(self) -> None:
        """The platform took (or judged) a request: what came before was no outage."""
        with self._lock:
            self._bad = 0
            self._lock.notify_all()

    def bad(self, exc: SyncError) -> None:
        """A platform fault or an unexplained refusal; too many in a row: the platform is down."""
        with self._lock:
            self._bad += 1
            self._lock.notify_all()
            if self._bad < self._limit or self.errors:
                return
            if isinstance(exc, PlatformUnavailable | AuthError):
                self.errors.append(exc)
                return
            self.errors.append(
                PlatformUnavailable(
                    f"the platform refused {self._bad} requests in a row without a reason (last: {exc.message})",
                    hint="平台拒收所有请求且未说明原因，暂停发送并定时探测 / the platform refuses everything without a "
                    "reason: sending pauses and the platform is probed with back-off",
                    http_status=exc.http_status, platform_message=exc.platform_message,
                )
            )

    def release(self, store: Store, claims: list[Claimed], *, now: datetime) -> None:
        """Give records back untouched after a platform fault; the dispatch tries them again."""
        store.leases.release(claims, now=now)
        with self._lock:
            self._released = True

    def take_released(self) -> bool:
        with self._lock:
            released, self._released = self._released, False
            return released and not self.errors


def unreachable_text(state: Mapping[str, Any]) -> str:
    """``platform unreachable since …`` for status, /healthz and the logs."""
    text = f"platform unreachable since {state.get('since')}Z: {state.get('reason')}"
    if state.get("next_probe_at"):
        text += f" (probes failed: {state.get('probes') or 0}; next probe at {state.get('next_probe_at')}Z)"
    return text


def _state_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _label_result(data: Any, *, via: str) -> LabelResult:
    person = parse_person(data)
    checked = f"{via} {utcnow():%Y-%m-%d %H:%M} UTC"
    if person is None:
        return LabelResult(state=LabelState.NOBODY, via=checked)
    if person.is_key_population:
        return LabelResult(state=LabelState.KEY, codes=tuple(lbl.code for lbl in person.labels), via=checked)
    return LabelResult(state=LabelState.NO_LABELS, via=checked)


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
