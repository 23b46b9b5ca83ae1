"""The HIS clock, compared with this host's and with the HIS's own data.

Polling reads ``[cursor - lookback_s, HIS now - settle_delay_s)``, in the wall time the
HIS writes its ``changed_at`` in. crowd-sync asks the database for its UTC clock (not
its session's local time, which follows the server's ``time_zone``: UTC on many installs
and container images) and expresses it in ``his.timezone``, the zone the HIS writes its
datetimes in (default ``schedule.timezone``). The database's own clock stays the
reference for ``settle_delay_s``; its time zone no longer matters.

What can still go wrong, each found here and told with its cause and fix
(``crowd-sync check`` prints them as FAIL lines, the service logs each once per change,
``status`` and ``/healthz`` show the offset and the cursor's lag):

- ``skew``: the database's clock and this host's disagree (an NTP-less server, or an OS
  clock set to local time while it believes it is UTC);
- ``data_ahead``: visits are dated ahead of the HIS clock: the HIS writes a zone ahead of
  ``his.timezone`` (or those rows' times are wrong), and they wait until the clock
  catches up;
- ``data_follows_server``: the newest visits follow the database server's own clock, not
  ``his.timezone`` (the HIS fills ``changed_at`` with the database's NOW()): they wait
  hours for the poll;
- ``cursor_ahead``: the cursor is ahead of the HIS clock (the clock jumped forward and
  back, or ``his.timezone`` changed): every poll would read nothing; the poll rewinds it.

Pure: values and arithmetic only; ``ClockWatch`` is handed the I/O it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from sync.errors import SyncError
from sync.settings import zone

log = structlog.get_logger(__name__)

# Over this many seconds apart, two clocks are told to disagree (check's FAIL, the warning).
MAX_OFFSET_S = 300
# A visit settled this recently by the server's own clock, and long before the HIS clock,
# says the HIS writes the server's time: the sign of `data_follows_server`.
_RECENT_S = 15 * 60
_STALE_S = 30 * 60
# How often the service looks at the newest visits (a MAX over about a day of his.query).
PROBE_EVERY_S = 3600


def utcnow() -> datetime:
    """Outbox time: naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, kw_only=True)
class HisClock:
    """One reading of the HIS database's clock."""

    now: datetime  # naive: the HIS clock in his.timezone, what changed_at is compared with
    utc: datetime  # aware: the database's UTC clock
    server_local: datetime | None  # naive: the database session's own local time (its NOW())
    host_utc: datetime  # aware: this host's clock when the reading was taken
    zone: str  # his.timezone (or schedule.timezone)

    @property
    def offset_s(self) -> float:
        """The database's clock minus this host's, in seconds."""
        return (self.utc - self.host_utc).total_seconds()

    @property
    def server_offset_s(self) -> float | None:
        """The server's own local time minus the HIS clock: its time_zone against his.timezone."""
        if self.server_local is None:
            return None
        return (self.server_local - self.now).total_seconds()


@dataclass(frozen=True, kw_only=True)
class DataProbe:
    """What the HIS's newest visits say about the zone their times are written in."""

    newest: datetime | None  # newest changed_at not ahead of the HIS clock (plus the tolerance)
    ahead: int  # visits dated more than MAX_OFFSET_S ahead of the HIS clock (within a day)
    newest_ahead: datetime | None


@dataclass(frozen=True, kw_only=True)
class Finding:
    code: str
    message: str  # what is wrong, Chinese and English
    fix: str
    # What makes it the "same" finding for logging once per change: the offset to the minute.
    detail: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.code, self.detail


def human_offset(seconds: float) -> str:
    """``+8 h 00 min``, ``-12 min 05 s``, ``+3 s``: signed, to the second."""
    s = round(abs(seconds))
    sign = "-" if seconds < 0 and s else "+"
    if s >= 3600:  # to the nearest minute: hours apart are told in hours and minutes
        days, m = divmod(round(s / 60), 1440)
        hours, minutes = divmod(m, 60)
        return f"{sign}{days} d {hours} h {minutes:02d} min" if days else f"{sign}{hours} h {minutes:02d} min"
    minutes, s = divmod(s, 60)
    if minutes:
        return f"{sign}{minutes} min {s:02d} s"
    return f"{sign}{s} s"


def zone_name(offset_s: float) -> str:
    """A UTC offset as his.timezone takes it, to the quarter hour zones use: ``UTC``, ``+08:00``."""
    minutes = round(offset_s / 900) * 15
    if minutes == 0:
        return "UTC"
    sign = "+" if minutes > 0 else "-"
    h, m = divmod(abs(minutes), 60)
    return f"{sign}{h:02d}:{m:02d}"


def _shown(name: str) -> str:
    return name if name == "UTC" else f"UTC{name}"


def findings(clock: HisClock, probe: DataProbe | None, *, host_zone: str) -> list[Finding]:
    """Everything wrong with the HIS clock or the zone of the HIS's data; [] when all agree."""
    out: list[Finding] = []
    offset = clock.offset_s
    if abs(offset) > MAX_OFFSET_S:
        out.append(Finding(
            code="skew", detail=round(offset / 60),
            message=(
                f"HIS 数据库时钟与本机相差 {human_offset(offset)} / the HIS database's clock is {human_offset(offset)} "
                f"from this host's (HIS {clock.now:%Y-%m-%d %H:%M:%S} {clock.zone}, this host "
                f"{_wall(clock.host_utc, host_zone):%Y-%m-%d %H:%M:%S} {host_zone}): one of the two clocks is wrong, or the "
                "database server's system clock is set to local time while the system takes it for UTC"
            ),
            fix=(
                "synchronise both hosts' clocks with NTP (chrony, or w32time on Windows) and check the database "
                "server's system time zone; until then polls stop at the database's own clock"
            ),
        ))
    server = clock.server_offset_s
    if probe is not None and probe.ahead:
        assert probe.newest_ahead is not None
        ahead = (probe.newest_ahead - clock.now).total_seconds()
        out.append(Finding(
            code="data_ahead", detail=round(ahead / 3600),
            message=(
                f"{probe.ahead} 条就诊的 changed_at 晚于 HIS 时钟 / {probe.ahead} visit(s) are dated ahead of the HIS "
                f"clock (newest {probe.newest_ahead:%Y-%m-%d %H:%M:%S}, {human_offset(ahead)} ahead of "
                f"{clock.now:%Y-%m-%d %H:%M:%S} {clock.zone}): each waits until the clock reaches it"
            ),
            fix=(
                f"if the HIS writes its times in another zone than {clock.zone}, set his.timezone to that zone "
                f"(about {_shown(zone_name(ahead + _utc_offset_s(clock)))}); if only a few rows, their changed_at is "
                "wrong in the HIS"
            ),
        ))
    if (
        # With a skew, the server's clock and its data disagree with this host's anyway: said once, above.
        not any(f.code == "skew" for f in out)
        and probe is not None and probe.newest is not None and server is not None and abs(server) > MAX_OFFSET_S
        and clock.server_local is not None
        and -_RECENT_S <= (probe.newest - clock.server_local).total_seconds() <= MAX_OFFSET_S
        and (clock.now - probe.newest).total_seconds() > _STALE_S
    ):
        server_zone = zone_name(server + _utc_offset_s(clock))
        out.append(Finding(
            code="data_follows_server", detail=round(server / 60),
            message=(
                f"最新就诊按数据库服务器自身时区记录 / the newest visits follow the database server's own clock "
                f"(its time_zone, {_shown(server_zone)}, {human_offset(server)} from his.timezone {clock.zone}): the "
                f"newest changed_at is {probe.newest:%Y-%m-%d %H:%M:%S}, {human_offset((probe.newest - clock.now).total_seconds())} "
                "behind the HIS clock, so new visits wait hours for the poll (until the nightly reconcile)"
            ),
            fix=(
                f"the HIS fills changed_at from the database's NOW(): set his.timezone: \"{server_zone}\" "
                "(the server's zone), or set the server's time_zone to the zone of schedule.timezone"
            ),
        ))
    return out


def note(clock: HisClock, *, host_zone: str) -> str:
    """What an operator should know even when nothing is wrong (``check``'s OK line)."""
    text = (
        f"HIS 时钟与本机一致 / HIS clock {clock.now:%Y-%m-%d %H:%M:%S} {clock.zone}, this host "
        f"{_wall(clock.host_utc, host_zone):%Y-%m-%d %H:%M:%S} {host_zone}: {human_offset(clock.offset_s)} apart"
    )
    server = clock.server_offset_s
    if server is not None and abs(server) > MAX_OFFSET_S:
        text += (
            f"; the database server's own time_zone is {_shown(zone_name(server + _utc_offset_s(clock)))} "
            f"({human_offset(server)} from {clock.zone}): crowd-sync reads the database's UTC clock, so this only "
            "matters if the HIS fills changed_at from the database's NOW() (then set his.timezone to the server's zone)"
        )
    return text


def cursor_ahead(cursor_at: datetime | None, clock: HisClock) -> bool:
    """Whether the cursor is ahead of the HIS clock: every poll would read nothing."""
    return cursor_at is not None and cursor_at > clock.now


def _utc_offset_s(clock: HisClock) -> float:
    """his.timezone's offset from UTC at the reading."""
    return (clock.now - clock.utc.replace(tzinfo=None)).total_seconds()


def _wall(moment: datetime, name: str) -> datetime:
    return moment.astimezone(zone(name)).replace(tzinfo=None)


# -- what status and /healthz show -----------------------------------------------------------


def state(clock: HisClock, cursor_at: datetime | None, found: list[Finding]) -> dict[str, Any]:
    """The reading as the outbox keeps it (``sync_state`` "his_clock") for status and /healthz."""
    return {
        "read_at": clock.host_utc.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds"),
        "his_now": clock.now.isoformat(timespec="seconds"),
        "zone": clock.zone,
        "offset_s": round(clock.offset_s, 1) + 0.0,  # never -0.0
        "server_offset_s": None if clock.server_offset_s is None else round(clock.server_offset_s),
        "cursor_lag_s": None if cursor_at is None else round((clock.now - cursor_at).total_seconds()),
        "problems": [{"code": f.code, "message": f.message, "fix": f.fix} for f in found],
    }


def current(kept: dict[str, Any] | None, cursor_at: datetime | None, *, now_utc: datetime) -> dict[str, Any] | None:
    """The kept reading brought to ``now_utc`` (naive UTC): the HIS clock advanced by the time
    since the reading, and the cursor's lag behind it (negative: the cursor is ahead)."""
    if not kept:
        return None
    try:
        read_at = datetime.fromisoformat(str(kept["read_at"]))
        his_now = datetime.fromisoformat(str(kept["his_now"]))
    except (KeyError, ValueError):
        return None
    since = now_utc - read_at
    his_now_est = his_now + max(since, timedelta(0))
    lag = None if cursor_at is None else round((his_now_est - cursor_at).total_seconds())
    return {
        "his_now": his_now_est.isoformat(timespec="seconds"),
        "zone": kept.get("zone"),
        "offset_s": kept.get("offset_s"),
        "server_offset_s": kept.get("server_offset_s"),
        "cursor_at": None if cursor_at is None else cursor_at.isoformat(timespec="seconds"),
        "cursor_lag_s": lag,
        "read_at": kept.get("read_at"),
        "problems": list(kept.get("problems") or []),
        "cursor_rewound": kept.get("cursor_rewound"),
    }


# -- the service's watch -------------------------------------------------------------------


@dataclass
class ClockWatch:
    """Looks at the HIS clock at every poll: logs each problem once per change, keeps the
    reading for status and /healthz. ``probe`` reads the newest visits (hourly); ``keep``
    stores the reading."""

    host_zone: str
    probe: Callable[[HisClock], DataProbe]
    keep: Callable[[dict[str, Any]], None]
    monotonic: Callable[[], float]
    _last_probe: tuple[float, DataProbe] | None = None
    _logged: set[tuple[str, int]] = field(default_factory=set)
    rewound: dict[str, Any] | None = None

    def observe(self, clock: HisClock, cursor_at: datetime | None) -> list[Finding]:
        probe = self._probe(clock)
        found = findings(clock, probe, host_zone=self.host_zone)
        keys = {f.key for f in found}
        for f in found:
            if f.key not in self._logged:
                log.warning("his_clock_problem", problem=f.code, error=f.message, fix=f.fix)
        if self._logged and not keys:
            log.info("his_clock_agrees", offset=human_offset(clock.offset_s), zone=clock.zone)
        self._logged = keys
        kept = state(clock, cursor_at, found)
        if self.rewound is not None:
            kept["cursor_rewound"] = self.rewound
        self.keep(kept)
        return found

    def _probe(self, clock: HisClock) -> DataProbe | None:
        now = self.monotonic()
        if self._last_probe is not None and now - self._last_probe[0] < PROBE_EVERY_S:
            return self._last_probe[1]
        try:
            probe = self.probe(clock)
        except SyncError as exc:  # a look at the data must never stop the poll
            log.warning("his_clock_probe_failed", error=exc.message)
            return None
        self._last_probe = (now, probe)
        return probe
