"""The service: scheduled cycles and the nightly reconcile, signals, systemd notify.

APScheduler 3 keeps the jobs in memory (every durable fact lives in the outbox).
Both jobs share one worker thread, so a reconcile waits for a running cycle
instead of racing it; so does a probe of the platform while it is unreachable
(run as soon as it is due, not at the next poll, so that the backlog drains as
soon as the platform is back); each job runs one instance at a time, missed runs are
coalesced into one, and a late run is never dropped (no misfire deadline), so a
job that overran or a host that slept still does the work when it wakes.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import UTC, date, datetime, timedelta
from types import FrameType
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor as JobExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from sync.circuit import unreachable_text
from sync.errors import SyncError
from sync.metrics import Metrics, MetricsServer
from sync.outbox.lock import AlreadyRunning, InstanceLock
from sync.pipeline import Pipeline
from sync.settings import Settings
from sync.stats import CycleStats
from sync.views.progress import Ticker, status_line

log = structlog.get_logger(__name__)

STOP_GRACE_S = 10.0


class SystemdNotifier:
    """sd_notify(3) over $NOTIFY_SOCKET; silent when not run by systemd."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000

    def notify(self, message: str) -> None:
        if not self._addr:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self._addr)
                s.sendall(message.encode("utf-8"))
        except OSError as exc:
            log.warning("systemd_notify_failed", error=str(exc))


class Daemon:
    def __init__(
        self, settings: Settings, pipeline: Pipeline, *, notifier: SystemdNotifier | None = None,
        lock: InstanceLock | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.notifier = notifier or SystemdNotifier()
        # Checked before every job and every dispatch: a second instance never sends beside us.
        self.lock = lock
        if lock is not None:
            pipeline.before_dispatch = lock.ensure
        # Why the daemon stopped by itself (the instance lock taken by another process).
        self.fatal: SyncError | None = None
        self._stop = threading.Event()
        self._job_started: float | None = None
        self._job_lock = threading.Lock()
        self.last_cycle_ok: bool | None = None
        self.last_cycle_at: float | None = None
        self.metrics = Metrics(
            store=pipeline.store,
            poll_every_s=settings.schedule.poll_every_s,
            logins=lambda: sum(c.counters["logins"] for c in pipeline.dispatcher.clients),
            progress_at=lambda: pipeline.progress.at,
            institutions=[m.code for m in settings.members],
        )
        for client in pipeline.dispatcher.clients:
            client.on_answer = self.metrics.upstream_answered
        pipeline.his.on_query = self.metrics.his_queried
        self.metrics_server: MetricsServer | None = None
        self.scheduler = BackgroundScheduler(
            executors={"default": JobExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=settings.schedule.tz,
        )

    # -- jobs -----------------------------------------------------------------

    def _guarded(self, name: str, fn: Any) -> None:
        if self._stop.is_set():
            return
        with self._job_lock:
            self._job_started = time.monotonic()
        self.pipeline.progress.tick()
        self.metrics.job_started()
        started = time.monotonic()
        stats: CycleStats | None = None
        error: str | None = None
        try:
            if self.lock is not None:
                self.lock.ensure()
            result = fn()
            stats = result if isinstance(result, CycleStats) else None
            self.last_cycle_ok = True
        except AlreadyRunning as exc:
            # Another crowd-sync holds the lock now: stop, and let it do the work alone.
            self.last_cycle_ok = False
            error = str(exc)
            self.fatal = exc
            log.error("stopping_lock_taken", error=exc.message, fix=exc.hint)
            self.request_stop()
        except SyncError as exc:
            self.last_cycle_ok = False
            error = str(exc)
            log.error(f"{name}_failed", error=exc.message, fix=exc.hint)
        except Exception as exc:
            self.last_cycle_ok = False
            error = f"{type(exc).__name__}: {exc}"
            log.exception(f"{name}_crashed", error=error)
        finally:
            self.last_cycle_at = time.time()
            self.metrics.job_finished(name, stats=stats, error=error, duration_s=time.monotonic() - started)
            with self._job_lock:
                self._job_started = None
            self._after_job(stats, error)

    def _after_job(self, stats: CycleStats | None, error: str | None) -> None:
        """systemd's STATUS= (what the job did, what waits, a pause or outage) and the next
        jobs for `status`; neither may stop the service."""
        try:
            summary = self.pipeline.store.summary(
                now=self.pipeline.clock(), institutions=[m.code for m in self.pipeline.settings.members]
            )
            waiting = sum(summary.counts.get(s, 0) for s in ("pending", "failed"))
            paused = (summary.config_error or {}).get("message")
            down = summary.platform_down
            next_poll = self._next_run("cycle")
            line = status_line(
                last=stats, waiting=waiting, paused=str(paused) if paused else None,
                unreachable=unreachable_text(down) if down else None, next_poll=next_poll,
            )
            if error:
                line = f"上次失败 last job failed: {error[:300]} · {line}"
            self.notifier.notify(f"STATUS={line}")
            self._publish_schedule()
        except Exception as exc:  # noqa: BLE001 - only a display: the next job tries again
            log.warning("status_not_updated", error=f"{type(exc).__name__}: {exc}")

    def _next_run(self, job_id: str) -> datetime | None:
        job = self.scheduler.get_job(job_id)
        when = getattr(job, "next_run_time", None) if job is not None else None
        return when.astimezone(UTC).replace(tzinfo=None) if isinstance(when, datetime) else None

    def _publish_schedule(self) -> None:
        nxt, rec = self._next_run("cycle"), self._next_run("reconcile")
        self.pipeline.store.put_schedule(
            {
                "pid": os.getpid(), "host": socket.gethostname(),
                "next_poll_at": nxt.isoformat(timespec="seconds") if nxt else None,
                "next_reconcile_at": rec.isoformat(timespec="seconds") if rec else None,
            },
            now=self.pipeline.clock(),
        )

    def prune(self) -> None:
        """sync_run and sync_attempt past their retention (outbox.keep_*_days): at start and nightly."""
        o = self.settings.outbox
        try:
            runs, attempts = self.pipeline.store.prune_history(
                now=self.pipeline.clock(), keep_runs_days=o.keep_runs_days, keep_attempts_days=o.keep_attempts_days
            )
        except Exception as exc:  # noqa: BLE001 - retention waits for the next night
            log.warning("history_not_pruned", error=f"{type(exc).__name__}: {exc}")
            return
        if runs or attempts:
            log.info("history_pruned", runs=runs, attempts=attempts,
                     keep_runs_days=o.keep_runs_days, keep_attempts_days=o.keep_attempts_days)

    def _cycle(self) -> None:
        self._guarded("cycle", lambda: self.pipeline.cycle("cycle"))

    def _dispatch(self) -> None:
        self._guarded("dispatch", self.pipeline.dispatch_only)

    def _probe_if_due(self) -> None:
        """The platform was unreachable and its next probe is due: dispatch now, between polls."""
        with self._job_lock:
            busy = self._job_started is not None
        if busy or self._stop.is_set() or not self.pipeline.probe_due():
            return
        if self.scheduler.get_job("probe") is None:
            self.scheduler.add_job(self._dispatch, id="probe")

    def _until_probe_s(self, tick: float) -> float:
        due = self.pipeline.next_probe_at
        if due is None:
            return tick
        return max(0.05, min(tick, (due - self.pipeline.clock()).total_seconds()))

    def _reconcile(self) -> None:
        since = reconcile_since(self.settings)
        self._guarded("reconcile", lambda: self.pipeline.reconcile(since))
        self.prune()

    # -- main loop ------------------------------------------------------------

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if not self._stop.is_set():
            log.info("stop_requested", signal=signal.Signals(signum).name if signum else None)
        self._stop.set()
        self.pipeline.request_stop()

    def _healthy_for_watchdog(self) -> bool:
        """Fed only while the loop really progresses: idle between jobs, or a job that
        keeps making progress (a batch recorded, an upload answered)."""
        with self._job_lock:
            started = self._job_started
        if started is None:
            return True
        limit = (self.notifier.watchdog_s or 600.0) / 2
        return time.monotonic() - self.pipeline.progress.at < limit

    def run(self) -> int:
        s = self.settings.schedule
        if self.settings.metrics.listen:
            try:
                self.metrics_server = MetricsServer(self.metrics, self.settings.metrics.listen).start()
            except SyncError:
                # Nothing was scheduled yet: release what the pipeline holds, then report (exit 2).
                self.pipeline.close(wait_s=0)
                raise
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.scheduler.add_job(
            self._cycle,
            IntervalTrigger(seconds=s.poll_every_s, timezone=s.tz),
            id="cycle",
            next_run_time=datetime.now(s.tz),
        )
        at = s.reconcile_time
        self.scheduler.add_job(
            self._reconcile, CronTrigger(hour=at.hour, minute=at.minute, timezone=s.tz), id="reconcile"
        )
        self.scheduler.start()
        self.prune()
        ticker = Ticker(
            self.pipeline.progress, every_s=self.settings.log.progress_every_s,
            also=lambda snap: self.notifier.notify(f"STATUS={snap.line()}"),
        ).start()
        log.info(
            "daemon_started",
            poll_every_s=s.poll_every_s,
            reconcile_at=s.reconcile_at,
            timezone=s.timezone,
            pid=os.getpid(),
        )
        self.notifier.notify(f"READY=1\nSTATUS=启动 started: polling every {s.poll_every_s}s")
        try:
            self._publish_schedule()
        except Exception as exc:  # noqa: BLE001 - only for `status`
            log.warning("schedule_not_published", error=f"{type(exc).__name__}: {exc}")
        tick = min(5.0, (self.notifier.watchdog_s or 10.0) / 4)
        while not self._stop.wait(self._until_probe_s(tick)):
            self._probe_if_due()
            if self._healthy_for_watchdog():
                self.notifier.notify("WATCHDOG=1")
            else:
                log.warning("watchdog_starved", seconds_without_progress=round(time.monotonic() - self.pipeline.progress.at))
        self.notifier.notify("STOPPING=1")
        ticker.stop()
        code = self.shutdown()
        if self.fatal is not None:
            raise self.fatal
        return code

    def shutdown(self) -> int:
        deadline = time.monotonic() + STOP_GRACE_S
        self.scheduler.shutdown(wait=False)
        while time.monotonic() < deadline:
            with self._job_lock:
                if self._job_started is None:
                    break
            time.sleep(0.05)
        self.pipeline.close(wait_s=max(0.0, deadline - time.monotonic()))
        if self.metrics_server is not None:
            # Last, so that a scrape during the stop still sees the final job counted.
            self.metrics_server.stop()
        log.info("daemon_stopped")
        return 0


def reconcile_since(settings: Settings, today: date | None = None) -> date:
    base = today or datetime.now(settings.schedule.tz).date()
    return base - timedelta(days=settings.schedule.reconcile_days)
