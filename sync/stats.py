"""What one run did, and when work last made progress.

``CycleStats`` is counted by intake and dispatch, recorded in ``sync_run``, printed by
``once`` and ``reconcile`` and exported as metrics; ``Progress`` feeds the systemd
watchdog and /healthz while a long run goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any


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
    duration_s: float = 0.0
    paused: str | None = None
    unreachable: str | None = None  # "platform unreachable since …" while sending waits for it
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Progress:
    """Last time the pipeline made progress (a batch recorded, an upload answered)."""

    at: float = field(default_factory=time.monotonic)

    def tick(self) -> None:
        self.at = time.monotonic()
