"""An outage of the platform under the real daemon (`crowd-sync run` in a subprocess).

While every request gets an HTML 502 page (or a reset), login included, the daemon must
pause sending: one request per probe step, no record charged or given up, `/healthz` 503
and `status` saying "platform unreachable since …". Once the platform is back, the backlog
must drain at the next probe, without waiting for the next poll.

``CROWD_SYNC_OUTAGE_S`` (default 6) and ``CROWD_SYNC_OUTAGE_DEFAULTS=1`` (the shipped
retry and poll settings instead of short test ones) make the same test measure a longer
outage; the figures are printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sync.upstream.simulator import SimConfig, Simulator
from tests.support import His, expected_payload, his_now, make_visit, write_settings

ROOT = Path(__file__).resolve().parents[2]
OUTAGE_S = float(os.environ.get("CROWD_SYNC_OUTAGE_S", "6"))
SHIPPED = os.environ.get("CROWD_SYNC_OUTAGE_DEFAULTS") == "1"
# Short retries for the test: probes at about 1, 2 and then every 2-4 s, so that a few seconds
# of outage see the back-off grow and the drain comes within one probe step.
TEST_RETRY = {"first_delay_s": 1, "max_delay_s": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _outbox(root: Path) -> dict[str, dict[str, Any]]:
    db = sqlite3.connect(root / "outbox.db", timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return {r["lsh"]: dict(r) for r in db.execute("SELECT * FROM sync_outbox")}
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def _crowd_sync(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync", *args, "--config", "settings.yaml"], cwd=root, capture_output=True,
        text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


@pytest.mark.parametrize("down_with", ["502", "reset"])
def test_an_outage_under_the_daemon_pauses_politely_and_the_backlog_drains_at_once(
    tmp_path: Path, sim: Simulator, down_with: str
) -> None:
    base = his_now() - timedelta(hours=1)
    visits = [make_visit(n, changed=base + timedelta(seconds=n)) for n in range(1, 43)]
    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    his.insert(visits)
    his.dispose()
    port = _free_port()
    retry = {} if SHIPPED else {"retry": TEST_RETRY}
    write_settings(
        tmp_path / "settings.yaml", his_url=f"sqlite:///{tmp_path / 'his.db'}",
        outbox_url=f"sqlite:///{tmp_path / 'outbox.db'}", base_url=sim.url,
        overrides={"schedule": {"poll_every_s": 120}, "metrics": {"listen": f"127.0.0.1:{port}"},
                   "his": {"settle_delay_s": 0}, **retry},
    )
    if SHIPPED:
        # write_settings sets short retries for the other tests: put back the shipped ones.
        text = (tmp_path / "settings.yaml").read_text(encoding="utf-8")
        (tmp_path / "settings.yaml").write_text(
            text.replace("first_delay_s: 1", "first_delay_s: 30").replace("max_delay_s: 60", "max_delay_s: 3600"),
            encoding="utf-8",
        )
    sim.faults.down = True
    sim.faults.down_with = down_with

    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync", "run", "--config", "settings.yaml"], cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )

    def tail() -> str:
        return (tmp_path / "run.log").read_text(encoding="utf-8", errors="replace")[-3000:]

    try:
        # The first cycle reads the 42 visits and finds the platform down.
        deadline = time.monotonic() + 60
        health: tuple[int, dict[str, Any]] = (0, {})
        while time.monotonic() < deadline:
            assert proc.poll() is None, tail()
            try:
                health = _healthz(port)
            except OSError:
                health = (0, {})
            if health[1].get("status") == "unreachable":
                break
            time.sleep(0.1)
        assert health[0] == 503 and str(health[1]["reason"]).startswith("platform unreachable since"), health
        down_since = time.monotonic()
        requests_at_start = sim.counters["requests"]

        # What an operator asks during the outage (the commands take their time while the daemon probes).
        status = _crowd_sync(tmp_path, "status", "--json")
        assert status.returncode == 0, status.stderr
        down = json.loads(status.stdout)["platform_unreachable"]
        assert down and down["since"], status.stdout
        text = _crowd_sync(tmp_path, "status").stdout
        assert "platform unreachable since" in text, text
        assert _healthz(port)[0] == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert "crowd_sync_platform_unreachable 1.0" in metrics

        time.sleep(max(0.0, down_since + OUTAGE_S - time.monotonic()))
        rows = _outbox(tmp_path)
        assert {(r["status"], r["attempts"]) for r in rows.values()} == {("pending", 0)}, "records were charged"
        during = sim.counters["requests"]  # every request of the outage so far, the first cycle's included
        logins = sim.counters["requests_login"]
        outage_s = time.monotonic() - down_since
        sim.faults.down = False
        recovered = time.monotonic()
        while True:
            assert proc.poll() is None, tail()
            assert time.monotonic() - recovered < 120, f"not drained\n{tail()}"
            rows = _outbox(tmp_path)
            if rows and all(r["status"] == "sent" for r in rows.values()):
                break
            time.sleep(0.05)
        drain_s = time.monotonic() - recovered
        # /healthz takes the news at the end of the cycle that sent the last record: a moment later.
        while _healthz(port)[1]["status"] == "unreachable":
            assert time.monotonic() - recovered < drain_s + 10, f"/healthz still unreachable\n{tail()}"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        log.close()

    assert all(sim.records[v["serial_no"]] == expected_payload(v) for v in visits)
    print(
        f"\n[outage {down_with}] {outage_s:.0f} s down: {during} requests ({logins} logins, "
        f"{during - requests_at_start} after the pause began), 0 dead, 0 attempts charged; "
        f"queue empty {drain_s:.1f} s after the platform came back (poll every 120 s)"
    )
    # Without a token every probe is one login: a handful of requests, never one per record.
    assert logins == during and during <= 3 + outage_s / 1.0, (during, logins)
    probe_cap = 60.0 if SHIPPED else TEST_RETRY["max_delay_s"]
    assert drain_s < probe_cap + 10, drain_s
