"""How a run in progress is shown: the live display on a terminal, a progress line in the
log every few seconds otherwise, and systemd's ``STATUS=``; they read ``sync.stats.Progress``
from threads of their own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TextIO

import structlog

from sync import localtime
from sync.stats import CycleStats, Progress, Snapshot, human_s

log = structlog.get_logger(__name__)


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


def progress_display(progress: Progress, *, every_s: float) -> contextlib.AbstractContextManager[None]:
    """While ``once`` or ``reconcile`` runs: the live display on a terminal (stderr), else a
    progress log line every ``every_s`` seconds."""

    @contextlib.contextmanager
    def shown() -> Iterator[None]:
        if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
            with LiveDisplay(progress, sys.stderr):
                yield
            return
        ticker = Ticker(progress, every_s=every_s).start()
        try:
            yield
        finally:
            ticker.stop()

    return shown()


def summary_line(stats: CycleStats) -> str:
    """The one-line summary of once and reconcile, in both languages."""
    return (
        f"读取 {stats.rows_read}，入队 {stats.enqueued}，已发送 {stats.sent}（新增 {stats.created}，修改 {stats.updated}），"
        f"失败 {stats.failed}，不合规 {stats.invalid}，非重点人群 {stats.skipped}，放弃 {stats.dead} / "
        f"read {stats.rows_read}, enqueued {stats.enqueued}, sent {stats.sent} "
        f"(created {stats.created}, updated {stats.updated}), failed {stats.failed}, "
        f"invalid {stats.invalid}, skipped {stats.skipped}, dead {stats.dead}, {stats.duration_s:.1f}s"
    )
