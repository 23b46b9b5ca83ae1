"""Sending for every institution of the settings (a county medical alliance, 医共体).

Each institution has its own app key and account ("每个对接机构都有自己的hie_app_key"), so
each is sent through its own client (its own token, renewed by its own single flight) by a
``Dispatcher`` of its own, whose circuit pauses that institution alone when its key or
password is refused (FAQ 14 included): the others go on. What the platform allows is
shared: one pool of ``upstream.concurrency`` uploads, one rate limit (the clients' shared
limiter, built in ``app``), and one writer of outcomes. An unreachable platform is one
fact for all (``platform_down``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from sync.circuit import Circuit
from sync.dispatch import Dispatcher
from sync.outbox.store import Store
from sync.outcomes import Outcomes
from sync.policy import RetryPolicy
from sync.settings import Settings
from sync.stats import CycleStats, Progress
from sync.upstream.client import Client


class Routes:
    """One dispatcher per institution, sharing the pool and the writer of outcomes."""

    def __init__(
        self, settings: Settings, *, store: Store, clients: Mapping[str, Client], owner: str,
        clock: Callable[[], datetime], sole_sender: bool, progress: Progress, stop: threading.Event,
    ) -> None:
        self._store = store
        self._clock = clock
        self._stop = stop
        self.codes = tuple(m.code for m in settings.members)
        # Rows of an institution the settings do not list: with one institution they can only
        # come from an earlier configuration (checked once); with several, also from a retry.
        self._strays_checked = False
        policy = RetryPolicy(first_delay_s=settings.retry.first_delay_s, max_delay_s=settings.retry.max_delay_s)
        pool = ThreadPoolExecutor(max_workers=settings.upstream.concurrency, thread_name_prefix="upload")
        outcomes = Outcomes(store, policy=policy, max_generic_attempts=settings.retry.max_generic_attempts, clock=clock)
        self.dispatchers = {
            code: Dispatcher(
                settings, store=store, client=clients[code], owner=owner, clock=clock, sole_sender=sole_sender,
                progress=progress, stop=stop, institution=code, pool=pool, outcomes=outcomes,
            )
            for code in self.codes
        }

    @property
    def clients(self) -> list[Client]:
        """Each institution's platform client, the first institution's first."""
        return [d.client for d in self.dispatchers.values()]

    @property
    def circuits(self) -> list[Circuit]:
        return [d.circuit for d in self.dispatchers.values()]

    @property
    def next_probe_at(self) -> datetime | None:
        """While the platform is unreachable: when to probe it next (the earliest of any institution)."""
        due = [c.next_probe_at for c in self.circuits if c.next_probe_at is not None]
        return min(due) if due else None

    def probe_due(self, now: datetime | None = None) -> bool:
        return any(c.probe_due(now) for c in self.circuits)

    def dispatch(self, stats: CycleStats, *, reading_done: threading.Event | None = None) -> None:
        """Send what is due, one institution after the other (each keeps the shared pool busy);
        what holds one back is noted per institution in ``stats.paused``. ``reading_done``: a
        window is still being read beside this dispatch (see ``Dispatcher.dispatch``)."""
        if len(self.codes) > 1 or not self._strays_checked:
            stats.invalid += self._store.queue.park_unrouted(self.codes, now=self._clock())
            self._strays_checked = True
        paused: list[str] = []
        for code, dispatcher in self.dispatchers.items():
            if self._stop.is_set():
                break
            stats.paused = None
            dispatcher.dispatch(stats, reading_done=reading_done)
            if stats.paused:
                paused.append(stats.paused if len(self.codes) == 1 else f"{code}: {stats.paused}")
        stats.paused = "; ".join(paused) or None

    def close(self, *, wait_s: float = 10.0) -> None:
        """The pool and the writer are shared: closing one dispatcher closes them for all."""
        next(iter(self.dispatchers.values())).close(wait_s=wait_s)
