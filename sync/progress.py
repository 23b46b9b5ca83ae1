"""Where a run stands, for people: the live display on a terminal, a progress line in the
log every few seconds otherwise, and systemd's ``STATUS=``.

The pipeline writes to one ``Progress`` (a few attribute updates per batch, never per
record: the back-fill's hot path stays as it was) and reads nothing from it; the
displays read snapshots of it from threads of their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TextIO

import structlog

from sync import localtime

log = structlog.get_logger(__name__)

KIND_NAMES = {
    "once": "轮询 poll", "cycle": "轮询 poll", "reconcile": "对账 reconcile", "dispatch": "发送 dispatch",
}


class _Counts(Protocol):
    rows_read: int
    enqueued: int
    sent: int
    failed: int
    invalid: int
    skipped: int


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """One look at a run in progress."""

    kind: str
    phase: str  # "reading" | "sending" | "starting"
    elapsed_s: float
    rows_read: int
    queued: int
    sent: int
    failed: int
    invalid: int
    skipped: int
    # Reading: the window (HIS clock) and how far into it the rows read are.
    window: tuple[datetime, datetime] | None
    position: datetime | None
    # Sending: records due when the dispatch began, and how many it has settled since.
    due: int | None
    done: int
    rate_per_s: float | None  # rows read/s while reading, records settled/s while sending
    fraction: float | None  # 0..1 of the phase, None when unknown
    eta_s: float | None

    def as_fields(self) -> dict[str, Any]:
        """The progress log line's key/value pairs."""
        fields: dict[str, Any] = {
            "kind": self.kind, "phase": self.phase, "elapsed_s": round(self.elapsed_s), "read": self.rows_read,
            "queued": self.queued, "sent": self.sent, "failed": self.failed, "invalid": self.invalid,
            "skipped": self.skipped,
        }
        if self.phase == "reading" and self.position is not None:
            fields["at"] = self.position.isoformat(" ", "seconds")
        if self.phase == "sending" and self.due is not None:
            fields["due"] = self.due
        if self.rate_per_s is not None:
            fields["rate_per_s"] = round(self.rate_per_s, 1)
        if self.fraction is not None:
            fields["percent"] = round(self.fraction * 100, 1)
        if self.eta_s is not None:
            fields["eta_s"] = round(self.eta_s)
        return fields

    def line(self) -> str:
        """One line for systemd's STATUS= while a job runs."""
        what = KIND_NAMES.get(self.kind, self.kind)
        if self.phase == "sending":
            done = f"{self.done}/{self.due}" if self.due is not None else str(self.done)
            text = f"{what}: 发送 sending {done}, sent {self.sent}, failed {self.failed}, invalid {self.invalid}"
        else:
            text = f"{what}: 读取 reading {self.rows_read} rows, queued {self.queued}"
            if self.position is not None:
                text += f", at {self.position:%Y-%m-%d %H:%M}"
        if self.fraction is not None:
            text += f" ({self.fraction:.0%}"
            text += f", ETA {human_s(self.eta_s)})" if self.eta_s is not None else ")"
        return text


def human_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """The run in progress, as the pipeline last told it. ``at`` / ``tick()``: the last moment
    work moved (a batch recorded, an upload answered), which feeds the systemd watchdog."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.at = clock()
        self._kind: str | None = None
        self._stats: _Counts | None = None
        self._started = 0.0
        self._phase = "starting"
        self._phase_started = 0.0
        self._window: tuple[datetime, datetime] | None = None
        self._position: datetime | None = None
        self._read_at_phase = 0
        self._due: int | None = None
        self._done_at_phase = 0
        self._last: Snapshot | None = None

    def tick(self) -> None:
        self.at = self._clock()

    # -- written by the pipeline ----------------------------------------------------------
    def start(self, kind: str, stats: _Counts) -> None:
        with self._lock:
            self._kind, self._stats = kind, stats
            self._started = self._phase_started = self._clock()
            self._phase, self._window, self._position, self._due = "starting", None, None, None

    def reading(self, since: datetime, until: datetime) -> None:
        with self._lock:
            self._phase, self._phase_started = "reading", self._clock()
            self._window, self._position = (since, until), since
            self._read_at_phase = self._stats.rows_read if self._stats else 0

    def read_up_to(self, changed_at: datetime | None) -> None:
        """The newest change time (HIS clock) among the rows read so far; once per batch."""
        if changed_at is not None:
            self._position = changed_at

    def sending(self, due: int) -> None:
        with self._lock:
            self._phase, self._phase_started, self._due = "sending", self._clock(), due
            self._done_at_phase = self._settled()

    def finish(self) -> None:
        last = self.snapshot()
        with self._lock:
            self._last = last
            self._kind = None
            self._stats = None

    def last(self) -> Snapshot | None:
        """The run in progress, else where the last run ended."""
        return self.snapshot() or self._last

    def _settled(self) -> int:
        st = self._stats
        return 0 if st is None else st.sent + st.failed + st.invalid + st.skipped

    # -- read by the displays ----------------------------------------------------------------
    def snapshot(self) -> Snapshot | None:
        """Where the run stands; None when no run is going on."""
        with self._lock:
            st, kind = self._stats, self._kind
            if st is None or kind is None:
                return None
            now = self._clock()
            elapsed, in_phase = now - self._started, max(now - self._phase_started, 1e-6)
            done = self._settled() - self._done_at_phase if self._phase == "sending" else 0
            rate: float | None = None
            fraction: float | None = None
            eta: float | None = None
            if self._phase == "reading":
                rate = (st.rows_read - self._read_at_phase) / in_phase
                if self._window is not None and self._position is not None:
                    span = (self._window[1] - self._window[0]).total_seconds()
                    if span > 0:
                        fraction = min(1.0, max(0.0, (self._position - self._window[0]).total_seconds() / span))
                if fraction:
                    eta = in_phase * (1 - fraction) / fraction
            elif self._phase == "sending":
                rate = done / in_phase
                if self._due:
                    fraction = min(1.0, done / self._due)
                    if rate > 0:
                        eta = max(0, self._due - done) / rate
            return Snapshot(
                kind=kind, phase=self._phase, elapsed_s=elapsed, rows_read=st.rows_read, queued=st.enqueued,
                sent=st.sent, failed=st.failed, invalid=st.invalid, skipped=st.skipped, window=self._window,
                position=self._position, due=self._due, done=done, rate_per_s=rate, fraction=fraction, eta_s=eta,
            )


class Ticker:
    """Every ``every_s`` while a run lasts longer than that: one progress log line (the
    terminal's live display takes its place on a terminal), and ``also(snapshot)``
    (systemd's STATUS= in the service)."""

    def __init__(
        self, progress: Progress, *, every_s: float, log_lines: bool = True,
        also: Callable[[Snapshot], None] | None = None,
    ) -> None:
        self._progress = progress
        self._every = every_s
        self._log = log_lines
        self._also = also
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Ticker:
        if self._every > 0 and (self._log or self._also is not None):
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            snap = self._progress.snapshot()
            if snap is None or snap.elapsed_s < self._every:
                continue  # short runs say nothing: their summary line follows at once
            if self._log:
                log.info("progress", **snap.as_fields())
            if self._also is not None:
                try:
                    self._also(snap)
                except Exception:  # a display must never stop the work
                    log.warning("progress_display_failed", exc_info=True)


class LiveDisplay:
    """The live display of `once` and `reconcile` on a terminal (rich): rows read, queued,
    sent, the rate and the time left; log lines scroll above it."""

    def __init__(self, progress: Progress, stream: TextIO, *, refresh_s: float = 0.25) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._source = progress
        self._refresh = refresh_s
        self._console = Console(file=stream, highlight=False)
        self._bars = RichProgress(
            TextColumn("{task.description}"), BarColumn(bar_width=28), TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
            console=self._console, transient=False, redirect_stderr=True, redirect_stdout=False,
            refresh_per_second=max(1, round(1 / refresh_s)),
        )
        self._reading: Any = None
        self._sending: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LiveDisplay:
        self._bars.start()
        self._thread = threading.Thread(target=self._run, name="live-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._update(final=True)
        self._bars.stop()

    def _run(self) -> None:
        while not self._stop.wait(self._refresh):
            self._update()

    def _update(self, *, final: bool = False) -> None:
        snap = self._source.last() if final else self._source.snapshot()
        if snap is None:
            return
        if snap.phase == "reading" or (snap.phase == "sending" and snap.rows_read):
            at = f" · HIS {snap.position:%Y-%m-%d %H:%M}" if snap.position is not None else ""
            rate = f" · {snap.rate_per_s:,.0f} rows/s" if snap.rate_per_s and snap.phase == "reading" else ""
            detail = f"read {snap.rows_read:,} · queued {snap.queued:,}{at}{rate}"
            eta = f" · ETA {human_s(snap.eta_s)}" if snap.eta_s is not None and snap.phase == "reading" else ""
            if self._reading is None:
                self._reading = self._bars.add_task("读取 HIS  reading", total=100.0, detail="")
            done = 100.0 if snap.phase == "sending" else (snap.fraction or 0.0) * 100
            self._bars.update(self._reading, completed=done, detail=detail + eta)
        if snap.phase == "sending":
            total = float(snap.due) if snap.due else None
            if self._sending is None:
                self._sending = self._bars.add_task("发送 sending", total=total, detail="")
            rate = f" · {snap.rate_per_s:,.1f}/s" if snap.rate_per_s else ""
            eta = f" · ETA {human_s(snap.eta_s)}" if snap.eta_s is not None else ""
            detail = (
                f"sent {snap.sent:,} · failed {snap.failed:,} · invalid {snap.invalid:,} · skipped {snap.skipped:,}"
                f"{rate}{eta}"
            )
            self._bars.update(self._sending, total=total, completed=float(snap.done), detail=detail)


def status_line(
    *, last: Any, waiting: int, paused: str | None, unreachable: str | None, next_poll: datetime | None,
) -> str:
    """systemd's STATUS= after a job: what the last cycle did, what waits, pause or outage."""
    parts: list[str] = []
    if last is not None:
        stamp = localtime.now().strftime("%H:%M:%S%z")
        parts.append(
            f"上次 last {stamp}: read {last.rows_read}, sent {last.sent}, failed {last.failed}, "
            f"invalid {last.invalid}, skipped {last.skipped}"
        )
    parts.append(f"待发送 waiting {waiting}")
    if paused:
        parts.append(f"已暂停 PAUSED (configuration): {paused}")
    if unreachable:
        parts.append(f"平台不可达 {unreachable}")
    if next_poll is not None:
        parts.append(f"下次轮询 next poll {localtime.text(next_poll)}")
    return " · ".join(parts)[:1000]
