"""HIS rows -> outbox values, batch by batch; for a large window, in a second process.

Building a row's payload (every rule of the document, the JSON, its hash: ``intake``)
costs about as much CPU as the database driver's reading of it. In one process both
share one core under the GIL. Past the first batches of a window (a back-fill, a
reconcile; a regular poll rarely gets there) the batches are built in one worker
process, so that the driver's reading, the building and the outbox's writing use both
cores of a small server. The worker is pure: HIS rows in, ``Incoming`` values out, in
order. The cursor, the transaction, the crash points and the instance lock stay in the
process that reads. A worker that cannot start or dies is replaced by building here,
from the rows still held: nothing read is lost.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
import types
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from datetime import date
from typing import Any

import structlog

from sync import intake
from sync.outbox.model import Incoming
from sync.settings import KeyCrowd

log = structlog.get_logger(__name__)

# Rows of a window built in the reading process before the worker takes over: a regular
# poll (a few hundred rows) never starts a process.
INLINE_ROWS = 5000
# Whether windows use a worker: None, when this machine has more than one CPU.
WORKER: bool | None = None
# Batches handed to the worker and not yet taken back: one being built, one waiting.
IN_FLIGHT = 2


def build_batch(
    rows: Sequence[dict[str, Any]], key_crowd: KeyCrowd, today: date, institutions: tuple[str, ...]
) -> list[Incoming]:
    """``intake.incoming`` of every row, in order (what the worker runs)."""
    return [intake.incoming(row, key_crowd=key_crowd, today=today, institutions=institutions) for row in rows]


def _watch_parent(parent: int) -> None:
    """In the worker: leave when the reading process is gone (killed, it cannot say so)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@contextmanager
def _without_main() -> Iterator[None]:
    """A bare ``__main__`` while a worker process is spawned, so that it imports only what
    its tasks need."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class _Built:
    """A batch built in the reading process: its result at once."""

    def __init__(self, items: list[Incoming]) -> None:
        self._items = items

    def result(self) -> list[Incoming]:
        return self._items


class _Sent:
    """A batch handed to the worker: its rows are kept until the result is taken, so that a
    worker lost on the way is made good by building them here."""

    def __init__(self, future: Future[list[Incoming]], rows: list[dict[str, Any]], builder: Builder) -> None:
        self._future = future
        self._rows = rows
        self._builder = builder

    def result(self) -> list[Incoming]:
        try:
            return self._future.result()
        except (BrokenProcessPool, CancelledError):
            self._builder.lost()
            return self._builder.here(self._rows)


class Builder:
    """Builds the batches of one window, in order: here at first, then, once more than
    ``INLINE_ROWS`` rows came, in a worker process (when this machine has more than one CPU)."""

    def __init__(
        self, *, key_crowd: KeyCrowd, today: date, institutions: tuple[str, ...], worker: bool | None = None
    ) -> None:
        self._args = (key_crowd, today, institutions)
        if worker is None:
            worker = (os.cpu_count() or 1) > 1 if WORKER is None else WORKER
        self._worker = worker
        self._rows_seen = 0
        self._pool: ProcessPoolExecutor | None = None

    @property
    def in_flight(self) -> int:
        """How many built batches may stay untaken: more only while the worker builds."""
        return IN_FLIGHT if self._pool is not None else 0

    def submit(self, rows: list[dict[str, Any]]) -> _Built | _Sent:
        """Start building a batch; ``result()`` of what is returned gives its ``Incoming`` values."""
        self._rows_seen += len(rows)
        if self._worker and self._pool is None and self._rows_seen > INLINE_ROWS:
            self._start()
        if self._pool is not None:
            try:
                return _Sent(self._pool.submit(build_batch, rows, *self._args), rows, self)
            except (BrokenProcessPool, RuntimeError):
                self.lost()
        return _Built(self.here(rows))

    def here(self, rows: Sequence[dict[str, Any]]) -> list[Incoming]:
        return build_batch(rows, *self._args)

    def _start(self) -> None:
        pool: ProcessPoolExecutor | None = None
        try:
            pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_watch_parent, initargs=(os.getpid(),),
            )
            # The worker process starts here, with the first task. multiprocessing's spawn
            # would import this process's __main__ in it (crowd-sync's command: the whole
            # CLI, SQLAlchemy, requests, the drivers: twice the memory); it needs intake only.
            with _without_main():
                pool.submit(int).result()
            self._pool = pool
        except Exception as exc:  # noqa: BLE001 - whatever stops a process (no sem_open, a sandbox): build here
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            self._worker = False
            log.warning("build_worker_unavailable", error=repr(exc),
                        fix="nothing to do: the rows are built in this process (one core)")

    def lost(self) -> None:
        """The worker died or could not start: build here from now on."""
        if self._pool is None:
            return
        log.warning("build_worker_lost", fix="nothing to do: the rest of the window is built in this process")
        self._worker = False
        pool, self._pool = self._pool, None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
