"""Exit codes (product contract): what the caller (systemd, cron, a person) should do next.

0 all due work done; 3 the run finished but records are left failed, invalid or dead;
2 configuration error (bad settings, rejected credentials, another instance running):
fix something, retrying will not help; 75 temporarily unavailable (HIS, outbox or
platform unreachable: EX_TEMPFAIL, try again later); 1 unexpected error.
"""

from __future__ import annotations

from sync.errors import ConfigError, SyncError, TransientError
from sync.outbox.model import Status, Summary

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_LEFT_OVER = 3
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL (sysexits.h): the unit's Restart= retries it, cron may run again later
EXIT_PIPE = 141  # 128 + SIGPIPE, as any command whose reader went away (`crowd-sync status | head -1`)

# Left for a person: a run that leaves these ends with EXIT_LEFT_OVER.
_LEFT_OVER = (Status.FAILED, Status.INVALID, Status.DEAD)


def exit_code(exc: SyncError) -> int:
    """The exit code an error ends a command with."""
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG  # fix the settings or the environment: retrying will not help
    if isinstance(exc, TransientError):
        return EXIT_TEMPFAIL  # a database or the platform cannot be reached now: try again later
    return EXIT_UNEXPECTED


def exit_for(summary: Summary) -> int:
    """The exit code of a run that finished, from the outbox it left behind."""
    if summary.config_error:
        return EXIT_CONFIG
    if summary.platform_down:
        return EXIT_TEMPFAIL
    left = sum(summary.counts.get(s.value, 0) for s in _LEFT_OVER)
    return EXIT_LEFT_OVER if left else EXIT_OK
