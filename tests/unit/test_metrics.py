"""/metrics and /healthz as Prometheus and a load balancer see them: real HTTP,
a real outbox on SQLite, a real pipeline against the simulator."""

from __future__ import annotations

import json
import platform
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from sync import __version__
from sync.app import make_pipeline
from sync.daemon import Daemon
from sync.errors import ConfigError
from sync.metrics import Metrics, MetricsServer
from sync.outbox.store import Store
from sync.settings import Settings
from sync.stats import CycleStats
from sync.upstream.simulator import TEST_IDS, Simulator
from tests.support import His, his_now, make_visit, write_settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _past(minutes: float) -> datetime:
    return his_now() - timedelta(minutes=minutes)


class Site:
    """A HIS, an outbox, a pipeline and the daemon around it (not scheduled: jobs are run by hand)."""

    def __init__(self, tmp: Path, sim: Simulator, **overrides: dict[str, object]) -> None:
        self.his = His(f"sqlite:///{tmp / 'his.db'}")
        self.settings: Settings = write_settings(
            tmp / "settings.yaml", his_url=self.his.url, outbox_url=f"sqlite:///{tmp / 'outbox.db'}",
            base_url=sim.url, overrides=overrides,
        )
        self.store = Store(self.settings.outbox.url.get_secret_value(), lease_s=60)
        self.store.ensure_schema()
        self.pipeline = make_pipeline(self.settings, self.store)
        self.daemon = Daemon(self.settings, self.pipeline)
        self.server: MetricsServer | None = None

    def serve(self) -> int:
        self.server = MetricsServer(self.daemon.metrics, "127.0.0.1:0").start()
        return self.server.port

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.pipeline.close()
        self.store.dispose()
        self.his.dispose()


@pytest.fixture
def site(tmp_path: Path, sim: Simulator) -> Iterator[Site]:
    s = Site(tmp_path, sim)
    yield s
    s.close()


def test_scrape_shows_the_outbox_and_what_each_cycle_did(tmp_path: Path, sim: Simulator) -> None:
    s = Site(tmp_path, sim, key_crowd={"source": "lookup"})
    try:
        port = s.serve()
        before = scrape(port)
        assert value(before, "crowd_sync_records", status="pending") == 0
        assert value(before, "crowd_sync_uploads_total", outcome="created") == 0
        assert value(before, "crowd_sync_last_upload_timestamp_seconds") == 0
        assert healthz(port) == (503, {
            "status": "starting", "reason": "no cycle has finished yet", "last_success_age_s": None,
            "his_clock_offset_s": None, "cursor_lag_s": None,  # no poll has read the HIS clock yet
        })

        # Five visits of a labelled person, three of people the platform does not know.
        visits = [make_visit(n, changed=_past(50 - n), id_no=TEST_IDS[0], is_key=None) for n in range(1, 6)]
        visits += [make_visit(n, changed=_past(50 - n), is_key=None) for n in range(6, 9)]
        s.his.insert(visits)
        started = time.time()
        s.daemon._cycle()

        m = scrape(port)
        assert value(m, "crowd_sync_records", status="sent") == 5
        assert value(m, "crowd_sync_records", status="skipped") == 3
        assert value(m, "crowd_sync_records", status="pending") == 0
        assert value(m, "crowd_sync_uploads_total", outcome="created") == 5
        assert value(m, "crowd_sync_uploads_total", outcome="failed") == 0
        # Uploads only: the three skipped visits made no upload, and are counted on their own.
        assert sum(v for (name, _), v in m.items() if name == "crowd_sync_uploads_total") == 5
        assert value(m, "crowd_sync_skipped_total") == 3
        assert value(m, "crowd_sync_invalid_total") == 0
        # How long the platform took, per endpoint: one login, four lookups, five uploads.
        assert value(m, "crowd_sync_upstream_request_duration_seconds_count", endpoint="login") == 1
        assert value(m, "crowd_sync_upstream_request_duration_seconds_count", endpoint="labels") == 4
        assert value(m, "crowd_sync_upstream_request_duration_seconds_count", endpoint="upload") == 5
        assert value(m, "crowd_sync_his_query_duration_seconds_count") == 1
        assert value(m, "crowd_sync_build_info", version=__version__, python=platform.python_version()) == 1
        assert not [name for name, _ in m if name.endswith("_created")]
        assert value(m, "crowd_sync_label_lookups_total") == 4  # one per distinct card
        assert value(m, "crowd_sync_logins_total") == 1
        assert value(m, "crowd_sync_config_error") == 0
        assert value(m, "crowd_sync_oldest_pending_age_seconds") == 0
        assert started - 5 <= value(m, "crowd_sync_last_upload_timestamp_seconds") <= time.time() + 5
        assert value(m, "crowd_sync_cycles_total", kind="cycle", result="ok") == 1
        assert value(m, "crowd_sync_cycle_duration_seconds_count", kind="cycle") == 1
        status, body = healthz(port)
        assert status == 200 and body["status"] == "ok"
        # The HIS clock (SQLite's here, this host's own) agrees with this host; the cursor stopped
        # at the poll's end, the HIS clock then (settle_delay_s is 0 here).
        assert abs(body["his_clock_offset_s"]) < 5 and 0 <= body["cursor_lag_s"] < 60, body
        assert abs(value(m, "crowd_sync_his_clock_offset_seconds")) < 5
        assert 0 <= value(m, "crowd_sync_cursor_lag_seconds") < 60
        assert value(m, "crowd_sync_his_clock_problems") == 0

        # A re-settled visit of a known card: decided from the label cache, sent as an update.
        s.his.update("LSH000002", total=visits[1]["total"] + 1, changed=_past(0.1))
        s.daemon._cycle()
        m = scrape(port)
        assert value(m, "crowd_sync_uploads_total", outcome="updated") == 1
        assert value(m, "crowd_sync_label_cache_hits_total") >= 1
        assert value(m, "crowd_sync_label_lookups_total") == 4
        assert value(m, "crowd_sync_cycles_total", kind="cycle", result="ok") == 2
    finally:
        s.close()


def test_configuration_error_and_failed_cycles_turn_healthz_503_until_fixed(site: Site, sim: Simulator) -> None:
    port = site.serve()
    site.his.insert(make_visit(n, changed=_past(30 - n)) for n in range(1, 4))
    site.daemon._cycle()
    assert healthz(port)[0] == 200

    # The platform stops accepting the app key: sending pauses, nothing is burnt.
    sim.faults.app_key_revoked = True
    site.his.insert([make_visit(4, changed=_past(0.5))])
    site.daemon._cycle()
    m = scrape(port)
    assert value(m, "crowd_sync_config_error") == 1
    assert value(m, "crowd_sync_records", status="pending") == 1
    status, body = healthz(port)
    assert status == 503 and body["status"] == "paused"
    assert "configuration error" in body["reason"] and "appKey" in body["reason"]

    # The record has waited two hours (as the backlog alert would see it).
    with site.store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE sync_outbox SET updated_at = :t WHERE lsh = 'LSH000004'"),
                     {"t": datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=2)})  # the outbox keeps naive UTC
    age = value(scrape(port), "crowd_sync_oldest_pending_age_seconds")
    assert 7200 - 5 <= age <= 7200 + 120

    sim.faults.app_key_revoked = False
    site.daemon._cycle()
    m = scrape(port)
    assert value(m, "crowd_sync_config_error") == 0
    assert value(m, "crowd_sync_records", status="sent") == 4
    assert value(m, "crowd_sync_oldest_pending_age_seconds") == 0
    assert healthz(port)[0] == 200

    # The HIS table disappears (a botched HIS upgrade): the cycle fails, and says why.
    with site.his.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE his_settlement RENAME TO his_settlement_old"))
    site.daemon._cycle()
    status, body = healthz(port)
    assert status == 503 and body["status"] == "failing"
    assert body["reason"].startswith("the last cycle failed")
    assert value(scrape(port), "crowd_sync_cycles_total", kind="cycle", result="error") == 1

    with site.his.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE his_settlement_old RENAME TO his_settlement"))
    site.daemon._cycle()
    assert healthz(port)[0] == 200


def test_healthz_turns_stalled_when_no_cycle_finishes_or_progresses(site: Site) -> None:
    now = [1000.0]
    progress = [1000.0]
    metrics = Metrics(store=site.store, poll_every_s=120, progress_at=lambda: progress[0], clock=lambda: now[0])
    server = MetricsServer(metrics, "127.0.0.1:0").start()
    try:
        metrics.job_started()
        assert healthz(server.port) == (503, {
            "status": "starting", "reason": "the first cycle is still running", "last_success_age_s": None,
            "his_clock_offset_s": None, "cursor_lag_s": None,
        })
        metrics.job_finished("cycle", stats=CycleStats(), error=None, duration_s=1.0)
        assert healthz(server.port)[0] == 200

        now[0] += 360  # exactly 3 x poll_every_s: still fine
        assert healthz(server.port)[0] == 200
        now[0] += 1
        status, body = healthz(server.port)
        assert status == 503 and body["status"] == "stalled" and body["last_success_age_s"] == 361

        # A long reconcile that keeps making progress is healthy; one that hangs is not.
        metrics.job_started()
        progress[0] = now[0] - 10
        assert healthz(server.port)[0] == 200
        now[0] += 400
        assert healthz(server.port)[1]["status"] == "stalled"
        metrics.job_finished("reconcile", stats=CycleStats(), error=None, duration_s=760.0)
        assert healthz(server.port)[0] == 200
    finally:
        server.stop()


def test_scrape_answers_when_the_outbox_cannot(site: Site) -> None:
    port = site.serve()
    assert value(scrape(port), "crowd_sync_outbox_up") == 1
    with site.store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE sync_outbox RENAME TO sync_outbox_moved"))
    m = scrape(port)
    assert value(m, "crowd_sync_outbox_up") == 0
    assert ("crowd_sync_records", (("status", "sent"),)) not in m
    with site.store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE sync_outbox_moved RENAME TO sync_outbox"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_daemon_run_serves_metrics_from_settings_and_closes_the_port(tmp_path: Path, sim: Simulator) -> None:
    port = _free_port()
    s = Site(tmp_path, sim, metrics={"listen": f"127.0.0.1:{port}"})
    s.his.insert(make_visit(n, changed=_past(20 - n)) for n in range(1, 4))
    seen: dict[str, Any] = {}

    def watch() -> None:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if healthz(port)[0] == 200:
                        seen["metrics"] = scrape(port)
                        return
                except OSError:
                    pass  # not listening yet
                time.sleep(0.1)
        finally:
            s.daemon.request_stop()

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        rc = s.daemon.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        watcher.join()
        s.store.dispose()
        s.his.dispose()
    assert rc == 0
    assert value(seen["metrics"], "crowd_sync_records", status="sent") == 3
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_metrics_port_in_use_is_a_configuration_error(tmp_path: Path, sim: Simulator) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = Site(tmp_path, sim, metrics={"listen": f"127.0.0.1:{port}"})
        try:
            with pytest.raises(ConfigError, match=f"metrics.listen 127.0.0.1:{port}: .*cannot listen") as e:
                s.daemon.run()
            assert "metrics.listen: null" in e.value.hint
        finally:
            s.store.dispose()
            s.his.dispose()
