"""The real command line, as an operator runs it: exit codes, output, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from sync.upstream.simulator import TEST_IDS, SimConfig, Simulator
from tests.support import His, his_now, make_visit, write_settings

ROOT = Path(__file__).resolve().parents[2]


def crowd_sync(*args: str, cwd: Path, timeout: float = 90, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )


def spawn(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sync", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _past(minutes: float) -> datetime:
    return his_now() - timedelta(minutes=minutes)


@pytest.fixture(name="closed_port")
def closed_port_fixture() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound but never
    listening, so no other process on the machine can start listening on it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


@pytest.fixture
def site(tmp_path: Path, sim: Simulator) -> Path:
    """A hospital: a HIS with 12 settled visits, settings pointing at the simulator."""
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    his.insert(make_visit(n, changed=_past(100 - n)) for n in range(1, 13))
    his.dispose()
    write_settings(
        tmp_path / "settings.yaml",
        his_url=f"sqlite:///{tmp_path / 'his.db'}",
        outbox_url="sqlite:///outbox.db",
        base_url=sim.url,
        overrides={"schedule": {"poll_every_s": 5}},
    )
    return tmp_path


def _outbox(site: Path) -> list[dict[str, object]]:
    db = sqlite3.connect(site / "outbox.db")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM sync_outbox")]
    finally:
        db.close()


def test_once_sends_everything_and_exits_0(site: Path, sim: Simulator) -> None:
    r = crowd_sync("once", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 0, r.stderr
    assert "sent 12" in r.stdout
    assert len(sim.records) == 12


def test_config_option_after_or_before_the_command(site: Path) -> None:
    r = crowd_sync("--config", "settings.yaml", "migrate", cwd=site)
    assert r.returncode == 0, r.stderr
    r = crowd_sync("status", "--json", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counts"]["pending"] == 0


def test_left_over_invalid_records_exit_3_and_retry_requeues(site: Path, sim: Simulator) -> None:
    his = His(f"sqlite:///{site / 'his.db'}")
    his.insert([make_visit(50, changed=_past(3), total=Decimal("-3.00"))])
    his.dispose()

    r = crowd_sync("once", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 3, r.stdout + r.stderr

    status = json.loads(crowd_sync("status", "--json", "--config", "settings.yaml", cwd=site).stdout)
    assert status["counts"]["invalid"] == 1
    assert status["counts"]["sent"] == 12
    assert status["last_sent_at"] is not None
    assert status["last_run"]["sent"] == 12

    r = crowd_sync("retry", "--status", "invalid", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 0 and "requeued 1" in r.stdout
    row = next(x for x in _outbox(site) if x["lsh"] == "LSH000050")
    assert row["status"] == "pending"


def test_status_text_names_the_configuration_error(site: Path, sim: Simulator) -> None:
    sim.faults.app_key_revoked = True
    r = crowd_sync("once", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 2
    out = crowd_sync("status", "--config", "settings.yaml", cwd=site).stdout
    assert "sending paused" in out
    assert "app_key" in out
    assert sim.records == {}


def test_reconcile_picks_up_rows_behind_the_cursor(site: Path, sim: Simulator) -> None:
    assert crowd_sync("once", "--config", "settings.yaml", cwd=site).returncode == 0
    his = His(f"sqlite:///{site / 'his.db'}")
    his.insert([make_visit(70, changed=_past(60 * 24 * 3))])  # three days late
    his.dispose()
    since = (his_now() - timedelta(days=5)).strftime("%Y-%m-%d")

    r = crowd_sync("reconcile", "--since", since, "--config", "settings.yaml", cwd=site)

    assert r.returncode == 0, r.stderr
    assert "LSH000070" in sim.records


def test_check_passes_on_good_settings(site: Path) -> None:
    r = crowd_sync("check", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("[ OK ]") >= 5
    assert "all checks passed" in r.stdout


def test_check_on_broken_settings_lists_every_problem_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text(
        "upstream:\n  env: staging\n  username: u\n  password: ${NOT_SET_ANYWHERE}\n  concurrency: many\n"
        "his:\n  url: sqlite:///x.db\n  query: SELECT 1\nbogus: 1\n",
        encoding="utf-8",
    )
    r = crowd_sync("check", "--config", "settings.yaml", cwd=tmp_path)
    assert r.returncode == 2
    for key in ("upstream.env", "upstream.app_key", "NOT_SET_ANYWHERE", "upstream.concurrency", "his.query", "bogus"):
        assert key in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_check_reports_a_wrong_password_with_the_fix(site: Path, sim: Simulator) -> None:
    text = (site / "settings.yaml").read_text(encoding="utf-8").replace("Ehr123456@", "wrong-password")
    (site / "settings.yaml").write_text(text, encoding="utf-8")
    r = crowd_sync("check", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 2
    assert "[FAIL] platform login" in r.stdout
    assert "用户不存在或密码错误" in r.stdout
    assert "wrong-password" not in r.stdout + r.stderr


def test_unreachable_his_exits_75_try_again_later(site: Path, closed_port: int) -> None:
    port = closed_port
    text = (site / "settings.yaml").read_text(encoding="utf-8")
    text = text.replace(f"sqlite:///{site / 'his.db'}", f"mysql+pymysql://reader:pw@127.0.0.1:{port}/his")
    (site / "settings.yaml").write_text(text, encoding="utf-8")
    r = crowd_sync("once", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 75, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "temporarily unavailable" in r.stderr


def test_lookup_prints_the_labels(site: Path) -> None:
    r = crowd_sync("lookup", TEST_IDS[0], "--config", "settings.yaml", cwd=site)
    assert r.returncode == 0, r.stderr
    assert "J01.01" in r.stdout and "511425" in r.stdout
    assert TEST_IDS[0] not in r.stdout  # masked
    j = json.loads(crowd_sync("lookup", TEST_IDS[0], "--json", "--config", "settings.yaml", cwd=site).stdout)
    assert j["key_population"] is True and j["in_own_county"] is True


def _wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_run_then_sigterm_exits_0_and_leaves_no_lease(site: Path, sim: Simulator) -> None:
    proc = spawn("run", "--config", "settings.yaml", cwd=site)
    try:
        _wait_for(lambda: len(sim.records) == 12)
        # While it runs, a second instance on the same outbox is refused at once.
        second = crowd_sync("once", "--config", "settings.yaml", cwd=site, timeout=30)
        assert second.returncode == 2
        assert str(proc.pid) in second.stderr
        assert proc.poll() is None  # the running one is untouched
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert all(r["lease_owner"] is None for r in _outbox(site))
    assert "cycle_finished" in err


def test_migrate_reports_the_revision(tmp_path: Path, sim: Simulator) -> None:
    write_settings(
        tmp_path / "settings.yaml", his_url="sqlite:///his.db", outbox_url="sqlite:///fresh.db", base_url=sim.url
    )
    r = crowd_sync("migrate", "--config", "settings.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "->" in r.stdout


def test_simulator_command_serves_the_platform(tmp_path: Path) -> None:
    # Port 0: the simulator takes a free port itself and says which in its first line (a port
    # picked here and freed before it starts could be taken by another process meanwhile).
    proc = spawn("simulator", "--port", "0", cwd=tmp_path)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()  # printed once it listens; "" if it died first
        assert "listening on http://127.0.0.1:" in banner, banner + (proc.stderr.read() if proc.stderr else "")
        url = banner.split("listening on ")[1].split()[0]
        write_settings(
            tmp_path / "settings.yaml", his_url="sqlite:///his.db", outbox_url="sqlite:///o.db", base_url=url,
        )
        r = crowd_sync("lookup", TEST_IDS[0], "--config", "settings.yaml", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "J01" in r.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)


def test_offline_commands_work_without_the_platform_credentials(site: Path) -> None:
    """An operator's shell lacks the service's credentials: status and retry still work."""
    assert crowd_sync("once", "--config", "settings.yaml", cwd=site).returncode == 0
    text = (site / "settings.yaml").read_text(encoding="utf-8")
    text = text.replace("password: Ehr123456@", "password: ${CROWD_SYNC_TEST_UNSET_PASSWORD}")
    text = text.replace("app_key: ", "app_key_file: /nonexistent/credentials/app_key\n  old_app_key: ", 1)
    text = text.replace(f"url: sqlite:///{site / 'his.db'}", "url: ${CROWD_SYNC_TEST_UNSET_HIS_URL}")
    text = "\n".join(line for line in text.splitlines() if "old_app_key" not in line) + "\n"
    (site / "settings.yaml").write_text(text, encoding="utf-8")

    status = crowd_sync("status", "--json", "--config", "settings.yaml", cwd=site)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["sent"] == 12
    assert crowd_sync("retry", "--status", "failed", "--config", "settings.yaml", cwd=site).returncode == 0

    once = crowd_sync("once", "--config", "settings.yaml", cwd=site)
    assert once.returncode == 2
    for named in ("CROWD_SYNC_TEST_UNSET_PASSWORD", "app_key_file", "CROWD_SYNC_TEST_UNSET_HIS_URL"):
        assert named in once.stderr
