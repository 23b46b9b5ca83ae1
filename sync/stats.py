"""What one run did, and when work last made progress.

``CycleStats`` is counted by intake and dispatch, recorded in ``sync_run``, printed by
``once`` and ``reconcile`` and exported as metrics. ``Progress`` is where the run stands:
the pipeline writes to it (a few attribute updates per batch, never per record: the
back-fill's hot path stays as it was); the systemd watchdog, /healthz and the displays of
``sync.views.progress`` (the live display, progress log lines, STATUS=) read it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Protocol


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
    # Upload requests that did not end in 新增成功/修改成功 (metrics): the record's fault
    # (参数校验错误), unexplained refusals, the platform's faults, configuration refusals.
    uploads_rejected: int = 0
    uploads_failed: int = 0
    uploads_unanswered: int = 0
    uploads_refused: int = 0
    duration_s: float = 0.0
    paused: str | None = None
    unreachable: str | None = None  # "platform unreachable since …" while sending waits for it
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(self, other: CycleStats) -> None:
        """Count ``other``'s work in this run too (a part of the run kept its own figures)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "duration_s":
                continue
            if isinstance(mine, int) and isinstance(theirs, int):
                setattr(self, f.name, mine + theirs)
            elif theirs is not None:
                setattr(self, f.name, theirs)


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
