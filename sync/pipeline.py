"""One cycle of work: poll the HIS into the outbox, then dispatch what is due.

The orchestration and the error boundary of a run: whatever one record does, the
others go on, and every run is recorded in ``sync_run`` with what it did. Reading the
HIS into the outbox is ``sync.poll``'s; sending is ``sync.dispatch``'s.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta

import structlog

from sync.clock import utcnow
from sync.errors import SyncError
from sync.his import HisSource
from sync.outbox.store import Store
from sync.poll import Poller
from sync.routing import Routes
from sync.settings import Settings
from sync.stats import CycleStats, Progress
from sync.upstream.client import Client

log = structlog.get_logger(__name__)


class Pipeline:
    """A poller and a dispatcher over one outbox, run as cycles and reconciles."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        client: Client | None = None,
        his: HisSource,
        clock: Callable[[], datetime] = utcnow,
        sole_sender: bool = False,
        clients: Mapping[str, Client] | None = None,
    ) -> None:
        """``sole_sender``: this process holds the instance lock (run, once, reconcile), so any
        lease held by another owner belongs to a process that died and is released at once.
        ``clients``: one per institution code (``client``: the only institution's)."""
        self.settings = settings
        self.store = store
        if clients is None:
            if client is None:
                raise ValueError("Pipeline needs client or clients")
            clients = {settings.members[0].code: client}
        self.clients = dict(clients)
        # The first institution's client (the counters of /metrics).
        self.client = client or self.clients[settings.members[0].code]
        self.his = his
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.progress = Progress()
        self._stop = threading.Event()
        self.dispatcher = Routes(
            settings, store=store, clients=self.clients, owner=self.owner, clock=clock, sole_sender=sole_sender,
            progress=self.progress, stop=self._stop,
        )
        self.poller = Poller(settings, store=store, his=his, clock=clock, progress=self.progress, stop=self._stop)
        # Raises unless this process may send (the instance lock is still ours): see InstanceLock.ensure.
        self.before_dispatch: Callable[[], None] | None = None

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
        for client in self.clients.values():
            client.close()
        self.his.dispose()

    @property
    def next_probe_at(self) -> datetime | None:
        """While the platform is unreachable: when to probe it next (outbox time)."""
        return self.dispatcher.next_probe_at

    def probe_due(self, now: datetime | None = None) -> bool:
        """Whether a probe of the unreachable platform is due (the daemon runs a dispatch then)."""
        return self.dispatcher.probe_due(now)

    # -- cycles ------------------------------------------------------------

    def cycle(self, kind: str = "cycle") -> CycleStats:
        """Poll new settlements, then dispatch everything due. Recorded as a run."""
        def work(stats: CycleStats) -> None:
            self.poll(stats)
            self.dispatch(stats)

        return self._run(kind, work)

    def poll(self, stats: CycleStats) -> None:
        """Read what settled in the HIS since the last poll into the outbox (``sync.poll``)."""
        self.poller.poll(stats)

    def read_window(self, since: datetime, until: datetime, stats: CycleStats, *, move_cursor: bool) -> None:
        """Read a window of the HIS into the outbox (``sync.poll``)."""
        self.poller.read_window(since, until, stats, move_cursor=move_cursor)

    def dispatch(self, stats: CycleStats) -> None:
        """Send everything due (``sync.dispatch``), once this process may still send."""
        if self.before_dispatch is not None:
            self.before_dispatch()
        self.progress.sending(self.store.count_due(now=self.clock()))
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
                self._read_while_sending(start, end, stats)
            if self.settings.key_crowd.source == "lookup":
                n = self.store.queue.recheck_skipped(now=self.clock(), changed_since=start)
                if n:
                    log.info("skipped_rechecked", records=n)
            self.dispatch(stats)

        return self._run("reconcile", work)

    def _read_while_sending(self, since: datetime, until: datetime, stats: CycleStats) -> None:
        """Read a window of the HIS into the outbox while what it makes due is already sent:
        a dispatch beside the read claims each batch once committed, so a back-fill takes
        about the longer of reading and sending, not their sum. What is left when the read
        ends is the next dispatch's."""
        reading_done = threading.Event()
        sending = CycleStats()  # its own figures: the reader's thread counts skips and invalids too
        failures: list[Exception] = []

        def send() -> None:
            try:
                if self.before_dispatch is not None:
                    self.before_dispatch()
                self.dispatcher.dispatch(sending, reading_done=reading_done)
            except Exception as exc:  # noqa: BLE001 - raised in the run's thread below
                failures.append(exc)

        sender = threading.Thread(target=send, name="dispatch-while-reading", daemon=True)
        sender.start()
        try:
            self.read_window(since, until, stats, move_cursor=False)
        finally:
            reading_done.set()
            sender.join()
            stats.add(sending)
        if failures:
            raise failures[0]

    def _run(self, kind: str, work: Callable[[CycleStats], object]) -> CycleStats:
        stats = CycleStats()
        started = time.monotonic()
        run_id = self.store.start_run(kind, now=self.clock())
        self.progress.start(kind, stats)
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
            self.progress.finish()
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
