"""Upload outcomes written to the outbox by one thread, many per transaction."""

from __future__ import annotations

import threading

import structlog

from sync.clock import utcnow
from sync.outbox.model import Outcome
from sync.outbox.store import Store

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
