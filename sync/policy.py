"""Pure retry policy: when to try a failed record again, and when to give up."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

_RNG = random.Random()

# A record whose upload crashes crowd-sync this many times (not a platform answer: an
# exception where none should be) is parked invalid with the exception's text.
MAX_UPLOAD_CRASHES = 3


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    first_delay_s: float
    max_delay_s: float
    give_up_after_h: float
    max_generic_attempts: int

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

    def gives_up(
        self, *, now: datetime, first_failed_at: datetime | None, generic_failures: int, generic: bool
    ) -> bool:
        """True when a record should go `dead` after this failure.

        Transient failures give up only after ``give_up_after_h`` of failing; the platform's
        bare 中间请求异常 (an error it does not explain) after ``max_generic_attempts``.
        """
        if generic and generic_failures + 1 >= self.max_generic_attempts:
            return True
        started = first_failed_at or now
        return now - started >= timedelta(hours=self.give_up_after_h)
