"""Prometheus ``/metrics`` and a ``/healthz`` answer for the daemon (``metrics.listen``).

The outbox figures (records by status, oldest pending age, last upload, the
configuration-error flag) are read from the outbox at scrape time: they are a few
cheap aggregate queries, and this way a `crowd-sync retry` or a `once` run by hand
shows at the next scrape instead of after the next cycle. Counters (uploads by
outcome, label lookups, cycles) come from each cycle's ``CycleStats``, which the
daemon hands over when a job ends.

``/healthz`` is 200 only while cycles succeed: the last job ended without error,
sending is not held back by a configuration error, and a job finished (or a
running one made progress) within 3 × ``schedule.poll_every_s``. It is 503 until
the first cycle has succeeded, so a fresh install that cannot reach the HIS or the
platform is never reported healthy.

Served by a small threaded ``http.server`` of our own: ``prometheus_client``'s
``start_http_server`` has no way to add ``/healthz``. Every scrape uses this
module's own ``CollectorRegistry``, never the library's global one.
"""

from __future__ import annotations

import json
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from sync import __version__, clock, logs
from sync.errors import ConfigError, SyncError
from sync.outbox.model import DEFAULT_INSTITUTION, Status
from sync.outbox.store import Store
from sync.stats import CycleStats

log = structlog.get_logger(__name__)

# No `_created` series: they double the series count and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Upload requests by what the platform answered (CycleStats field names): accepted (新增成功,
# 修改成功), rejected as invalid (参数校验错误), refused without a reason (charged to the
# record), unanswered (network, 5xx, login: not charged), refused for the configuration.
UPLOAD_OUTCOMES = {
    "created": "created", "updated": "updated", "rejected": "uploads_rejected", "failed": "uploads_failed",
    "unanswered": "uploads_unanswered", "refused": "uploads_refused",
}
ENDPOINTS = ("login", "labels", "upload")
# An answer takes tens of milliseconds on the 5G network, seconds when the platform struggles.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_KINDS = ("cycle", "reconcile", "dispatch")
# Cycles take seconds; a nightly reconcile over a month of visits can take many minutes.
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# /healthz turns 503 when no job has finished (or progressed) for this many poll intervals.
STALE_POLLS = 3


@dataclass(frozen=True, kw_only=True)
class Health:
    ok: bool
    status: str  # ok | starting | failing | unreachable | paused | clock | stalled
    reason: str | None
    last_success_age_s: float | None
    # The HIS clock's offset from this host and the cursor's lag behind the HIS clock (s).
    his_clock_offset_s: float | None = None
    cursor_lag_s: float | None = None
    # Several institutions: each one's state (ok, or paused: why), apart from the whole above.
    institutions: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "last_success_age_s": None if self.last_success_age_s is None else round(self.last_success_age_s, 1),
            "his_clock_offset_s": self.his_clock_offset_s,
            **({"institutions": self.institutions} if self.institutions else {}),
            "cursor_lag_s": self.cursor_lag_s,
        }


class Metrics:
    """The daemon's metrics and health state; thread-safe (jobs write, scrapes read)."""

    def __init__(
        self,
        *,
        store: Store,
        poll_every_s: float,
        logins: Callable[[], int] = lambda: 0,
        progress_at: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        institutions: Sequence[str] = (DEFAULT_INSTITUTION,),
    ) -> None:
        self.store = store
        # The codes of the settings: figures per institution carry an `institution` label.
        self.institutions = tuple(institutions)
        self.stale_after_s = STALE_POLLS * poll_every_s
        self._logins = logins
        self._progress_at = progress_at
        self._clock = clock
        self._lock = threading.Lock()
        self._running_since: float | None = None
        self._last_ok_at: float | None = None
        self._last_error: tuple[str, str] | None = None  # (job kind, error)
        self._paused: str | None = None
        self._unreachable: str | None = None

        self.registry = CollectorRegistry()
        self.uploads = Counter(
            "crowd_sync_uploads",
            "Upload requests, by the platform's answer: created/updated (accepted), rejected (参数校验错误: the "
            "record is invalid), failed (refused without a reason, retried), unanswered (network, 5xx, login: "
            "nothing charged), refused (a configuration error: sending paused)",
            ["outcome"],
            registry=self.registry,
        )
        self.skipped = Counter(
            "crowd_sync_skipped", "Records not uploaded: not in the key population (no request made)",
            registry=self.registry,
        )
        self.invalid = Counter(
            "crowd_sync_invalid", "Records parked invalid, by local validation or by the platform's 参数校验错误",
            registry=self.registry,
        )
        self.latency = Histogram(
            "crowd_sync_upstream_request_duration_seconds", "How long the platform took to answer, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.his_query = Histogram(
            "crowd_sync_his_query_duration_seconds",
            "Seconds from sending his.query (one window) until its first row, or its empty answer",
            buckets=DURATION_BUCKETS, registry=self.registry,
        )
        build = Gauge(
            "crowd_sync_build_info", "The running crowd-sync: always 1", ["version", "python"], registry=self.registry
        )
        build.labels(version=__version__, python=platform.python_version()).set(1)
        self.lookups = Counter(
            "crowd_sync_label_lookups", "Label API lookups made (rybq)", registry=self.registry
        )
        self.cache_hits = Counter(
            "crowd_sync_label_cache_hits", "Key-population decisions answered from the label cache",
            registry=self.registry,
        )
        self.cycles = Counter(
            "crowd_sync_cycles", "Jobs finished, by kind and result (ok/error)", ["kind", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "crowd_sync_cycle_duration_seconds", "How long a job took, by kind", ["kind"],
            buckets=DURATION_BUCKETS, registry=self.registry,
        )
        # Every series exists from the start, so rate() and alerts see 0 instead of nothing.
        for outcome in UPLOAD_OUTCOMES:
            self.uploads.labels(outcome=outcome)
        for endpoint in ENDPOINTS:
            self.latency.labels(endpoint=endpoint)
        for kind in JOB_KINDS:
            self.duration.labels(kind=kind)
            for result in ("ok", "error"):
                self.cycles.labels(kind=kind, result=result)
        self.registry.register(_OutboxCollector(self))

    # -- fed by the daemon ----------------------------------------------------------

    def job_started(self) -> None:
        with self._lock:
            self._running_since = self._clock()

    def job_finished(self, kind: str, *, stats: CycleStats | None, error: str | None, duration_s: float) -> None:
        """Count one finished job; ``stats`` is None when it raised before returning them."""
        now = self._clock()
        if stats is not None:
            for outcome, field in UPLOAD_OUTCOMES.items():
                n = getattr(stats, field)
                if n:
                    self.uploads.labels(outcome=outcome).inc(n)
            if stats.skipped:
                self.skipped.inc(stats.skipped)
            if stats.invalid:
                self.invalid.inc(stats.invalid)
            if stats.lookups:
                self.lookups.inc(stats.lookups)
            if stats.cache_hits:
                self.cache_hits.inc(stats.cache_hits)
        failed = error is not None or (stats is not None and stats.error is not None)
        self.cycles.labels(kind=kind, result="error" if failed else "ok").inc()
        self.duration.labels(kind=kind).observe(max(0.0, duration_s))
        with self._lock:
            self._running_since = None
            if failed:
                self._last_error = (kind, error or (stats.error if stats else None) or "unknown error")
            else:
                self._last_error = None
                self._last_ok_at = now
                self._paused = stats.paused if stats is not None else None
                self._unreachable = stats.unreachable if stats is not None else None

    def upstream_answered(self, endpoint: str, seconds: float) -> None:
        """One request the platform answered (``Client.on_answer``)."""
        self.latency.labels(endpoint=endpoint).observe(max(0.0, seconds))

    def his_queried(self, seconds: float) -> None:
        """One window of his.query (``HisSource.on_query``)."""
        self.his_query.observe(max(0.0, seconds))

    # -- read by /healthz -------------------------------------------------------------

    def his_clock(self) -> dict[str, Any] | None:
        """The HIS clock as the last poll read it, brought to now (``sync.clock.current``)."""
        try:
            cursor = self.store.queue.get_cursor()
            return clock.current(
                self.store.state.get_his_clock(), cursor[0] if cursor else None,
                now_utc=datetime.now(UTC).replace(tzinfo=None),
            )
        except (sa.exc.SQLAlchemyError, SyncError, OSError) as exc:  # the answer goes out without it
            log.warning("metrics_his_clock_unreadable", error=logs.redact(f"{type(exc).__name__}: {exc}"))
            return None

    def health(self) -> Health:
        now = self._clock()
        with self._lock:
            running, last_ok, last_error, paused, unreachable = (
                self._running_since, self._last_ok_at, self._last_error, self._paused, self._unreachable
            )
        reading = self.his_clock() or {}
        figures: dict[str, Any] = {
            "his_clock_offset_s": reading.get("offset_s"), "cursor_lag_s": reading.get("cursor_lag_s"),
            "institutions": self.institution_states(),
        }
        age = None if last_ok is None else now - last_ok
        if last_error is not None:
            kind, error = last_error
            return Health(
                ok=False, status="failing", reason=f"the last {kind} failed: {error}", last_success_age_s=age, **figures
            )
        if unreachable:
            return Health(ok=False, status="unreachable", reason=unreachable, last_success_age_s=age, **figures)
        if paused:
            return Health(
                ok=False, status="paused", reason=f"sending paused by a configuration error: {paused}",
                last_success_age_s=age, **figures,
            )
        if last_ok is None:
            why = "the first cycle is still running" if running is not None else "no cycle has finished yet"
            return Health(ok=False, status="starting", reason=why, last_success_age_s=None, **figures)
        problems = reading.get("problems") or []
        if problems:
            # Polls go on, but visits wait (or the clocks disagree): nobody should take that for healthy.
            return Health(
                ok=False, status="clock", reason=f"HIS clock: {problems[0].get('message')} — {problems[0].get('fix')}",
                last_success_age_s=age, **figures,
            )
        assert age is not None
        # A long job (the nightly reconcile) keeps the service healthy while it makes progress.
        quiet = age
        if running is not None and self._progress_at is not None:
            quiet = min(age, now - self._progress_at())
        if quiet > self.stale_after_s:
            return Health(
                ok=False, status="stalled",
                reason=f"no cycle finished or progressed for {quiet:.0f} s "
                f"(limit {self.stale_after_s:.0f} s = {STALE_POLLS} x schedule.poll_every_s)",
                last_success_age_s=age, **figures,
            )
        return Health(ok=True, status="ok", reason=None, last_success_age_s=age, **figures)

    def institution_states(self) -> dict[str, str] | None:
        """Several institutions: ``ok`` or ``paused: why`` for each (None with one)."""
        if len(self.institutions) < 2:
            return None
        try:
            return {
                code: f"paused: {error.get('message')}" if (error := self.store.state.get_config_error(code)) else "ok"
                for code in self.institutions
            }
        except (sa.exc.SQLAlchemyError, SyncError, OSError):
            return None

    def paused_by_last_job(self) -> bool:
        with self._lock:
            return bool(self._paused)

    def logins(self) -> int:
        return int(self._logins())


class _OutboxCollector(Collector):
    """Outbox figures computed at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        logins = CounterMetricFamily(
            "crowd_sync_logins", "Logins made to the platform by this process (each one replaces the previous token)"
        )
        logins.add_metric([], self._m.logins())
        yield logins
        up = GaugeMetricFamily("crowd_sync_outbox_up", "1 if the outbox database answered this scrape")
        config_error = GaugeMetricFamily(
            "crowd_sync_config_error", "1 while a configuration error holds sending back (see `crowd-sync status`)"
        )
        now = datetime.now(UTC).replace(tzinfo=None)
        try:
            summary = self._m.store.summary(now=now, institutions=self._m.institutions)
        except (sa.exc.SQLAlchemyError, SyncError, OSError) as exc:  # a scrape answers even when the database does not
            log.warning("metrics_outbox_unreadable", error=logs.redact(f"{type(exc).__name__}: {exc}"))
            up.add_metric([], 0)
            config_error.add_metric([], 1 if self._m.paused_by_last_job() else 0)
            yield up
            yield config_error
            return
        up.add_metric([], 1)
        yield up
        config_error.add_metric([], 1 if summary.config_error else 0)
        yield config_error
        down = summary.platform_down
        unreachable = GaugeMetricFamily(
            "crowd_sync_platform_unreachable",
            "1 while the platform is unreachable and sending waits for it (see `crowd-sync status`)",
        )
        unreachable.add_metric([], 1 if down else 0)
        yield unreachable
        since = GaugeMetricFamily(
            "crowd_sync_platform_unreachable_since_timestamp_seconds",
            "Unix time since when the platform has been unreachable; 0 while it answers",
        )
        since.add_metric([], _unix(down.get("since")) if down else 0.0)
        yield since
        records = GaugeMetricFamily("crowd_sync_records", "Outbox records by status", labels=["status"])
        for status in Status:
            records.add_metric([status.value], summary.counts.get(status.value, 0))
        yield records
        # Each institution apart (a county medical alliance): its records, and its own pause.
        apart = GaugeMetricFamily(
            "crowd_sync_institution_records", "Outbox records by institution and status", labels=["institution", "status"]
        )
        paused = GaugeMetricFamily(
            "crowd_sync_institution_config_error",
            "1 while a configuration error (its key, its account) holds this institution's sending back",
            labels=["institution"],
        )
        for code, mine in summary.institutions.items():
            for status in Status:
                apart.add_metric([code, status.value], mine["counts"].get(status.value, 0))
            paused.add_metric([code], 1 if mine.get("config_error") else 0)
        yield apart
        yield paused
        oldest = summary.oldest_pending_at
        age = GaugeMetricFamily(
            "crowd_sync_oldest_pending_age_seconds",
            "How long the oldest pending or failed record has been waiting; 0 when none waits",
        )
        age.add_metric([], max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
        yield age
        last = summary.last_sent_at
        sent = GaugeMetricFamily(
            "crowd_sync_last_upload_timestamp_seconds",
            "Unix time of the last record the platform accepted; 0 when none yet",
        )
        sent.add_metric([], last.replace(tzinfo=UTC).timestamp() if last else 0.0)
        yield sent
        reading = self._m.his_clock()
        if reading is not None:
            if reading.get("offset_s") is not None:
                offset = GaugeMetricFamily(
                    "crowd_sync_his_clock_offset_seconds",
                    "The HIS database's clock minus this host's, at the last poll (0 when they agree)",
                )
                offset.add_metric([], float(reading["offset_s"]))
                yield offset
            if reading.get("cursor_lag_s") is not None:
                lag = GaugeMetricFamily(
                    "crowd_sync_cursor_lag_seconds",
                    "How far the poll cursor is behind the HIS clock (negative: ahead of it, rewound at the next poll)",
                )
                lag.add_metric([], float(reading["cursor_lag_s"]))
                yield lag
            problems = GaugeMetricFamily(
                "crowd_sync_his_clock_problems", "HIS clock problems found at the last poll (see `crowd-sync check`)"
            )
            problems.add_metric([], len(reading.get("problems") or []))
            yield problems


def _unix(iso_utc: Any) -> float:
    try:
        return datetime.fromisoformat(str(iso_utc)).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


# -- the HTTP server -------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:9464`` -> (``127.0.0.1``, 9464); ``[::1]:9464`` -> (``::1``, 9464)."""
    host, _, port = listen.strip().rpartition(":")
    return host.strip("[]"), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics: Metrics


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # A client that connects and says nothing must not hold a thread forever.
    timeout = 30

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(self.server.metrics.registry), content_type)
        elif path == "/healthz":
            h = self.server.metrics.health()
            body = h.as_dict()
            if body["reason"]:
                body["reason"] = logs.redact(str(body["reason"]))
            text = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self._reply(200 if h.ok else 503, text, "application/json; charset=utf-8")
        elif path == "/":
            self._reply(200, b"crowd-sync: /metrics /healthz\n", "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the service log


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``metrics.listen``, served from a daemon thread."""

    def __init__(self, metrics: Metrics, listen: str) -> None:
        self.metrics = metrics
        self.listen = listen
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        host, port = parse_listen(self.listen)
        server_cls = _Server6 if ":" in host else _Server
        try:
            server = server_cls((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"metrics.listen {self.listen}: 无法监听 / cannot listen ({exc.strerror or exc})",
                hint="换一个本机空闲端口，或设 metrics.listen: null 关闭 / choose a free port on an address of this host, or set "
                "metrics.listen: null to turn metrics off",
            ) from None
        server.metrics = self.metrics
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics_listening", listen=f"{host}:{self.port}", paths="/metrics /healthz")
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
