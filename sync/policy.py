"""Pure retry policy: when to try a failed record again, and when to probe a platform that is down."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

_RNG = random.Random()

# A record whose upload crashes crowd-sync this many times (not a platform answer: an
# exception where none should be) is parked invalid with the exception's text.
MAX_UPLOAD_CRASHES = 3

# A platform that stopped answering is probed soon (an outage is often a blip), then less
# often, but at least once a minute: a probe is a single request, and the backlog should
# start draining within a minute of the platform coming back.
PROBE_FIRST_S = 5.0
PROBE_MAX_S = 60.0


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    first_delay_s: float
    max_delay_s: float

    def delay_s(self, attempts: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, never above max_delay_s.

        ``attempts`` counts failures so far including this one (1 for the first failure).
        The fixed half keeps retries from hammering a platform that is down; the random
        half spreads a backlog so it does not come back as one burst.
        """
        exp = min(max(attempts - 1, 0), 30)
        base = min(self.max_delay_s, self.first_delay_s * (2.0**exp))
        r = (rng or _RNG).random()
        return min(self.max_delay_s, base / 2 + r * base / 2)

    def next_attempt_at(self, now: datetime, attempts: int, rng: random.Random | None = None) -> datetime:
        return now + timedelta(seconds=self.delay_s(attempts, rng))

    def probes(self) -> RetryPolicy:
        """The back-off between probes of an unreachable platform (``attempts`` = failed probes + 1)."""
        first = min(self.first_delay_s, PROBE_FIRST_S)
        return RetryPolicy(first_delay_s=first, max_delay_s=max(first, min(self.max_delay_s, PROBE_MAX_S)))
