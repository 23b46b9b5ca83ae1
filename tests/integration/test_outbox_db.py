"""The outbox on real SQLite, MariaDB and PostgreSQL: migrations, concurrency, locks."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import migrations
from sync.app import make_pipeline
from sync.errors import ConfigError
from sync.outbox.lock import AlreadyRunning
from sync.outbox.migrate import current_revision, head_revision
from sync.outbox.model import Incoming, Parked, Sent, Status
from sync.outbox.schema import sync_outbox
from sync.outbox.store import Store
from sync.upstream.tokens import Token

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, 8, 0, 0, 123456)


def item(lsh: str, body: str = "v1") -> Incoming:
    payload = json.dumps({"lsh": lsh, "body": body, "icdName": "肺结核"}, ensure_ascii=False)
    return Incoming(
        lsh=lsh, payload_json=payload, payload_hash=hashlib.sha256(payload.encode()).hexdigest(),
        status=Status.PENDING, key_crowd=None, reason=None, source_changed_at=T0, card_type="10",
        card_no="510100198506020036", visit_type="1", settlement_date=date(2026, 3, 1),
    )


def test_migrate_brings_an_empty_database_to_head(any_db_url: str) -> None:
    s = Store(any_db_url)
    before, after = s.migrate()
    assert (before, after) == (None, head_revision())
    assert current_revision(s.engine) == head_revision()
    s.ensure_schema()
    assert s.migrate() == (head_revision(), head_revision())  # nothing to do the second time
    s.dispose()


@pytest.fixture(params=["mariadb", "postgres"])
def server_url(request: pytest.FixtureRequest) -> str:
    """Server databases only: SQLite keeps no column comments and creates itself."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


def test_every_outbox_column_carries_a_comment(server_url: str) -> None:
    store = Store(server_url)
    store.migrate()
    inspector = sa.inspect(store.engine)
    columns = inspector.get_columns("sync_outbox")
    assert {c["name"] for c in columns} == {c.name for c in sync_outbox.columns}
    for c in columns:
        assert c.get("comment"), f"sync_outbox.{c['name']} has no comment"
    assert "平台应答" in (next(c["comment"] for c in columns if c["name"] == "last_answer") or "")
    assert inspector.get_table_comment("sync_outbox")["text"]
    indexed = {tuple(ix["column_names"]) for ix in inspector.get_indexes("sync_outbox")}
    # The claim reads each due status in this index's order and stops at its batch.
    assert ("institution", "status", "next_attempt_at", "lsh") in indexed
    store.dispose()


def test_a_schema_behind_the_code_is_refused_with_the_fix(store: Store) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    if store.engine.dialect.name == "sqlite":
        store.ensure_schema()  # an empty SQLite file is simply created again
        assert current_revision(store.engine) == head_revision()
        return
    with pytest.raises(ConfigError) as err:
        store.ensure_schema()
    assert f"this version needs {head_revision()}" in err.value.message
    assert "crowd-sync migrate" in err.value.hint


def test_an_empty_server_database_asks_for_migrate(server_url: str) -> None:
    s = Store(server_url)
    with pytest.raises(ConfigError) as err:
        s.ensure_schema()
    assert "crowd-sync migrate" in err.value.hint
    s.dispose()


def test_rows_round_trip_with_chinese_text_and_microseconds(store: Store) -> None:
    items = [item(f"L{i:04d}") for i in range(700)]  # more than one IN chunk
    assert store.queue.enqueue(items, now=T0, cursor=(T0, "L0699")).inserted == 700
    assert store.queue.enqueue(items, now=T0 + timedelta(hours=1)).unchanged == 700
    assert store.queue.get_cursor() == (T0, "L0699")
    claims = store.leases.claim_due(now=T0, limit=3, owner="w")
    assert [c.lsh for c in claims] == ["L0000", "L0001", "L0002"]
    assert json.loads(claims[0].payload_json)["icdName"] == "肺结核"
    assert store.leases.record([Sent(claimed=claims[0], body=claims[0].payload_json, key_crowd="1", answer="修改成功", http_status=200, at=T0)])[0]
    store.leases.record([Parked(claimed=claims[1], status=Status.INVALID, error="参数校验错误: 证件号码格式不正确", http_status=200, at=T0)])
    store.queue.enqueue([item("L0000", "v2")], now=T0 + timedelta(hours=2))
    with store.engine.connect() as conn:
        r = conn.execute(sa.select(sync_outbox).where(sync_outbox.c.lsh == "L0000")).mappings().one()
        bad = conn.execute(sa.select(sync_outbox.c.last_error).where(sync_outbox.c.lsh == "L0001")).scalar()
    assert (r["status"], r["last_answer"], r["first_seen_at"]) == ("pending", "修改成功", T0)
    assert bad == "参数校验错误: 证件号码格式不正确"
    assert store.queue.requeue(now=T0, statuses=[Status.INVALID]) == 1
    s = store.summary(now=T0)
    assert (s.counts["pending"], s.counts["sent"], s.counts["invalid"]) == (700, 0, 0)


def test_two_concurrent_claimers_never_get_the_same_row(store: Store) -> None:
    store.queue.enqueue([item(f"L{i:04d}") for i in range(300)], now=T0)
    got: dict[str, list[str]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def claimer(owner: str) -> None:
        barrier.wait()
        deadline = time.monotonic() + 20
        # An empty claim only means the other claimer holds the rows right now.
        while len(got["a"]) + len(got["b"]) < 300 and time.monotonic() < deadline:
            got[owner].extend(c.lsh for c in store.leases.claim_due(now=T0, limit=7, owner=owner))

    threads = [threading.Thread(target=claimer, args=(o,)) for o in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not set(got["a"]) & set(got["b"])
    assert len(got["a"]) + len(got["b"]) == 300


# -- the token, shared by processes -------------------------------------------------------


def _renew_in_threads(url: str, stale: str, log_path: str, threads: int) -> list[str]:
    store = Store(url)
    tokens = store.token_store()
    seen: list[str] = []
    barrier = threading.Barrier(threads)

    def login() -> Token:
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.2)  # a slow login widens the window for a second one
        now = datetime.now(UTC)
        return Token(value=f"new-{os.getpid()}", obtained_at=now, expires_at=now + timedelta(hours=12))

    def worker() -> None:
        barrier.wait()
        seen.append(tokens.renew(stale, login).value)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    store.dispose()
    return seen


def _process_main(url: str, stale: str, log_path: str, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    _renew_in_threads(url, stale, log_path, 8)


def test_token_renewal_is_single_flight_across_processes(store: Store, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    store.token_store().renew(None, lambda: Token(value="stale", obtained_at=now, expires_at=now + timedelta(hours=1)))
    log_path = str(tmp_path / "logins.txt")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    url = store.engine.url.render_as_string(hide_password=False)
    procs = [ctx.Process(target=_process_main, args=(url, "stale", log_path, start)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    logins = Path(log_path).read_text().split()
    assert len(logins) == 1
    current = store.token_store().current()
    assert current is not None and current.value == f"new-{logins[0]}"


# -- the instance lock ------------------------------------------------------------------------


def _lock_script(url: str, command_name: str, hold: bool) -> str:
    return textwrap.dedent(f"""
        import sys, time
        from sync.outbox.lock import AlreadyRunning
        from sync.outbox.store import Store
        store = Store({url!r})
        lock = store.instance_lock(command={command_name!r})
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            print("REFUSED", exc, flush=True)
            sys.exit(2)
        print("LOCKED", flush=True)
        if {hold!r}:
            time.sleep(120)
    """)


def test_one_instance_per_outbox_and_the_lock_dies_with_its_process(store: Store) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", _lock_script(url, "run", hold=True)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = holder.stdout.readline()
            if line.strip() == "LOCKED" or not line:
                break
        assert line.strip() == "LOCKED"

        second = subprocess.run(
            [sys.executable, "-c", _lock_script(url, "once", hold=False)], cwd=ROOT, capture_output=True,
            text=True, timeout=30,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"pid {holder.pid}" in second.stdout
        assert "command run" in second.stdout
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)

    # systemd restarts the service after a SIGKILL: the lock is free again at once.
    deadline = time.monotonic() + 10
    while True:
        lock = store.instance_lock(command="run")
        try:
            lock.acquire()
            break
        except AlreadyRunning:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        assert lock.held and lock.still_held()
    finally:
        lock.release()


def test_crash_recovery_requeue_of_skipped_and_the_unreachable_platform_on_every_database(store: Store) -> None:
    store.queue.enqueue([item(f"L{i}") for i in range(6)], now=T0)
    dead = store.leases.claim_due(now=T0, limit=2, owner="host:1:dead")
    mine = store.leases.claim_due(now=T0, limit=2, owner="host:2:me")
    # The instance-lock holder takes back every lease but its own.
    assert store.leases.release_other_leases("host:2:me") == len(dead)
    with store.engine.connect() as conn:
        owners = dict(conn.execute(sa.select(sync_outbox.c.lsh, sync_outbox.c.lease_owner)).all())
    assert {owners[c.lsh] for c in dead} == {None} and {owners[c.lsh] for c in mine} == {"host:2:me"}

    # A skipped visit requeued: its card is forgotten by the label cache, so the API is asked afresh.
    store.labels.put({"510100198506020036": None}, now=T0)
    store.leases.record([Parked(claimed=mine[0], status=Status.SKIPPED, error="label API: not in the key population", at=T0, http_status=None, key_crowd="0")])
    assert store.labels.get(["510100198506020036"], now=T0, ttl_s=3600)
    assert store.queue.requeue(now=T0, statuses=[Status.SKIPPED]) == 1
    assert store.labels.get(["510100198506020036"], now=T0, ttl_s=3600) == {}

    # A probe that failed goes to the back: due only at the next probe.
    later = T0 + timedelta(seconds=30)
    store.leases.postpone([mine[0]], until=later)
    assert mine[0].lsh not in [c.lsh for c in store.leases.claim_due(now=T0, limit=10, owner="host:2:me")]

    assert store.state.get_platform_down() is None
    first = store.state.set_platform_down(reason="upload: network error", now=T0, next_probe_at=later)
    again = store.state.set_platform_down(reason="login failed", now=later, next_probe_at=later + timedelta(seconds=10))
    assert (first["probes"], again["probes"], again["since"]) == (0, 1, first["since"])
    assert store.summary(now=later).platform_down == again
    store.state.clear_platform_down()
    assert store.state.get_platform_down() is None and store.summary(now=later).platform_down is None


# -- lsh is case-sensitive on every dialect ---------------------------------------------------


def _upgrade(store: Store, to: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, to)


def test_visits_whose_lsh_differ_only_in_case_are_two_rows_on_a_case_insensitive_database(
    mariadb_general_ci_url: str, tmp_path: Path
) -> None:
    """MariaDB's default collation utf8mb4_general_ci: ZY001a and ZY001A were one key, the second
    a duplicate on every poll, and the visits behind them never enqueued."""
    from sync.upstream.simulator import SimConfig, Simulator
    from tests.support import His, make_visit, write_settings

    store = Store(mariadb_general_ci_url)
    # An outbox migrated before the fix, holding a row already: the migration keeps it.
    _upgrade(store, "0002")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO sync_outbox (lsh, status, payload, payload_hash, first_seen_at, updated_at) "
            "VALUES ('ZY000a', 'sent', '{}', 'h', '2026-03-01', '2026-03-01')"
        )
    store.migrate()
    with store.engine.connect() as conn:
        collations = dict(conn.exec_driver_sql(
            "SELECT table_name, collation_name FROM information_schema.columns "
            "WHERE table_schema = DATABASE() AND column_name = 'lsh'"
        ).all())
    assert (collations["sync_outbox"], collations["sync_cursor"]) == ("utf8mb4_bin", "utf8mb4_bin")
    assert store.queue.enqueue([item("ZY000A"), item("ZY000a")], now=T0).inserted == 1  # ZY000a was there already

    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    changed = datetime(2026, 3, 1, 9, 0, 0)
    his.insert([
        make_visit(1, changed=changed, serial_no="ZY001a"),
        make_visit(2, changed=changed, serial_no="ZY001A"),
        make_visit(3, changed=changed, serial_no="ZY002"),  # an unrelated visit behind them
    ])
    his.dispose()
    with Simulator(SimConfig()) as sim:
        settings = write_settings(
            tmp_path / "settings.yaml", his_url=f"sqlite:///{tmp_path / 'his.db'}",
            outbox_url=mariadb_general_ci_url, base_url=sim.url, overrides={"his": {"start_from": "2026-03-01"}},
        )
        pipeline = make_pipeline(settings, store)
        try:
            first = pipeline.cycle()
            again = pipeline.cycle()
        finally:
            pipeline.close()
        uploaded = set(sim.records)
    assert first.error is None and first.sent == 3, first
    assert again.error is None and again.enqueued == 0 and again.sent == 0, again
    assert {"ZY001a", "ZY001A", "ZY002"} <= uploaded
    s = Store(mariadb_general_ci_url)
    assert s.summary(now=T0).counts["sent"] == 3
    s.dispose()
    store.dispose()
