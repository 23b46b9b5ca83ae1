"""What becomes of each claimed row: the outcome built and counted (``Outcomes``), then
written to the outbox by one thread, many per transaction (``Recorder``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

import structlog

from sync import localtime
from sync.clock import utcnow
from sync.errors import InvalidRecord, SyncError, TransientError, describe
from sync.outbox.model import Claimed, Failed, Outcome, Parked, Sent, Status
from sync.outbox.store import Store
from sync.policy import MAX_UPLOAD_CRASHES, RetryPolicy
from sync.stats import CycleStats

log = structlog.get_logger(__name__)


class Recorder:
    """Writes upload outcomes to the outbox from one thread, many per transaction.

    An upload thread hands its outcome over and takes the next record at once instead of
    holding its slot through a transaction of its own (8 to 14 ms a record). Each outcome
    is still written only if the row is still ours and unchanged (``Leases.record``).
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


class Outcomes:
    """One outcome per claimed row, counted in the run's figures; thread-safe (the upload
    threads and the claiming thread all report here)."""

    def __init__(
        self, store: Store, *, policy: RetryPolicy, max_generic_attempts: int, clock: Callable[[], datetime]
    ) -> None:
        self._store = store
        self._policy = policy
        self._max_generic = max_generic_attempts
        self._clock = clock
        self._lock = threading.Lock()
        self.recorder = Recorder(store)

    def count(self, stats: CycleStats, field: str) -> None:
        """One more of ``field`` in the run's figures (an upload answered otherwise than sent)."""
        with self._lock:
            setattr(stats, field, getattr(stats, field) + 1)

    def sent(self, c: Claimed, stats: CycleStats, *, body: str, key_crowd: str, answer: str,
             http_status: int | None, created: bool, payload_hash: str | None) -> None:
        """The platform accepted ``body`` (新增成功: ``created``, 修改成功: updated)."""
        self.recorder.put(
            Sent(
                claimed=c, body=body, key_crowd=key_crowd, answer=answer, http_status=http_status, at=self._clock(),
                payload_hash=payload_hash,
            )
        )
        with self._lock:
            stats.sent += 1
            if created:
                stats.created += 1
            else:
                stats.updated += 1

    def rejected(self, c: Claimed, exc: InvalidRecord, stats: CycleStats) -> None:
        """The platform named the record's problem (参数校验错误): parked invalid."""
        self.recorder.put(
            Parked(claimed=c, status=Status.INVALID, error=describe(exc), http_status=exc.http_status, at=self._clock())
        )
        with self._lock:
            stats.invalid += 1
        log.warning("record_rejected", lsh=c.lsh, error=describe(exc))

    def parked(self, c: Claimed, status: Status, reason: str, stats: CycleStats, *, key_crowd: str | None = None) -> None:
        """Not to be sent now (``invalid`` or ``skipped``, decided before any request): written at once."""
        self._store.leases.record(
            [Parked(claimed=c, status=status, error=reason, http_status=None, at=self._clock(), key_crowd=key_crowd)]
        )
        with self._lock:
            if status is Status.INVALID:
                stats.invalid += 1
            elif status is Status.SKIPPED:
                stats.skipped += 1

    def failed(self, c: Claimed, exc: SyncError, stats: CycleStats) -> None:
        """A failure charged to the record: tried again after its back-off, never given up on."""
        now = self._clock()
        generic = isinstance(exc, TransientError) and exc.generic
        error = describe(exc)
        nxt = self._policy.next_attempt_at(now, c.attempts + 1)
        self.recorder.put(
            Failed(claimed=c, error=error, http_status=exc.http_status, at=now, retry_at=nxt, generic=generic)
        )
        with self._lock:
            stats.failed += 1
        refusals = c.generic_failures + 1
        if generic and refusals >= self._max_generic:
            log.error(
                "record_refused_repeatedly", lsh=c.lsh, refusals=refusals, retry_at=localtime.text(nxt), error=error,
                fix="平台多次拒收且未说明原因：把此日志交给平台支持 / the platform keeps refusing this record without "
                "a reason: give this log to the platform's support; it is retried with back-off meanwhile",
            )
        else:
            log.info("record_failed", lsh=c.lsh, attempts=c.attempts + 1, retry_at=localtime.text(nxt), error=error)

    def crashed(self, c: Claimed, exc: BaseException, stats: CycleStats) -> None:
        """The upload path raised where it should not: counted against the record, which is
        parked invalid at the MAX_UPLOAD_CRASHES-th time instead of crashing every cycle."""
        now = self._clock()
        error = (
            f"crowd-sync crashed uploading this record: {type(exc).__name__}: {exc} — if its payload was "
            "edited by hand, correct it and run `crowd-sync retry --lsh` (or let the HIS row change); "
            "otherwise report it as a bug with this text"
        )
        status = self._store.leases.record_crash(
            c, error=error, now=now, next_attempt_at=self._policy.next_attempt_at(now, c.attempts + 1),
            limit=MAX_UPLOAD_CRASHES,
        )
        log.error("upload_crashed", lsh=c.lsh, error=f"{type(exc).__name__}: {exc}", now_status=status)
        with self._lock:
            if status is Status.INVALID:
                stats.invalid += 1
            elif status is Status.FAILED:
                stats.failed += 1
