"""`run` under systemd: READY only once everything checked out, watchdog fed, STOPPING on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import IO

from sync.upstream.simulator import SimConfig, Simulator
from tests.e2e.test_cli import ROOT, spawn
from tests.support import His, make_visit, write_settings


def _receive(sock: socket.socket, until: float) -> list[str]:
    messages: list[str] = []
    while time.monotonic() < until:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any("STOPPING=1" in m for m in messages):
            break
    return messages


def test_notify_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    his.insert([make_visit(1, changed=his.now() - timedelta(minutes=5))])
    his.dispose()
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.5)
    with Simulator(SimConfig()) as sim:
        write_settings(
            tmp_path / "settings.yaml",
            his_url=f"sqlite:///{tmp_path / 'his.db'}",
            outbox_url="sqlite:///outbox.db",
            base_url=sim.url,
        )
        proc = spawn(
            "run", "--config", "settings.yaml", cwd=tmp_path,
            env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"},
        )
        try:
            deadline = time.monotonic() + 30
            first: list[str] = []
            while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in first):
                first += _receive(sock, min(deadline, time.monotonic() + 1))
            assert any(m.startswith("READY=1") for m in first), first
            assert any("WATCHDOG=1" in m for m in first), first
            ready_at = next(i for i, m in enumerate(first) if m.startswith("READY=1"))
            assert all("WATCHDOG=1" not in m for m in first[:ready_at])
        finally:
            proc.send_signal(signal.SIGTERM)
            rest = _receive(sock, time.monotonic() + 20)
            proc.communicate(timeout=30)
        sock.close()
    assert proc.returncode == 0
    assert any("STOPPING=1" in m for m in rest), rest


def spawn_to(*args: str, cwd: Path, stderr: IO[str], env: dict[str, str]) -> int:
    """Run a command with its stderr on ``stderr`` (as systemd hands the service its journal stream)."""
    return subprocess.run(
        [sys.executable, "-m", "sync", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=False, timeout=60,
    ).returncode


def test_every_stderr_line_carries_its_journald_priority(tmp_path: Path) -> None:
    """stderr connected to the journal ($JOURNAL_STREAM names it): `<N>` before each line, so that
    `journalctl -p warning` shows warnings and errors; elsewhere the lines stay as they are."""
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    his.insert([make_visit(1, changed=his.now() - timedelta(minutes=5))])
    his.dispose()
    with socket.socket() as closed:  # bound, never listening: the platform is unreachable
        closed.bind(("127.0.0.1", 0))
        write_settings(
            tmp_path / "settings.yaml", his_url=f"sqlite:///{tmp_path / 'his.db'}", outbox_url="sqlite:///outbox.db",
            base_url=f"http://127.0.0.1:{closed.getsockname()[1]}",
        )
        journal = tmp_path / "journal"
        with journal.open("w") as stream:
            st = os.fstat(stream.fileno())
            proc = spawn_to("once", "--config", "settings.yaml", cwd=tmp_path, stderr=stream,
                            env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        plain = subprocess.run(
            [sys.executable, "-m", "sync", "check", "--config", "settings.yaml"], cwd=tmp_path, capture_output=True,
            text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            check=False, timeout=60,
        )
    assert proc == 75
    lines = journal.read_text(encoding="utf-8").splitlines()
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines
    by_priority = {int(line[1]) for line in lines}
    assert {3, 4, 6} <= by_priority  # the error paragraph, the network warning, the info lines
    warning = next(line for line in lines if '"upstream_error"' in line)
    assert warning.startswith("<4>{") and json.loads(warning[3:])["level"] == "warning"
    assert any(line.startswith("<3>crowd-sync: ") for line in lines)
    # The same command with stderr a pipe (run by hand, or redirected): no prefix.
    assert plain.returncode == 75
    assert plain.stderr and not any(line.startswith("<") for line in plain.stderr.splitlines())


def test_the_priority_prefix_can_be_asked_for_in_the_settings(tmp_path: Path) -> None:
    write_settings(
        tmp_path / "settings.yaml", his_url="sqlite:///his.db", outbox_url="sqlite:///outbox.db",
        base_url="http://127.0.0.1:9", overrides={"log": {"priority_prefix": True, "format": "console"}},
    )
    r = subprocess.run(
        [sys.executable, "-m", "sync", "migrate", "--config", "settings.yaml"], cwd=tmp_path, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("<6>") for line in lines), lines
