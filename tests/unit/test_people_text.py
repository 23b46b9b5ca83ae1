"""Text for people: both languages in every help, columns aligned by display width, times in
schedule.timezone, network causes named, the progress arithmetic."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import requests
import urllib3

from sync import cli, display, localtime
from sync.stats import Progress
from sync.upstream import neterrors


def _has_chinese(text: str | None) -> bool:
    return bool(text) and any("\u4e00" <= ch <= "\u9fff" for ch in str(text))


def test_every_command_and_option_has_help_in_both_languages() -> None:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = []
    for name, command in sub.choices.items():
        helps = {a.help for a in sub._choices_actions if a.dest == name}
        if not all(_has_chinese(h) for h in helps):
            missing.append(name)
        for action in command._actions:
            if not _has_chinese(action.help) or not any(c.isascii() and c.isalpha() for c in str(action.help)):
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
    assert {"failures", "show"} <= set(sub.choices)


def test_usage_errors_are_bilingual_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli._parser().parse_args(["reconcile"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "用法 usage:" in err and "参数错误 / usage error" in err and "--since" in err


def test_tables_align_chinese_by_display_width() -> None:
    lines = display.table(["名称 name", "n"], [["待发送 pending", "3"], ["x", "12345"]], right=(1,))
    assert len({display.width(line) for line in lines}) == 1  # every line the same width on a terminal
    assert display.width("数据不合规") == 10
    wrapped = display.wrap("原因 reason: 金额不能为负数 the amount must not be negative", 16)
    assert all(display.width(line) <= 16 for line in wrapped)
    assert "".join(wrapped).replace(" ", "") == "原因reason:金额不能为负数theamountmustnotbenegative"


def test_times_for_people_carry_the_zone_offset() -> None:
    utc = datetime(2026, 10, 30, 23, 30)  # naive UTC, as the outbox keeps it
    assert localtime.text(utc, ZoneInfo("Asia/Shanghai")) == "2026-10-31 07:30:00+08:00"
    assert localtime.text("2026-10-30T23:30:00Z", ZoneInfo("Asia/Tokyo")) == "2026-10-31 08:30:00+09:00"
    assert localtime.text(datetime(2026, 10, 30, 23, 30, tzinfo=UTC), ZoneInfo("UTC")) == "2026-10-30 23:30:00+00:00"
    assert localtime.wall(datetime(2026, 10, 31, 7, 30), ZoneInfo("Asia/Shanghai")) == "2026-10-31 07:30:00+08:00"
    assert localtime.offset_minutes(ZoneInfo("Asia/Shanghai")) == 480


def test_network_causes_are_named_without_the_url() -> None:
    signed = "http://11.6.226.2:9091/adapter/http/ehrc/login/integration?hie_app_key=SECRET&hie_secret=abc"

    def wrapped(cause: BaseException) -> requests.exceptions.ConnectionError:
        inner = urllib3.exceptions.NewConnectionError(None, f"Failed to establish a new connection to {signed}")  # type: ignore[arg-type]
        inner.__cause__ = cause
        outer = urllib3.exceptions.MaxRetryError(None, signed, reason=inner)  # type: ignore[arg-type]
        return requests.exceptions.ConnectionError(outer)

    base = "http://11.6.226.2:9091"
    for cause, words in (
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (socket.gaierror(-2, "Name or service not known"), "name not resolved"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection reset"),
        (TimeoutError("timed out"), "timed out"),
    ):
        text = neterrors.describe(wrapped(cause), base)
        assert text.startswith("11.6.226.2:9091: ") and words in text, text
        assert "SECRET" not in text and "adapter" not in text
    assert neterrors.host_of("https://integration.scwjxx.cn") == "integration.scwjxx.cn:443"
    assert "timed out" in neterrors.describe(requests.exceptions.ConnectTimeout("x"), base)


@dataclass
class _Stats:
    rows_read: int = 0
    enqueued: int = 0
    sent: int = 0
    failed: int = 0
    invalid: int = 0
    skipped: int = 0


def test_progress_rate_fraction_and_time_left() -> None:
    now = [100.0]
    p = Progress(clock=lambda: now[0])
    assert p.snapshot() is None
    stats = _Stats()
    p.start("reconcile", stats)
    p.reading(datetime(2026, 10, 1), datetime(2026, 10, 11))
    now[0] += 10
    stats.rows_read, stats.enqueued = 5000, 4000
    p.read_up_to(datetime(2026, 10, 3, 12))  # a quarter of the window in 10 s
    snap = p.snapshot()
    assert snap is not None and snap.phase == "reading"
    assert snap.fraction == pytest.approx(0.25) and snap.rate_per_s == pytest.approx(500)
    assert snap.eta_s == pytest.approx(30)
    stats.skipped, stats.invalid = 100, 2  # parked at intake: not the dispatch's work
    p.sending(due=400)
    now[0] += 4
    stats.sent, stats.failed, stats.skipped = 150, 10, 140
    snap = p.snapshot()
    assert snap is not None and (snap.phase, snap.done, snap.due) == ("sending", 200, 400)
    assert snap.rate_per_s == pytest.approx(50) and snap.eta_s == pytest.approx(4)
    assert "200/400" in snap.line() and "ETA 4 s" in snap.line()
    p.finish()
    assert p.snapshot() is None and p.last() is not None and p.last().sent == 150  # type: ignore[union-attr]
