"""The exception tree, sorted by what the caller should do.

- ConfigError: stop and tell the operator what to fix (exit 2). Retrying is useless.
- TransientError: try again later. Its subclass PlatformUnavailable says the platform
  (or the way to it) is not working at all: network errors, timeouts, 5xx, HTML pages,
  unreadable answers, failed logins. That is no record's fault: sending pauses.
- AuthError: the token was refused; log in again once, then retry.
- InvalidRecord: this one record is wrong; park it with its reasons, go on with the rest.

Every error carries a plain-language ``hint`` (the fix) besides its message.
"""

from __future__ import annotations


class SyncError(Exception):
    """Root of every error crowd-sync raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        http_status: int | None = None,
        platform_message: str | None = None,
        lsh: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.http_status = http_status
        self.platform_message = platform_message
        self.lsh = lsh

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} — {self.hint}"
        return self.message


class ConfigError(SyncError):
    """Settings, credentials or environment are wrong: nothing will work until fixed."""

    def __init__(
        self, message: str, *, problems: list[str] | None = None, hint: str = "",
        http_status: int | None = None, platform_message: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, http_status=http_status, platform_message=platform_message)
        self.problems: list[str] = list(problems or [])

    def __str__(self) -> str:
        text = super().__str__()
        if self.problems:
            text += "\n" + "\n".join(f"  - {p}" for p in self.problems)
        return text


class TransientError(SyncError):
    """Network or platform trouble that is expected to pass: retry later."""

    def __init__(
        self, message: str, *, generic: bool = False, hint: str = "",
        http_status: int | None = None, platform_message: str | None = None, lsh: str | None = None,
    ) -> None:
        super().__init__(
            message, hint=hint, http_status=http_status, platform_message=platform_message, lsh=lsh
        )
        # The platform's catch-all 中间请求异常: retried, but only a bounded number of times.
        self.generic = generic


class PlatformUnavailable(TransientError):
    """The platform or the network to it is not working: nothing is known about any record.

    Dispatch pauses (one probe per backoff step) instead of charging the records it was
    sending; see ``sync.circuit``.
    """


class AuthError(SyncError):
    """The access token was refused (expired, or pushed out by another login)."""


class InvalidRecord(SyncError):
    """One record breaks the document's rules; ``violations`` lists each broken rule."""

    def __init__(
        self, message: str, *, violations: list[str] | None = None, hint: str = "",
        http_status: int | None = None, platform_message: str | None = None, lsh: str | None = None,
    ) -> None:
        super().__init__(
            message, hint=hint, http_status=http_status, platform_message=platform_message, lsh=lsh
        )
        self.violations: list[str] = list(violations or [])


def platform_said(exc: SyncError) -> str | None:
    """What the platform answered, when the error's message does not already quote it."""
    if exc.platform_message and exc.platform_message not in exc.message:
        return exc.platform_message
    return None


def describe(exc: SyncError) -> str:
    """The operator's text of an error, on one line: what went wrong, what the platform
    said (when the message does not quote it), and the fix."""
    text = exc.message
    said = platform_said(exc)
    if said:
        text += f" [platform: {said}]"
    if exc.hint:
        text += f" — {exc.hint}"
    return text
