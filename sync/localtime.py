"""Pure: one clock for people.

The outbox stores naive UTC; everything shown to a person (status, failures, show,
check, report, log lines) is in ``schedule.timezone`` with its offset, e.g.
``2026-11-05 14:02:03+08:00``. The HIS's own times (``source_changed_at``, the cursor)
are wall times of ``his.timezone`` and are shown with that zone's offset.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

# The zone of log lines and of texts built where no settings are at hand; set by
# ``configure`` from schedule.timezone (until then: this host's own zone).
_zone: tzinfo | None = None


def configure(zone: str | tzinfo | None) -> None:
    """The zone people read times in (``schedule.timezone``); None: this host's zone."""
    global _zone
    _zone = ZoneInfo(zone) if isinstance(zone, str) else zone


def zone() -> tzinfo:
    if _zone is not None:
        return _zone
    local = datetime.now().astimezone().tzinfo
    assert local is not None
    return local


def now() -> datetime:
    """Now, aware, in the people's zone."""
    return datetime.now(zone())


def local(value: datetime, tz: tzinfo | None = None) -> datetime:
    """An outbox time (naive UTC, or aware) in the people's zone, aware."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(tz or zone())


def text(value: datetime | str | None, tz: tzinfo | None = None, *, seconds: bool = True) -> str | None:
    """``2026-11-05 14:02:03+08:00`` for an outbox time (naive UTC, aware, or ISO text of
    either, a trailing Z allowed); None for None; text that is no time is returned as it is."""
    if value is None:
        return None
    if isinstance(value, str):
        parsed = parse(value)
        if parsed is None:
            return value
        value = parsed
    moment = local(value, tz)
    return moment.isoformat(" ", "seconds" if seconds else "minutes")


def wall(value: datetime | None, tz: tzinfo) -> str | None:
    """A wall time of ``tz`` (the HIS's ``changed_at``, the cursor) with that zone's offset."""
    if value is None:
        return None
    return value.replace(tzinfo=tz).isoformat(" ", "seconds")


def parse(value: Any) -> datetime | None:
    """An ISO text (``Z`` or an offset allowed) as a datetime; None when it is none."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        return None


def offset_text(tz: tzinfo, at: datetime | None = None) -> str:
    """The zone's offset from UTC as people write it: ``+08:00``."""
    minutes = offset_minutes(tz, at)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def offset_minutes(tz: tzinfo, at: datetime | None = None) -> int:
    """The zone's offset from UTC in minutes at ``at`` (now by default)."""
    moment = (at or datetime.now(UTC)).astimezone(tz)
    delta = moment.utcoffset()
    return 0 if delta is None else int(delta.total_seconds() // 60)
