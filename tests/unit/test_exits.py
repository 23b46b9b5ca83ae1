"""Exit codes as the product contract gives them: what systemd, cron or a person should do next."""

from __future__ import annotations

from typing import Any

import pytest

from sync.errors import AuthError, ConfigError, PlatformUnavailable, SyncError, TransientError
from sync.exits import EXIT_CONFIG, EXIT_LEFT_OVER, EXIT_OK, EXIT_TEMPFAIL, EXIT_UNEXPECTED, exit_code, exit_for
from sync.outbox.model import Status, Summary


def summary(**over: Any) -> Summary:
    values: dict[str, Any] = {
        "counts": {s.value: 0 for s in Status}, "oldest_pending_at": None, "last_sent_at": None, "last_run": None,
        "last_successful_run": None, "config_error": None, "leased": 0,
    }
    values.update(over)
    return Summary(**values)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("bad app key"), EXIT_CONFIG),
        (TransientError("HIS unreachable"), EXIT_TEMPFAIL),
        (PlatformUnavailable("platform down"), EXIT_TEMPFAIL),
        (AuthError("token refused"), EXIT_UNEXPECTED),
        (SyncError("something else"), EXIT_UNEXPECTED),
    ],
)
def test_an_error_ends_a_command_with_what_the_caller_should_do(exc: SyncError, code: int) -> None:
    assert exit_code(exc) == code


def test_a_finished_run_says_what_it_left_behind() -> None:
    assert exit_for(summary()) == EXIT_OK
    assert exit_for(summary(counts={"pending": 5, "sent": 3, "skipped": 2})) == EXIT_OK
    for left in ("failed", "invalid", "dead"):
        assert exit_for(summary(counts={left: 1})) == EXIT_LEFT_OVER
    # Sending held back outranks records left over: fix the configuration first.
    paused = summary(counts={"failed": 1}, config_error={"message": "app key refused"})
    assert exit_for(paused) == EXIT_CONFIG
    assert exit_for(summary(counts={"failed": 1}, platform_down={"since": "2026-03-01T08:00:00"})) == EXIT_TEMPFAIL
