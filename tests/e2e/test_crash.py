"""Crash safety: SIGKILL the daemon at named points and at random moments, restart it,
and check that nothing is lost.

The daemon is the real command (`python -m sync run`) in a subprocess; the platform
simulator runs in this process, so it outlives every death of the daemon and its
``records`` and ``counters`` are the platform's truth. After the last restart the
daemon drains and is stopped with SIGTERM; then the platform must hold exactly the
HIS's key-population visits, field by field, the outbox must be settled and
unleased, and the instance lock free.

``his.lookback_s`` is 0: the poll cursor alone says where reading resumes, so a
cursor that ran ahead of what the outbox recorded would lose rows for good.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sync.crashpoints import ENV as CRASH_ENV
from sync.settings import Upstream
from sync.upstream.client import Client
from sync.upstream.signing import EHRKEY_HEADER, ENDPOINTS, event_code, signed_query
from sync.upstream.simulator import (
    TEST_APP_KEY,
    TEST_APP_KEY_ENCODED,
    TEST_IDS,
    TEST_PASSWORD,
    TEST_USERNAME,
    SimConfig,
    Simulator,
)
from sync.upstream.tokens import MemoryTokenStore
from tests.support import His, expected_payload, his_now, make_visit, write_settings

ROOT = Path(__file__).resolve().parents[2]

CONCURRENCY = 4
# The default: rows leased by a killed daemon must come back at its restart, not after the lease.
LEASE_S = 300
POLL_EVERY_S = 5  # the smallest the settings allow
BATCH_SIZE = 7  # small, so one poll records many batches (many cursor moves to crash between)
LATENCY_S = 0.02  # every answer of the platform waits this long, so uploads are in flight when killed
DRAIN_TIMEOUT_S = 90.0
# SIGKILLs of the random-kill run, alternately at a random moment and with uploads in flight;
# ``CROWD_SYNC_CRASH_KILLS`` runs more.
RANDOM_KILLS = int(os.environ.get("CROWD_SYNC_CRASH_KILLS", "5"))


@dataclass(kw_only=True, repr=False)
class Figures:
    """What a crash run measured, printed and put in assertion messages."""

    visits: int
    key_visits: int
    kills: int = 0
    kills_while_uploading: int = 0
    duplicates: int = 0
    logins: int = 0
    drain_s: float = 0.0
    total_s: float = 0.0

    def __repr__(self) -> str:
        return (
            f"visits {self.visits} (key population {self.key_visits}), kills {self.kills} "
            f"({self.kills_while_uploading} while uploading), duplicates {self.duplicates}, "
            f"logins {self.logins}, drain after last restart {self.drain_s:.1f}s, total {self.total_s:.1f}s"
        )


@dataclass
class Harness:
    """A hospital directory: a SQLite HIS, a SQLite outbox and settings pointing at ``sim``."""

    root: Path
    sim: Simulator
    visits: list[dict[str, Any]] = field(default_factory=list)
    starts: int = 0
    started_at: float = field(default_factory=time.monotonic)
    # Per restart: where the platform's request log stood and what the outbox had recorded as sent.
    restarts: list[tuple[int, frozenset[str]]] = field(default_factory=list)

    @classmethod
    def create(
        cls, root: Path, sim: Simulator, *, visits: int, seed: int = 1, latency_s: float = LATENCY_S
    ) -> Harness:
        h = cls(root, sim)
        rng = random.Random(seed)
        base = his_now() - timedelta(hours=3)
        for n in range(1, visits + 1):
            # Three visits share each second: the cursor's (changed_at, lsh) tie-break matters.
            changed = base + timedelta(seconds=n // 3)
            # One visit in four is not in the key population: it must stay home.
            h.visits.append(make_visit(n, changed=changed, rng=rng, is_key="0" if n % 4 == 0 else "1"))
        his = His(f"sqlite:///{root / 'his.db'}")
        his.insert(h.visits)
        his.dispose()
        write_settings(
            root / "settings.yaml",
            his_url=f"sqlite:///{root / 'his.db'}",
            outbox_url=f"sqlite:///{root / 'outbox.db'}",
            base_url=sim.url,
            overrides={
                "upstream": {"concurrency": CONCURRENCY, "timeout_s": 10},
                "his": {"batch_size": BATCH_SIZE, "lookback_s": 0, "settle_delay_s": 0},
                "outbox": {"lease_s": LEASE_S},
                "schedule": {"poll_every_s": POLL_EVERY_S},
                "retry": {"first_delay_s": 1, "max_delay_s": 2},
            },
        )
        sim.faults.latency_s = latency_s
        return h

    # -- the HIS's truth ---------------------------------------------------------

    @property
    def key_visits(self) -> dict[str, dict[str, Any]]:
        return {v["serial_no"]: v for v in self.visits if v["is_key"] == "1"}

    @property
    def other_visits(self) -> dict[str, dict[str, Any]]:
        return {v["serial_no"]: v for v in self.visits if v["is_key"] != "1"}

    def figures(self) -> Figures:
        return Figures(visits=len(self.visits), key_visits=len(self.key_visits))

    # -- the daemon ----------------------------------------------------------------

    def start(self, crash_at: str | None = None) -> subprocess.Popen[bytes]:
        """``crowd-sync run`` in the background; its log goes to ``run-N.log`` (a pipe nobody reads would fill)."""
        if self.starts:
            # The previous daemon is dead: what it recorded as sent must never be uploaded again.
            sent = frozenset(lsh for lsh, r in self.outbox().items() if r["status"] == "sent")
            self.restarts.append((len(self.sim.requests_log), sent))
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        env["PYTHONPATH"] = str(ROOT)
        if crash_at:
            env[CRASH_ENV] = crash_at
        with open(self.root / f"run-{self.starts}.log", "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "sync", "run", "--config", "settings.yaml"],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )

    def log_tail(self, chars: int = 3000) -> str:
        path = self.root / f"run-{self.starts}.log"
        return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else ""

    def wait_killed(self, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the crash point was never reached in {timeout:.0f}s\n{self.log_tail()}") from None
        assert rc == -signal.SIGKILL, f"expected death by SIGKILL, got exit {rc}\n{self.log_tail()}"

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the daemon ignored SIGTERM\n{self.log_tail()}") from None
        assert rc == 0, f"SIGTERM should end the daemon with 0, got {rc}\n{self.log_tail()}"

    def once(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sync", "once", "--config", "settings.yaml"],
            cwd=self.root, capture_output=True, text=True, timeout=120, check=False,
            env={**{k: v for k, v in os.environ.items() if k != CRASH_ENV}, "PYTHONPATH": str(ROOT)},
        )

    # -- the outbox ------------------------------------------------------------------

    def outbox(self) -> dict[str, dict[str, Any]]:
        path = self.root / "outbox.db"
        if not path.exists():
            return {}
        db = sqlite3.connect(path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            return {r["lsh"]: dict(r) for r in db.execute("SELECT * FROM sync_outbox")}
        except sqlite3.OperationalError:
            return {}  # the schema is not created yet
        finally:
            db.close()

    def drained(self) -> bool:
        rows = self.outbox()
        settled = all(
            r["status"] not in ("pending", "failed") and r["lease_owner"] is None for r in rows.values()
        )
        upstream = set(self.sim.records)  # one C-level copy: safe against the server's threads
        return settled and len(rows) == len(self.visits) and set(self.key_visits) <= upstream

    def wait_drained(self, proc: subprocess.Popen[bytes], timeout: float = DRAIN_TIMEOUT_S) -> float:
        """Seconds until drained; fails if the daemon dies or the timeout passes."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {proc.returncode} before draining\n{self.log_tail()}")
            # Drained, and by this daemon's own full cycle: it got the instance lock and
            # set up its signal handlers (SIGTERM during start-up would just kill it).
            if "cycle_finished" in self.log_tail(chars=1_000_000) and self.drained():
                return time.monotonic() - started
            time.sleep(0.2)
        counts: dict[str, int] = {}
        for r in self.outbox().values():
            key = f"{r['status']}{' (leased)' if r['lease_owner'] else ''}"
            counts[key] = counts.get(key, 0) + 1
        missing = sorted(set(self.key_visits) - set(self.sim.records))
        raise AssertionError(
            f"not drained after {timeout:.0f}s: outbox {counts}, {len(missing)} key visits missing upstream "
            f"{missing[:10]}\n{self.log_tail()}"
        )

    def cursor(self) -> tuple[datetime, str] | None:
        db = sqlite3.connect(self.root / "outbox.db", timeout=30)
        try:
            row = db.execute("SELECT changed_at, lsh FROM sync_cursor WHERE name = 'his'").fetchone()
        finally:
            db.close()
        return None if row is None or row[0] is None else (datetime.fromisoformat(row[0]), row[1] or "")

    def assert_cursor_covers_only_recorded(self) -> None:
        """Every HIS row at or before the cursor is in the outbox: reading resumes after it."""
        cursor = self.cursor()
        if cursor is None:
            return
        recorded = set(self.outbox())
        behind = [v["serial_no"] for v in self.visits if (v["changed"], v["serial_no"]) <= cursor]
        lost = [lsh for lsh in behind if lsh not in recorded]
        assert lost == [], f"the cursor {cursor} passed {len(lost)} rows the outbox never recorded: {lost[:10]}"

    # -- the verdict -------------------------------------------------------------------

    def duplicates(self) -> int:
        # Every visit has one version, so each 修改成功 is an upload the outbox had not recorded.
        return self.sim.counters["updates"]

    def sent_again(self) -> list[str]:
        """Records uploaded after a restart although the outbox had recorded them as sent before it.

        Uploads the outbox had not recorded yet (in flight, or their outcome still in memory
        when the process died) are sent again by design; the upsert by lsh makes that harmless.
        """
        path = ENDPOINTS["upload"].path
        seen = list(self.sim.requests_log)  # one C-level copy: safe against the server's threads
        again: set[str] = set()
        for start, sent in self.restarts:
            for req in seen[start:]:
                if req.path == path and (lsh := json.loads(req.body).get("lsh")) in sent:
                    again.add(lsh)
        return sorted(again)

    def check(self, figures: Figures, *, min_duplicates: int = 0) -> None:
        """Everything the HIS holds arrived exactly as it should; nothing is left behind."""
        figures.duplicates = self.duplicates()
        figures.logins = self.sim.counters["logins"]
        figures.total_s = time.monotonic() - self.started_at
        print(f"\n[crash] {figures}")
        records = self.sim.records
        assert set(records) == set(self.key_visits), f"platform holds the wrong visits; {figures}"
        for lsh, v in self.key_visits.items():
            assert records[lsh] == expected_payload(v), f"{lsh} differs upstream; {figures}"
        assert self.sim.counters["rejections"] == 0, figures
        assert self.sim.counters["creates"] == len(self.key_visits), figures

        rows = self.outbox()
        statuses = {lsh: r["status"] for lsh, r in rows.items()}
        assert {lsh for lsh, s in statuses.items() if s == "sent"} == set(self.key_visits), figures
        assert {lsh for lsh, s in statuses.items() if s == "skipped"} == set(self.other_visits), figures
        assert [lsh for lsh, r in rows.items() if r["lease_owner"] is not None] == [], figures
        for lsh, r in rows.items():
            if r["status"] == "sent":
                assert json.loads(r["payload"], parse_float=Decimal) == expected_payload(self.key_visits[lsh])

        again = self.sent_again()
        assert again == [], f"{len(again)} records sent again though recorded as sent: {again[:10]}; {figures}"
        assert figures.duplicates >= min_duplicates, f"fewer than {min_duplicates} duplicates; {figures}"
        # The lock died with each process, and SIGTERM released the last one.
        once = self.once()
        assert once.returncode == 0, f"`once` after the runs: exit {once.returncode}\n{once.stdout}{once.stderr[-2000:]}"
        assert "enqueued 0, sent 0" in once.stdout, once.stdout
        assert self.sim.counters["updates"] == figures.duplicates, "once re-sent what was already recorded"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


# -- a request cut short by the kill ----------------------------------------------------------


def test_an_upload_cut_off_by_a_kill_is_dropped_unanswered(sim: Simulator) -> None:
    """urllib3 sends an upload's headers and its body in two writes, so a SIGKILL can land
    between them. The platform then holds half a request: like any HTTP server it drops it,
    neither storing nor rejecting anything (the checks below demand zero rejections)."""
    body = json.dumps(
        {
            "cardType": "10", "cardNo": TEST_IDS[0], "type": "1", "lsh": "ZY2024000001", "code": "ZY001",
            "enterDate": "2024-07-01", "leaveDate": "2024-07-05", "keyCrowd": "1", "icdName": "肺炎",
            "icdCode": "J18.9", "totalFee": 1234.56, "insFee": 1000.00, "totalPrepayment": 0,
            "deficientFee": 234.56, "settlementDate": "2024-07-05",
        },
        ensure_ascii=False,
    ).encode("utf-8")
    up = Upstream(
        base_url=sim.url, app_key=TEST_APP_KEY_ENCODED, username=TEST_USERNAME, password=TEST_PASSWORD, timeout_s=10
    )
    with Client(up, MemoryTokenStore()) as client:
        token = client.login().value
        query = signed_query(event_code("test", "upload"), TEST_APP_KEY, int(time.time() * 1000))
        head = (
            f"POST {ENDPOINTS['upload'].path}?{query} HTTP/1.1\r\nHost: platform\r\n"
            f"{EHRKEY_HEADER[0]}: {EHRKEY_HEADER[1]}\r\naccesstoken: {token}\r\n"
            f"Content-Type: application/json;charset=UTF-8\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        host, port = sim.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(head + body[: len(body) // 2])
            conn.shutdown(socket.SHUT_WR)  # the process is gone: nothing more will come
            # Reading to the end waits until the platform is done with the connection.
            answer = b"".join(iter(lambda: conn.recv(65536), b""))
        assert answer == b"", f"the platform answered half a request: {answer[:300]!r}"
        assert sim.records == {}
        assert (sim.counters["uploads"], sim.counters["rejections"]) == (0, 0), dict(sim.counters)

        # The same upload sent whole is new to the platform.
        assert client.upload(body.decode("utf-8"), lsh="ZY2024000001").created
    assert sim.counters["rejections"] == 0 and set(sim.records) == {"ZY2024000001"}


# -- named crash points ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("crash_at", "min_duplicates"),
    [
        # The 20th accepted upload: the platform holds it, the outbox does not know.
        ("after_upload_accepted:20", 1),
        # Inside the 3rd batch's transaction: rows inserted, the cursor not yet moved.
        ("mid_enqueue:3", 0),
        # The first poll's 4th write, before its transaction: 3 writes recorded. (A write
        # takes at most 2 batches, so the first poll's 22 batches take at least 11 writes.)
        ("before_cursor_move:4", 0),
    ],
)
def test_killed_at_a_named_point_then_restarted_loses_nothing(
    tmp_path: Path, sim: Simulator, crash_at: str, min_duplicates: int
) -> None:
    h = Harness.create(tmp_path, sim, visits=150)
    figures = h.figures()

    h.wait_killed(h.start(crash_at=crash_at))
    figures.kills = 1
    figures.kills_while_uploading = 1 if sim.counters["uploads"] else 0
    h.assert_cursor_covers_only_recorded()
    point, _, nth = crash_at.partition(":")
    if point in ("mid_enqueue", "before_cursor_move"):
        # Killed in the first poll's n-th write: the writes before it are recorded whole
        # (each one batch, or every batch that waited while the one before ran, so at
        # least n - 1 batches), that one not at all, and nothing has been sent yet.
        assert sim.records == {}
        recorded = len(h.outbox())
        assert recorded % BATCH_SIZE == 0 and recorded >= BATCH_SIZE * (int(nth) - 1)
        assert recorded < len(h.visits)

    proc = h.start()
    try:
        figures.drain_s = h.wait_drained(proc)
    finally:
        h.stop(proc)
    # Only what the outbox had not recorded is sent twice; the point itself must have been hit.
    h.check(figures, min_duplicates=min_duplicates)


def test_killed_during_login_costs_exactly_one_more_login(tmp_path: Path, sim: Simulator) -> None:
    h = Harness.create(tmp_path, sim, visits=60)
    figures = h.figures()

    h.wait_killed(h.start(crash_at="during_login"))
    figures.kills = 1
    # The platform issued a token that died with the process before it was stored.
    assert sim.counters["logins"] == 1
    assert sim.counters["uploads"] == 0

    proc = h.start()
    try:
        figures.drain_s = h.wait_drained(proc)
    finally:
        h.stop(proc)
    h.check(figures)
    assert figures.duplicates == 0, figures
    # One login for the lost token, one for the restart: never one per record.
    assert figures.logins == 2, figures


def test_killed_mid_upload_resumes_sending_at_once_despite_a_long_lease(tmp_path: Path, sim: Simulator) -> None:
    """Was: rows claimed by the killed process waited lease_s (300 s) after the restart."""
    h = Harness.create(tmp_path, sim, visits=200, latency_s=0.04)
    figures = h.figures()
    proc = h.start()
    try:
        while sim.counters["uploads"] < 30:
            assert proc.poll() is None, h.log_tail()
            time.sleep(0.005)
        proc.kill()
        proc.wait(timeout=30)
        figures.kills = figures.kills_while_uploading = 1
        leased = [lsh for lsh, r in h.outbox().items() if r["lease_owner"]]
        assert leased, "the kill left no leased rows: nothing to prove"
        time.sleep(0.5)  # the platform finishes what the dead process had sent before it died
        uploads = sim.counters["uploads"]
        restarted = time.monotonic()
        proc = h.start()
        while sim.counters["uploads"] == uploads:
            assert proc.poll() is None, h.log_tail()
            assert time.monotonic() - restarted < 60, h.log_tail()
            time.sleep(0.01)
        resumed_s = time.monotonic() - restarted
        figures.drain_s = h.wait_drained(proc)
    finally:
        if proc.poll() is None:
            h.stop(proc)
    h.check(figures)
    print(f"[crash] {len(leased)} rows leased by the killed daemon; sending resumed {resumed_s:.2f} s after the restart")
    # Python's start-up, the settings, the outbox and the first cycle: seconds, not lease_s.
    assert resumed_s < 15, resumed_s
    assert figures.drain_s < 60, figures


# -- random kills ----------------------------------------------------------------------------


def random_kills(
    h: Harness, *, kills: int, seed: int, blind: tuple[float, float] = (0.2, 1.5), uploading: tuple[float, float] = (0.1, 0.8)
) -> Figures:
    """Start the daemon and SIGKILL it ``kills`` times at random moments, restarting it each
    time, then let the last one drain and stop it with SIGTERM.

    Kills alternate: one ``blind`` seconds after the start (start-up, poll or dispatch,
    whatever it is doing), one ``uploading`` seconds after the run's first upload, so that
    most land with uploads in flight."""
    figures = h.figures()
    rng = random.Random(seed)
    proc = h.start()
    try:
        for i in range(kills):
            uploads = h.sim.counters["uploads"]
            if i % 2:
                # The restarted daemon takes back the leases of the killed one at once.
                ready_by = time.monotonic() + POLL_EVERY_S + 10
                while time.monotonic() < ready_by and h.sim.counters["uploads"] == uploads and not h.drained():
                    time.sleep(0.01)
                time.sleep(rng.uniform(*uploading))
            else:
                time.sleep(rng.uniform(*blind))
            proc.kill()
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}\n{h.log_tail()}"
            figures.kills += 1
            if h.sim.counters["uploads"] > uploads:
                figures.kills_while_uploading += 1
            proc = h.start()
        figures.drain_s = h.wait_drained(proc)
    finally:
        if proc.poll() is None:
            h.stop(proc)
    return figures


def test_random_kills_during_dispatch_lose_nothing(tmp_path: Path, sim: Simulator) -> None:
    # A slower platform than the named points use, so that dispatching spans the kills.
    h = Harness.create(tmp_path, sim, visits=300, seed=7, latency_s=0.04)
    figures = random_kills(h, kills=RANDOM_KILLS, seed=20240611)
    # Each kill costs only the uploads it interrupted; a restart reuses the stored token.
    h.check(figures)
    assert figures.kills_while_uploading >= 1, f"no kill landed during dispatch; {figures}"
    assert figures.logins <= 1 + figures.kills, figures
