"""The HIS clock compared with this host's and with the HIS's own data: what is reported, and
that the service says it once per change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sync.clock import ClockWatch, DataProbe, HisClock, current, findings, human_offset, note, zone_name
from tests.support import capture_all_logs

HOST = datetime(2026, 11, 29, 17, 43, 21, tzinfo=UTC)
CHINA = datetime(2026, 11, 30, 1, 43, 21)  # HOST in Asia/Shanghai


def reading(*, skew_s: float = 0, server_local: datetime | None = None, zone: str = "Asia/Shanghai") -> HisClock:
    utc = HOST + timedelta(seconds=skew_s)
    now = utc.astimezone(ZoneInfo(zone)).replace(tzinfo=None)
    return HisClock(now=now, utc=utc, server_local=server_local, host_utc=HOST, zone=zone)


def codes(found: list[Any]) -> list[str]:
    return [f.code for f in found]


def test_clocks_and_data_that_agree_report_nothing() -> None:
    clock = reading(server_local=CHINA)
    probe = DataProbe(newest=CHINA - timedelta(minutes=3), ahead=0, newest_ahead=None)
    assert findings(clock, probe, host_zone="Asia/Shanghai") == []


def test_a_utc_server_holding_china_time_is_fine_and_explained() -> None:
    """The issue's server: time_zone UTC, the HIS writing China time. The HIS clock comes from
    the database's UTC clock in his.timezone, so nothing is wrong; check says why."""
    clock = reading(server_local=CHINA - timedelta(hours=8))
    probe = DataProbe(newest=CHINA - timedelta(minutes=2), ahead=0, newest_ahead=None)
    assert findings(clock, probe, host_zone="Asia/Shanghai") == []
    text = note(clock, host_zone="Asia/Shanghai")
    assert "2026-11-30 01:43:21 Asia/Shanghai" in text and "+0 s apart" in text
    assert "the database server's own time_zone is UTC (-8 h 00 min from Asia/Shanghai)" in text


def test_a_database_clock_hours_off_is_a_skew_naming_offset_cause_and_fix() -> None:
    found = findings(reading(skew_s=8 * 3600 + 3), None, host_zone="Asia/Shanghai")
    assert codes(found) == ["skew"]
    assert "+8 h 00 min" in found[0].message and "system clock is set to local time" in found[0].message
    assert "NTP" in found[0].fix


def test_visits_dated_ahead_of_the_his_clock_name_the_zone_to_set() -> None:
    # his.timezone says UTC, the HIS writes China time: the newest visits are 8 h "ahead".
    clock = reading(zone="UTC", server_local=CHINA - timedelta(hours=8))
    probe = DataProbe(newest=None, ahead=42, newest_ahead=CHINA - timedelta(minutes=1))
    found = findings(clock, probe, host_zone="Asia/Shanghai")
    assert codes(found) == ["data_ahead"]
    assert "42 visit(s) are dated ahead of the HIS clock" in found[0].message
    assert "+7 h 59 min ahead" in found[0].message
    assert "set his.timezone" in found[0].fix and "UTC+08:00" in found[0].fix


def test_visits_following_the_servers_own_clock_name_its_zone() -> None:
    # A UTC server whose HIS fills changed_at with NOW(): visits are UTC wall time, 8 h behind.
    server = CHINA - timedelta(hours=8)
    clock = reading(server_local=server)
    probe = DataProbe(newest=server - timedelta(minutes=4), ahead=0, newest_ahead=None)
    found = findings(clock, probe, host_zone="Asia/Shanghai")
    assert codes(found) == ["data_follows_server"]
    assert 'set his.timezone: "UTC"' in found[0].fix
    # Quiet hours (no visit for an hour by the server's clock) prove nothing either way.
    quiet = DataProbe(newest=server - timedelta(hours=1), ahead=0, newest_ahead=None)
    assert findings(clock, quiet, host_zone="Asia/Shanghai") == []


def test_offsets_read_as_people_write_them() -> None:
    assert human_offset(8 * 3600) == "+8 h 00 min"
    assert human_offset(-725) == "-12 min 05 s"
    assert human_offset(3) == "+3 s"
    assert human_offset(86400 + 3600) == "+1 d 1 h 00 min"
    assert (zone_name(0), zone_name(8 * 3600 - 60), zone_name(-5.5 * 3600)) == ("UTC", "+08:00", "-05:30")


def test_the_service_logs_each_problem_once_per_change_and_when_it_clears() -> None:
    kept: list[dict[str, Any]] = []
    probes: list[HisClock] = []
    ticks = [0.0]

    def probe(clock: HisClock) -> DataProbe:
        probes.append(clock)
        return DataProbe(newest=clock.now, ahead=0, newest_ahead=None)

    watch = ClockWatch(host_zone="Asia/Shanghai", probe=probe, keep=kept.append, monotonic=lambda: ticks[0])
    with capture_all_logs() as logs:
        for _ in range(3):
            watch.observe(reading(skew_s=3 * 3600), None)
        watch.observe(reading(skew_s=5 * 3600), None)  # changed: said again
        watch.observe(reading(skew_s=5 * 3600 + 10), None)  # the same to the minute: not again
        watch.observe(reading(), None)  # agrees again
        watch.observe(reading(), None)
    events = [(e["event"], e.get("problem")) for e in logs]
    assert events == [("his_clock_problem", "skew"), ("his_clock_problem", "skew"), ("his_clock_agrees", None)]
    assert len(kept) == 7 and kept[0]["problems"][0]["code"] == "skew" and kept[-1]["problems"] == []
    assert len(probes) == 1  # the data is looked at hourly, not at every poll
    ticks[0] += 3600
    watch.observe(reading(), None)
    assert len(probes) == 2


def test_status_brings_the_kept_reading_to_now() -> None:
    kept = {"read_at": "2026-11-29T17:43:21", "his_now": "2026-11-30T01:43:21", "zone": "Asia/Shanghai",
            "offset_s": 0.4, "server_offset_s": -28800, "cursor_lag_s": 60, "problems": []}
    now = datetime(2026, 11, 29, 17, 53, 21)
    shown = current(kept, datetime(2026, 11, 30, 1, 42, 21), now_utc=now)
    assert shown is not None
    assert shown["his_now"] == "2026-11-30T01:53:21" and shown["cursor_lag_s"] == 660
    ahead = current(kept, datetime(2026, 12, 1, 1, 43, 21), now_utc=now)
    assert ahead is not None and ahead["cursor_lag_s"] == -(86400 - 600)
