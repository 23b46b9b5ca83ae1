"""What the operator sees, through the real command line: failures, show, status, check,
lookup's checks, the progress display and log lines, the people's clock."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from sync import display
from sync.upstream.simulator import TEST_IDS, TEST_USERNAME, SimConfig, Simulator
from tests.e2e.test_cli import ROOT, crowd_sync, spawn
from tests.support import His, his_now, make_visit, write_settings

BAD = "LSH000003"  # a negative total: parked invalid by local validation
REFUSED = "LSH000005"  # the platform answers 参数校验错误
SKIPPED = "LSH000007"  # a person the platform does not know (lookup mode)


def _past(minutes: float) -> datetime:
    return his_now() - timedelta(minutes=minutes)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


@pytest.fixture
def world(tmp_path: Path, sim: Simulator) -> Path:
    """Eight visits of known people (one broken, one the platform refuses), one of a stranger;
    key population by label lookup."""
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    visits = [make_visit(n, changed=_past(100 - n), id_no=TEST_IDS[0], is_key=None) for n in range(1, 7)]
    visits[2]["total"] = Decimal("-12.50")
    visits.append(make_visit(7, changed=_past(90), is_key=None))
    his.insert(visits)
    his.dispose()
    sim.faults.reject_lsh = {REFUSED: "invalid"}
    write_settings(
        tmp_path / "settings.yaml",
        his_url=f"sqlite:///{tmp_path / 'his.db'}",
        outbox_url="sqlite:///outbox.db",
        base_url=sim.url,
        overrides={"key_crowd": {"source": "lookup"}, "schedule": {"poll_every_s": 5}},
    )
    return tmp_path


def cli(world: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return crowd_sync(*args, "--config", "settings.yaml", cwd=world, env=env)


def edit(world: Path, section: str, **values: Any) -> None:
    path = world / "settings.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


def test_failures_lists_what_is_not_sent_with_reason_and_fix(world: Path) -> None:
    assert cli(world, "once").returncode == 3
    r = cli(world, "failures")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "数据不合规 invalid 2" in out and "失败待重试 failed 0" in out and "已放弃 dead 0" in out
    assert BAD in out and REFUSED in out and SKIPPED not in out  # skipped only on request
    flat = " ".join(out.split())  # the reason column wraps to the terminal's width
    assert "原因 reason: 1 problem: totalFee (total_fee) = -12.50: must not be negative (不能为负数)" in flat
    assert "参数校验错误" in out  # the platform's own words for the refused one
    assert "处理 fix:" in out and "crowd-sync retry --lsh" in out
    assert "Asia/Shanghai (+08:00)" in out

    # Columns line up by display width, Chinese included: each row's cells start where the header's do.
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("流水号 lsh"))
    starts = [display.width(header[: header.index(h)]) for h in ("状态 status", "更新 updated", "原因与处理")]
    rows = [line for line in lines if line.startswith("LSH")]
    assert len(rows) == 2
    for line in rows:
        cells = ("数据不合规", re.search(r"\d{4}-\d\d-\d\d \d\d:", line).group(0), "原因 reason")  # type: ignore[union-attr]
        assert [display.width(line[: line.index(cell)]) for cell in cells] == starts, line

    data = json.loads(cli(world, "failures", "--json").stdout)
    by_lsh = {r["lsh"]: r for r in data["records"]}
    assert set(by_lsh) == {BAD, REFUSED}
    assert by_lsh[REFUSED]["http_status"] is not None and "参数校验错误" in by_lsh[REFUSED]["reason"]
    assert by_lsh[BAD]["reason"] == "1 problem: totalFee (total_fee) = -12.50: must not be negative (不能为负数)"
    assert by_lsh[BAD]["fix"] and by_lsh[BAD]["updated_at"].endswith("+08:00")

    skipped = json.loads(cli(world, "failures", "--status", "skipped", "--json").stdout)
    assert [r["lsh"] for r in skipped["records"]] == [SKIPPED]
    assert "FAQ 15" in skipped["records"][0]["fix"] or "标签" in skipped["records"][0]["fix"]
    tomorrow = (datetime.now() + timedelta(days=2)).strftime("%Y-%m-%d")
    assert json.loads(cli(world, "failures", "--since", tomorrow, "--json").stdout)["records"] == []


def test_show_tells_a_visits_whole_story_with_id_numbers_masked(world: Path) -> None:
    assert cli(world, "once").returncode == 3
    masked = TEST_IDS[0][:6] + "********" + TEST_IDS[0][-4:]

    refused = cli(world, "show", REFUSED)
    assert refused.returncode == 0, refused.stderr
    out = refused.stdout
    assert TEST_IDS[0] not in out and masked in out
    assert "HIS 读取的值 / HIS values as read" in out and "total_fee" in out
    assert "待上传的报文" in out or "payload" in out
    assert re.search(r"上传 upload\s+数据不合规 invalid\s+\d{3}", out), out  # the attempt and its HTTP status
    assert "参数校验错误" in out

    sent = json.loads(cli(world, "show", "LSH000001", "--json").stdout)
    assert sent["status"] == "sent" and sent["payload_sent"] and sent["payload"]["cardNo"] == masked
    assert [(a["kind"], a["outcome"], a["answer"]) for a in sent["attempts"]] == [("upload", "sent", "新增成功")]
    assert sent["times"]["sent_at"].endswith("+08:00")
    assert sent["label_cache"]["key_crowd"] == "1"

    bad = json.loads(cli(world, "show", BAD, "--json").stdout)
    assert bad["his_values_are"] == "exact" and Decimal(bad["his_values"]["total_fee"]) == Decimal("-12.50")
    assert [(a["kind"], a["outcome"]) for a in bad["attempts"]] == [("check", "invalid")]

    unmasked = cli(world, "show", REFUSED, "--unmask")
    assert TEST_IDS[0] in unmasked.stdout

    missing = cli(world, "show", "NO-SUCH-LSH")
    assert missing.returncode == 2 and "NO-SUCH-LSH" in missing.stderr


def test_failures_and_show_never_create_an_outbox(world: Path) -> None:
    for args in (["failures"], ["show", "X"]):
        r = cli(world, *args)
        assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    assert not (world / "outbox.db").exists()


def test_status_tells_whether_the_service_runs_and_its_next_jobs(world: Path) -> None:
    proc = spawn("run", "--config", "settings.yaml", cwd=world)
    try:
        deadline = time.monotonic() + 60
        data: dict[str, Any] = {}
        while time.monotonic() < deadline:
            r = cli(world, "status", "--json")
            if r.returncode == 0:
                data = json.loads(r.stdout)
                if data["daemon"]["state"] == "running" and data["schedule"]["next_poll_at"]:
                    break
            time.sleep(0.5)
        assert data["daemon"]["state"] == "running", data
        assert data["daemon"]["pid"] == proc.pid and data["daemon"]["command"] == "run"
        assert data["daemon"]["since"].endswith("+08:00")
        assert data["schedule"]["from_service"] and data["schedule"]["next_poll_at"].endswith("+08:00")
        assert data["schedule"]["next_reconcile_at"].endswith("02:30:00+08:00")
        assert data["timezone"] == "Asia/Shanghai" and data["utc_offset"] == "+08:00"
        text = cli(world, "status").stdout
        assert f"服务 service: 运行中 running: pid {proc.pid}" in text
        assert "下次轮询 next poll:" in text and "下次对账 next reconcile:" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    after = json.loads(cli(world, "status", "--json").stdout)
    assert after["daemon"]["state"] == "stopped" and after["schedule"]["next_poll_at"] is None
    assert "服务 service: 未运行 not running" in cli(world, "status").stdout


def test_status_shows_times_in_schedule_timezone(world: Path) -> None:
    edit(world, "schedule", timezone="Asia/Tokyo")
    r = cli(world, "once")
    assert r.returncode == 3
    # Log lines: schedule.timezone with its offset.
    stamps = [json.loads(line)["timestamp"] for line in r.stderr.splitlines() if line.startswith("{")]
    assert stamps and all(s.endswith("+09:00") for s in stamps), stamps[:3]
    data = json.loads(cli(world, "status", "--json").stdout)
    assert data["last_sent_at"].endswith("+09:00") and data["last_run"]["started_at"].endswith("+09:00")
    assert "(时间 times Asia/Tokyo +09:00)" in cli(world, "status").stdout


def test_check_tests_the_platform_with_the_shared_token_and_never_logs_in_anew(world: Path, sim: Simulator) -> None:
    first = cli(world, "check")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[ OK ] platform login: 已以" in first.stdout  # no token yet: it logs in, testing the password
    assert "[ OK ] label lookup:" in first.stdout and "probe ID" in first.stdout
    assert sim.counters["logins"] == 1

    again = cli(world, "check")
    assert again.returncode == 0, again.stdout
    assert "[SKIP] platform login:" in again.stdout and "password not tested now" in again.stdout
    assert "+08:00" in again.stdout  # when the password will next be tested: the token's renewal
    assert "[ OK ] label lookup:" in again.stdout and "with the shared token" in again.stdout
    assert sim.counters["logins"] == 1  # the valid token was used, never replaced
    assert "全部通过 / all checks passed (1 skipped)" in again.stdout
    for line in again.stdout.splitlines()[:-1]:
        assert line.startswith(("[ OK ]", "[WARN]", "[FAIL]", "[SKIP]", "       ")), line

    # Another program logs in with the same account: the shared token is refused. check says so, and
    # does not log in to replace it (that would push out the service in turn).
    sim.kick(TEST_USERNAME)
    kicked = cli(world, "check")
    assert kicked.returncode == 75, kicked.stdout
    assert "[FAIL] label lookup: 平台拒绝了共享令牌" in kicked.stdout
    assert sim.counters["logins"] == 1

    offline = cli(world, "check", "--offline")
    assert offline.returncode == 0 and "[SKIP] platform: --offline" in offline.stdout
    assert "[ OK ] label lookup" not in offline.stdout


def test_check_warns_when_the_platform_clock_cannot_be_compared(world: Path, sim: Simulator) -> None:
    sim.faults.no_date = True  # a gateway that strips the Date header
    r = cli(world, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[WARN] clock: 平台应答没有 Date 头，无法比较时钟" in r.stdout and "chrony/ntp" in r.stdout
    assert "[ OK ] clock" not in r.stdout


def test_check_fails_an_unreachable_platform_naming_host_and_cause(world: Path) -> None:
    with socket.socket() as closed:  # bound, never listening: refuses connections
        closed.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{closed.getsockname()[1]}"
        edit(world, "upstream", base_url=f"http://{host}")
        r = cli(world, "check")
    assert r.returncode == 75, r.stdout
    assert f"[FAIL] platform login: login: 无法连接 / cannot reach {host}: 连接被拒绝 / connection refused" in r.stdout
    assert "[SKIP] clock:" in r.stdout and "[ OK ] clock" not in r.stdout


def test_lookup_checks_the_id_number_before_asking_the_platform(world: Path, sim: Simulator) -> None:
    wrong_digit = TEST_IDS[0][:-1] + ("7" if TEST_IDS[0][-1] != "7" else "8")
    body = "51010019851302003"  # 13th month
    weights, checks = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2), "10X98765432"
    no_such_day = body + checks[sum(int(c) * w for c, w in zip(body, weights, strict=True)) % 11]
    for number, said in (
        (wrong_digit, "wrong check digit"),
        (no_such_day, "birth date"),
        ("E12345678", "not a resident ID number"),
    ):
        r = cli(world, "lookup", number)
        assert r.returncode == 2, r.stdout
        assert said in r.stderr and "Traceback" not in r.stderr
    assert sim.counters["lookups"] == 0  # nothing was asked
    ok = cli(world, "lookup", TEST_IDS[0])
    assert ok.returncode == 0 and "重点人群 / key population" in ok.stdout


def test_reconcile_refuses_an_inverted_range(world: Path) -> None:
    r = cli(world, "reconcile", "--since", "2026-10-31", "--until", "2026-10-01")
    assert r.returncode == 2
    assert "--since is after --until" in r.stderr


def test_progress_log_lines_without_a_terminal(world: Path, sim: Simulator) -> None:
    sim.faults.latency_s = 0.15
    edit(world, "upstream", concurrency=1)
    edit(world, "log", progress_every_s=0.3)
    r = cli(world, "once")
    assert r.returncode == 3, r.stderr
    progress = [json.loads(line) for line in r.stderr.splitlines() if '"event": "progress"' in line]
    assert progress, r.stderr[-2000:]
    sending = [p for p in progress if p["phase"] == "sending"]
    assert sending and {"due", "sent", "rate_per_s", "percent"} <= set(sending[-1]), sending
    assert len(progress) < 30  # a line every few tenths of a second, not one per record
    assert "读取 7，入队 7，已发送 4" in r.stdout and "read 7, enqueued 7, sent 4" in r.stdout  # both languages


def test_live_progress_display_on_a_terminal(world: Path, sim: Simulator) -> None:
    sim.faults.latency_s = 0.1
    main, child = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "140", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync", "once", "--config", "settings.yaml"], cwd=world, stdin=child,
        stdout=subprocess.PIPE, stderr=child, env=env,
    )
    os.close(child)
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    out, _ = proc.communicate(timeout=30)
    os.close(main)
    screen = seen.decode("utf-8", "replace")
    assert "读取 HIS  reading" in screen and "发送 sending" in screen, screen[-2000:]
    assert "sent 4" in screen and "100%" in screen
    assert "read 7, enqueued 7, sent 4" in out.decode()  # the summary stays on stdout


def test_systemd_status_says_what_the_cycle_did_and_what_waits(world: Path) -> None:
    notify_path = world / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.5)
    proc = spawn("run", "--config", "settings.yaml", cwd=world, env={"NOTIFY_SOCKET": str(notify_path)})
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("上次 last" in m for m in messages):
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        sock.close()
    status = next(m for m in messages if "上次 last" in m)
    assert status.startswith("STATUS=")
    assert "read 7, sent 4" in status and "invalid 2" in status and "skipped 1" in status
    assert "待发送 waiting 0" in status and "下次轮询 next poll" in status and "+08:00" in status
