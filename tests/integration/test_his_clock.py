"""The HIS clock on the real MariaDB: a server on UTC holding China-time data, a HIS that
writes the server's own time, a database clock hours off, a clock that jumped forward and
back. Each is either handled or reported by `check` (and the service) with its fix."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from sync import cli
from sync.app import make_pipeline
from sync.doctor import run_checks
from sync.outbox.store import Store
from sync.settings import Settings
from sync.upstream.simulator import Simulator
from tests.support import His, capture_all_logs, his_now, make_visit, write_settings


def with_init(url: str, statement: str) -> str:
    """The HIS URL with a statement pymysql runs on every new connection."""
    return f"{url}?init_command={quote(statement, safe='')}"


def utc_wall_now() -> datetime:
    """Now as a server on UTC writes NOW() into a DATETIME column."""
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


class Site:
    def __init__(self, tmp: Path, his_url: str, sim: Simulator, name: str = "settings", **overrides: Any) -> None:
        self.settings: Settings = write_settings(
            tmp / f"{name}.yaml", his_url=his_url, outbox_url=f"sqlite:///{tmp / 'outbox.db'}", base_url=sim.url,
            overrides={"his": {"settle_delay_s": 0, "lookback_s": 600, **overrides.pop("his", {})}, **overrides},
        )
        self.path = tmp / f"{name}.yaml"
        self.store = Store(self.settings.outbox.url.get_secret_value())
        self.store.ensure_schema()
        self.pipeline = make_pipeline(self.settings, self.store)

    def check(self) -> str:
        out = io.StringIO()
        run_checks(self.settings, out=out)
        return out.getvalue()

    def close(self) -> None:
        self.pipeline.close()
        self.store.dispose()


@pytest.fixture
def his(mariadb_url: str) -> Iterator[His]:
    h = His(mariadb_url)
    yield h
    h.dispose()


def test_a_utc_server_holding_china_time_keeps_the_poll_current(
    tmp_path: Path, mariadb_url: str, his: His, sim: Simulator
) -> None:
    """The server's time_zone is UTC (many installs, every container image); the HIS writes
    China time. The poll used to stop at the server's NOW(), 8 hours behind the data."""
    site = Site(tmp_path, with_init(mariadb_url, "SET time_zone = '+00:00'"), sim)
    try:
        his.insert(make_visit(n, changed=his_now() - timedelta(minutes=20 - n)) for n in range(1, 4))
        assert site.pipeline.cycle().sent == 3  # the first poll back-fills a month: it always worked
        his.insert(make_visit(n, changed=his_now() - timedelta(seconds=30)) for n in range(4, 7))
        stats = site.pipeline.cycle()
        assert stats.sent == 3, stats  # new visits arrive at the next poll, not 8 hours later

        text = site.check()
    finally:
        site.close()
    line = next(x for x in text.splitlines() if x.startswith("[ OK ] HIS clock"))
    assert "Asia/Shanghai" in line and "the database server's own time_zone is UTC (-8 h 00 min" in line, text
    assert "all checks passed" in text, text


def test_a_his_writing_the_servers_own_time_is_found_and_fixed_by_his_timezone(
    tmp_path: Path, mariadb_url: str, his: His, sim: Simulator
) -> None:
    """The HIS fills changed_at with the database's NOW() on a UTC server: the visits are UTC
    wall time. Read as China time they would wait 8 hours; check and the service say so, and
    his.timezone: UTC is the fix."""
    utc_server = with_init(mariadb_url, "SET time_zone = '+00:00'")
    his.insert(make_visit(n, changed=utc_wall_now() - timedelta(minutes=10 - n)) for n in range(1, 4))
    wrong = Site(tmp_path, utc_server, sim)
    try:
        text = wrong.check()
        with capture_all_logs() as logs:
            wrong.pipeline.cycle()
            wrong.pipeline.cycle()
    finally:
        wrong.close()
    fail = next(x for x in text.splitlines() if x.startswith("[FAIL] HIS clock"))
    assert "the newest visits follow the database server's own clock" in fail and "-8 h 00 min" in fail, text
    assert 'set his.timezone: "UTC"' in text
    warned = [e for e in logs if e["event"] == "his_clock_problem"]
    assert len(warned) == 1 and warned[0]["problem"] == "data_follows_server", warned  # once, not every poll

    right = Site(tmp_path, utc_server, sim, name="fixed", his={"timezone": "UTC"})
    try:
        assert "[ OK ] HIS clock" in right.check()
        right.pipeline.cycle()
        his.insert([make_visit(4, changed=utc_wall_now() - timedelta(seconds=30))])
        assert right.pipeline.cycle().sent == 1
    finally:
        right.close()


def test_his_timezone_behind_the_data_is_found(tmp_path: Path, mariadb_url: str, his: His, sim: Simulator) -> None:
    his.insert(make_visit(n, changed=his_now() - timedelta(minutes=n)) for n in range(1, 4))
    site = Site(tmp_path, mariadb_url, sim, his={"timezone": "UTC"})
    try:
        text = site.check()
    finally:
        site.close()
    fail = next(x for x in text.splitlines() if x.startswith("[FAIL] HIS clock"))
    assert "3 visit(s) are dated ahead of the HIS clock" in fail, text
    assert "set his.timezone to that zone (about UTC+08:00)" in text


def test_a_database_clock_hours_off_fails_check_with_the_offset(
    tmp_path: Path, mariadb_url: str, his: His, sim: Simulator
) -> None:
    site = Site(tmp_path, with_init(mariadb_url, "SET timestamp = UNIX_TIMESTAMP() + 8 * 3600"), sim)
    try:
        text = site.check()
    finally:
        site.close()
    fail = next(x for x in text.splitlines() if x.startswith("[FAIL] HIS clock"))
    assert "the HIS database's clock is +8 h 00 min from this host's" in fail, text
    assert "NTP" in text


def test_a_cursor_ahead_of_the_his_clock_is_rewound_and_no_visit_lost(
    tmp_path: Path, mariadb_url: str, his: His, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """The database clock jumped a day forward (a poll ran then, moving the cursor a day ahead)
    and back: every poll read nothing, `once` exited 0 and new visits waited for the nightly
    reconcile. Now the poll finds the cursor ahead, says so, and reads again from the newest
    visit it has."""
    his.insert(make_visit(n, changed=his_now() - timedelta(minutes=30 - n)) for n in range(1, 4))
    jumped = Site(tmp_path, with_init(mariadb_url, "SET timestamp = UNIX_TIMESTAMP() + 86400"), sim, name="jumped")
    try:
        assert jumped.pipeline.cycle().sent == 3
        cursor = jumped.store.queue.get_cursor()
        assert cursor is not None and cursor[0] > his_now() + timedelta(hours=12)
    finally:
        jumped.close()

    his.insert(make_visit(n, changed=his_now() - timedelta(minutes=1)) for n in range(4, 7))
    site = Site(tmp_path, mariadb_url, sim)
    try:
        with capture_all_logs() as logs:
            stats = site.pipeline.cycle()
        cursor = site.store.queue.get_cursor()
    finally:
        site.close()
    assert stats.sent == 3, stats
    assert set(sim.records) == {f"LSH{n:06d}" for n in range(1, 7)}
    assert sim.counters["updates"] == 0  # re-read, never re-sent
    ahead = [e for e in logs if e["event"] == "his_cursor_ahead"]
    assert len(ahead) == 1 and ahead[0]["ahead"].startswith("+1 d"), ahead
    assert cursor is not None and cursor[0] <= his_now() + timedelta(seconds=1)

    assert cli.main(["status", "--config", str(site.path)]) == 0
    out = capsys.readouterr().out
    assert "cursor rewound at" in out and "ahead of the HIS clock" in out, out
    assert "behind the HIS clock" in out
