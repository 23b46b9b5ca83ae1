"""`run` under systemd: READY only once everything checked out, watchdog fed, STOPPING on SIGTERM."""

from __future__ import annotations

import signal
import socket
import time
from datetime import timedelta
from pathlib import Path

from sync.upstream.simulator import SimConfig, Simulator
from tests.e2e.test_cli import spawn
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
