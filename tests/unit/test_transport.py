"""The HTTP side of the client: the rate limit (the deadline is exercised in test_client against a trickling server)."""

from __future__ import annotations

import pytest

from sync.errors import TransientError
from sync.upstream.transport import RateLimiter


def test_rate_limiter_never_exceeds_the_rate_by_more_than_one() -> None:
    now = [0.0]
    sent: list[float] = []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = RateLimiter(10, clock=lambda: now[0], sleep=sleep)
    for _ in range(100):
        limiter.acquire()
        sent.append(now[0])
    for t in sent:
        assert sum(1 for s in sent if t <= s < t + 1) <= 11
    assert sent[-1] == pytest.approx(9.9)
    with pytest.raises(TransientError):
        limiter.acquire(deadline=now[0] + 0.01)
