"""The command line's error boundary: which exit code, and one paragraph with the fix, never a traceback.

0 done; 3 records left failed/invalid/dead; 2 configuration error (fix something);
75 temporarily unavailable (try again later); 1 unexpected.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync.upstream.simulator import SimConfig, Simulator
from tests.e2e.test_cli import ROOT, closed_port_fixture, crowd_sync
from tests.support import His, his_now, make_visit, write_settings

__all__ = ["closed_port_fixture"]  # the fixture, shared with test_cli


def _site(tmp_path: Path, *, outbox_url: str, base_url: str = "http://127.0.0.1:9") -> Path:
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    his.insert([make_visit(1, changed=his_now() - timedelta(minutes=5))])
    his.dispose()
    write_settings(tmp_path / "settings.yaml", his_url=f"sqlite:///{tmp_path / 'his.db'}",
                   outbox_url=outbox_url, base_url=base_url)
    return tmp_path


def _one_paragraph(r: subprocess.CompletedProcess[str]) -> str:
    """The error the command printed: one stderr line, starting `crowd-sync:`, among the log lines."""
    assert "Traceback" not in r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("crowd-sync: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["status", "once", "report"])
def test_an_outbox_server_that_is_down_exits_75_naming_it(tmp_path: Path, closed_port: int, command: str) -> None:
    url = f"mysql+pymysql://crowd:Outbox-pw-77@127.0.0.1:{closed_port}/outbox"
    site = _site(tmp_path, outbox_url=url)
    args = ["report", "--month", "2026-10"] if command == "report" else [command]
    r = crowd_sync(*args, "--config", "settings.yaml", cwd=site)
    assert r.returncode == 75, r.stdout + r.stderr
    line = _one_paragraph(r)
    assert "temporarily unavailable" in line and f"127.0.0.1:{closed_port}/outbox" in line
    assert "Outbox-pw-77" not in r.stdout + r.stderr
    assert "firewall" in line  # the fix


def test_check_reports_an_unreachable_outbox_as_a_fail_line_and_checks_the_his(
    tmp_path: Path, closed_port: int
) -> None:
    site = _site(tmp_path, outbox_url=f"postgresql+psycopg2://crowd@127.0.0.1:{closed_port}/outbox")
    r = crowd_sync("check", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 75, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    fail = next(line for line in r.stdout.splitlines() if line.startswith("[FAIL] outbox"))
    assert f"127.0.0.1:{closed_port}" in fail
    assert "处理 fix:" in r.stdout
    # The checks that need no outbox still ran.
    assert "[ OK ] HIS database and query" in r.stdout


def test_an_outbox_path_under_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file where a directory should be", encoding="utf-8")
    site = _site(tmp_path, outbox_url="sqlite:///data/outbox.db")
    for command in ("once", "status", "check"):
        r = crowd_sync(command, "--config", "settings.yaml", cwd=site)
        assert r.returncode == 2, (command, r.stdout + r.stderr)
        assert "Traceback" not in r.stdout + r.stderr
        shown = r.stdout if command == "check" else _one_paragraph(r)
        assert f"{tmp_path / 'data'} is a file" in shown or f"{tmp_path / 'data'} cannot be created" in shown, shown
    assert "[FAIL] outbox" in r.stdout and "[ OK ] HIS database and query" in r.stdout


def test_an_outbox_file_that_is_no_database_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "outbox.db").write_bytes(b"this is a spreadsheet, not a database " * 100)
    site = _site(tmp_path, outbox_url="sqlite:///outbox.db")
    r = crowd_sync("once", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 2, r.stdout + r.stderr
    line = _one_paragraph(r)
    assert str(tmp_path / "outbox.db") in line and "outbox.url" in line


@pytest.mark.mariadb
def test_a_rejected_outbox_password_exits_2_with_the_password_hidden(tmp_path: Path, mariadb_url: str) -> None:
    url = sa.make_url(mariadb_url).set(username="no_such_crowd", password="Wr0ng-Outbox-pw")
    site = _site(tmp_path, outbox_url=url.render_as_string(hide_password=False))
    r = crowd_sync("once", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 2, r.stdout + r.stderr
    line = _one_paragraph(r)
    assert "configuration error" in line and "refused" in line and "outbox.url" in line
    assert "Wr0ng-Outbox-pw" not in r.stdout + r.stderr


def test_read_only_commands_never_create_an_outbox(tmp_path: Path) -> None:
    site = _site(tmp_path, outbox_url="sqlite:///state/outbox.db")
    for args in (["status"], ["status", "--json"], ["report", "--month", "2026-10"]):
        r = crowd_sync(*args, "--config", "settings.yaml", cwd=site)
        assert r.returncode == 2, (args, r.stdout + r.stderr)
        line = _one_paragraph(r)
        assert str(tmp_path / "state" / "outbox.db") in line and "does not exist" in line
        assert not (tmp_path / "state").exists(), args

    # An empty file (a wrong path someone touched) is refused too, and stays empty.
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "outbox.db").touch()
    r = crowd_sync("status", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "crowd-sync migrate" in _one_paragraph(r)
    db = sqlite3.connect(tmp_path / "state" / "outbox.db")
    try:
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    finally:
        db.close()


def test_status_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`crowd-sync status | head -1`: the reader goes away before the status is written."""
    site = _site(tmp_path, outbox_url="sqlite:///outbox.db")
    assert crowd_sync("migrate", "--config", "settings.yaml", cwd=site).returncode == 0
    for args in (["status"], ["--help"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "sync", *args, "--config", "settings.yaml"],
            cwd=site, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
        assert err == "", err
        # As any command whose reader went away (128 + SIGPIPE); argparse swallows the error of --help itself.
        assert proc.returncode in ((141,) if args == ["status"] else (0, 141)), args


def test_once_with_the_platform_unreachable_exits_75(tmp_path: Path, closed_port: int) -> None:
    site = _site(tmp_path, outbox_url="sqlite:///outbox.db", base_url=f"http://127.0.0.1:{closed_port}")
    r = crowd_sync("once", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 75, r.stdout + r.stderr
    line = _one_paragraph(r)
    assert f"127.0.0.1:{closed_port}" in line and "nothing was sent" in line


def test_once_with_a_record_refused_by_validation_still_exits_3(tmp_path: Path) -> None:
    """Left over records are the records' business (3), not the platform's (75), once it answers."""
    with Simulator(SimConfig()) as sim:
        site = _site(tmp_path, outbox_url="sqlite:///outbox.db", base_url=sim.url)
        his = His(f"sqlite:///{tmp_path / 'his.db'}")
        his.insert([make_visit(2, changed=his_now() - timedelta(minutes=4), total=Decimal("-1.00"))])
        his.dispose()
        r = crowd_sync("once", "--config", "settings.yaml", cwd=site)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "sent 1" in r.stdout


def test_help_explains_every_exit_code() -> None:
    r = crowd_sync("--help", cwd=ROOT)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for code in ("0 ", "3 ", "2 ", "75 ", "1 "):
        assert code in text
    assert "temporarily unavailable" in text and "configuration error" in text
