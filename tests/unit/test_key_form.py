"""The app key's reading, learnt from the platform: the whole data path (poll, label lookups,
uploads) against a simulated platform of each kind, SQLite HIS and outbox, real simulator
over loopback.

The document prints the key percent-encoded and does not say which text ``hie_secret`` is
computed over; ``upstream.app_key_form: auto`` tries as printed first, the other reading
once on the platform's refusal, and remembers in the outbox the one the platform takes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync import cli
from sync.app import make_client, make_pipeline
from sync.outbox.store import Store
from sync.settings import Settings
from sync.upstream.keyform import KeySigner, MemoryKeyForm
from sync.upstream.signing import KEY_FORMS
from sync.upstream.simulator import TEST_APP_KEY, TEST_APP_KEY_ENCODED, TEST_IDS, SimConfig, Simulator
from tests.support import His, capture_all_logs, expected_payload, his_now, make_visit, write_settings

LOGIN = "/adapter/http/ehrc/login/integration"
KINDS = ("as_printed", "decoded")
KEYS = {"key_as_printed": TEST_APP_KEY_ENCODED, "key_decoded": TEST_APP_KEY}
APP_KEY_REFUSED = "没找到该appKey对应的权限记录,或是该权限记录已被停用"


def _past(minutes: float) -> datetime:
    return his_now() - timedelta(minutes=minutes)


class Site:
    """One crowd-sync process: settings, its outbox Store, a client and a pipeline. Several
    Sites in one directory share the HIS and the outbox, as processes on one host do."""

    def __init__(self, tmp: Path, sim: Simulator, *, app_key: str = TEST_APP_KEY, form: str = "auto") -> None:
        self.sim = sim
        self.settings_path = tmp / "settings.yaml"
        self.his = His(f"sqlite:///{tmp / 'his.db'}")
        self.settings: Settings = write_settings(
            self.settings_path, his_url=self.his.url, outbox_url=f"sqlite:///{tmp / 'outbox.db'}", base_url=sim.url,
            overrides={"upstream": {"app_key": app_key, "app_key_form": form}, "key_crowd": {"source": "lookup"}},
        )
        self.store = Store(self.settings.outbox.url.get_secret_value(), lease_s=60)
        self.store.ensure_schema()
        self.client = make_client(self.settings, self.store)
        self.pipeline = make_pipeline(self.settings, self.store, client=self.client)

    def visits(self, first: int, count: int) -> list[dict[str, Any]]:
        """``count`` visits of key-population patients (labelled upstream) and one of a patient
        who is not, inserted into the HIS."""
        rows = [
            make_visit(n, changed=_past(5 - n / 100), id_no=TEST_IDS[n % len(TEST_IDS)], is_key=None)
            for n in range(first, first + count)
        ]
        rows.append(make_visit(first + count, changed=_past(5 - (first + count) / 100), is_key=None))  # skipped
        self.his.insert(rows)
        return rows[:-1]

    def rows(self) -> dict[str, dict[str, Any]]:
        with self.store.engine.connect() as conn:
            return {r["lsh"]: dict(r) for r in conn.execute(sa.text("SELECT * FROM sync_outbox")).mappings()}

    def close(self) -> None:
        self.pipeline.close()
        self.store.dispose()
        self.his.dispose()


def login_posts(sim: Simulator, form: str | None = None) -> int:
    """Login requests the platform saw (signed in ``form`` only, when given)."""
    seen = [r for r in list(sim.requests_log) if r.path == LOGIN]
    if form is not None:
        # As printed, the key's %2B travels encoded once more.
        seen = [r for r in seen if ("%252B" in r.raw_query) == (form == "as_printed")]
    return len(seen)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sim(kind: str) -> Iterator[Simulator]:
    with Simulator(SimConfig(key_form=kind)) as s:
        yield s


# --- the whole flow, 2 kinds of platform x 2 ways of writing the key -----------------------


@pytest.mark.parametrize("key", sorted(KEYS))
def test_the_whole_flow_against_each_kind_learns_the_reading_within_one_extra_login(
    tmp_path: Path, sim: Simulator, kind: str, key: str
) -> None:
    site = Site(tmp_path, sim, app_key=KEYS[key])
    try:
        visits = site.visits(1, 9)

        stats = site.pipeline.cycle()

        assert stats.sent == 9 and stats.skipped == 1 and stats.paused is None, stats
        assert sim.counters["lookups"] == len(TEST_IDS) + 1  # one per distinct card
        for v in visits:
            assert sim.records[v["serial_no"]] == expected_payload(v)
        # As printed is tried first: a platform of the other kind costs exactly one more login POST.
        extra = 0 if kind == KEY_FORMS[0] else 1
        assert login_posts(sim) == 1 + extra
        assert sim.counters["logins"] == 1
        assert sim.counters["gateway_rejections"] == extra
        assert site.store.state.get_key_form() == kind
        assert all(r["attempts"] == 0 for r in site.rows().values()), "a refusal of the key counted against a record"
    finally:
        site.close()


def test_a_second_process_uses_the_remembered_reading_without_trying_again(
    tmp_path: Path, sim: Simulator, kind: str
) -> None:
    first = Site(tmp_path, sim)
    first.visits(1, 3)
    assert first.pipeline.cycle().sent == 3
    first.close()
    rejected = sim.counters["gateway_rejections"]
    posts = login_posts(sim)
    sim.revoke_tokens()  # the shared token expired upstream: the next process must log in

    second = Site(tmp_path, sim)  # a new process: its own Store and client on the same outbox
    try:
        second.visits(10, 3)
        with capture_all_logs() as logged:
            stats = second.pipeline.cycle()
        assert stats.sent == 3, stats
        assert login_posts(sim) == posts + 1
        assert sim.counters["gateway_rejections"] == rejected
        assert not [e for e in logged if e["event"] == "app_key_form_refused"]
        assert second.client.key_form().form == kind and second.client.key_form().confirmed
    finally:
        second.close()


def test_a_remembered_reading_that_starts_being_refused_switches_once(tmp_path: Path) -> None:
    with Simulator(SimConfig(key_form="as_printed")) as sim:
        site = Site(tmp_path, sim)
        try:
            site.visits(1, 3)
            assert site.pipeline.cycle().sent == 3
            assert site.store.state.get_key_form() == "as_printed"
            logins = sim.counters["logins"]

            sim.config.key_form = "decoded"  # the platform now reads the key the other way
            site.visits(20, 9)
            with capture_all_logs() as logged:
                stats = site.pipeline.cycle()

            assert stats.sent == 9 and stats.paused is None, stats
            concurrency = site.settings.upstream.concurrency
            rejected = sim.counters["gateway_rejections"]
            assert 1 <= rejected <= concurrency, f"{rejected} requests refused before the switch"
            assert site.store.state.get_key_form() == "decoded"
            assert sim.counters["logins"] == logins, "the token does not depend on the reading"
            assert all(r["attempts"] == 0 for r in site.rows().values()), "a refusal of the key counted against a record"
            refused = [e for e in logged if e["event"] == "app_key_form_refused"]
            assert refused and all(e["form"] == "as_printed" and e["trying"] == "decoded" for e in refused)

            site.visits(40, 3)
            assert site.pipeline.cycle().sent == 3
            assert sim.counters["gateway_rejections"] == rejected, "refused again after the switch"
        finally:
            site.close()


def test_an_outbox_from_a_version_that_signed_decoded_only_switches_without_a_new_login(tmp_path: Path) -> None:
    """An upgrade: a shared token is stored but no reading is remembered. Its first signed call
    (a label lookup) is refused as printed, tried decoded, and the reading is remembered."""
    with Simulator(SimConfig(key_form="decoded")) as sim:
        old = Site(tmp_path, sim, form="decoded")  # what earlier versions always did
        old.visits(1, 3)
        assert old.pipeline.cycle().sent == 3
        old.close()
        assert sim.counters["gateway_rejections"] == 0

        site = Site(tmp_path, sim)
        try:
            assert site.store.state.get_key_form() is None
            site.visits(10, 6)
            stats = site.pipeline.cycle()
            assert stats.sent == 6 and stats.paused is None, stats
            assert 1 <= sim.counters["gateway_rejections"] <= site.settings.upstream.concurrency
            assert login_posts(sim) == 1, "the stored token serves both readings"
            assert site.store.state.get_key_form() == "decoded"
            assert all(r["attempts"] == 0 for r in site.rows().values())
        finally:
            site.close()


def test_a_platform_refusing_both_readings_pauses_sending_and_burns_no_attempt(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.app_key = "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAN+other/key=="  # the hospital was given another key
    site = Site(tmp_path, sim)
    try:
        site.visits(1, 4)

        stats = site.pipeline.cycle()

        assert stats.paused and stats.sent == 0, stats
        # Each login tried once in each reading, then stopped (no lookup, no upload reached the platform).
        assert login_posts(sim, "as_printed") == login_posts(sim, "decoded") >= 1
        assert sim.counters["lookups"] == sim.counters["uploads"] == 0
        assert sim.records == {}
        rows = site.rows()
        assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows.values()), rows
        error = site.store.state.get_config_error()
        assert error is not None
        assert "both readings" in error["message"]
        assert error["message"].count(APP_KEY_REFUSED) == 2
        assert "as_printed" in error["message"] and "decoded" in error["message"]
        assert "app_key" in error["hint"]
        assert site.store.state.get_key_form() is None

        assert cli.main(["status", "--config", str(site.settings_path)]) == 0
        out = capsys.readouterr().out
        assert "sending paused" in out and "both readings" in out
        assert "app key reading: none accepted yet" in out

        sim.config.app_key = TEST_APP_KEY  # fixed: the platform knows the key again
        # The next run (`crowd-sync once`, or the service's next cycle well after the login back-off).
        site.close()
        site = Site(tmp_path, sim)
        stats = site.pipeline.cycle()
        assert stats.sent == 4 and stats.paused is None, stats
        assert site.store.state.get_key_form() == sim.config.key_form
    finally:
        site.close()


@pytest.mark.parametrize("form", KINDS)
def test_a_pinned_reading_is_never_tried_the_other_way(tmp_path: Path, sim: Simulator, kind: str, form: str) -> None:
    site = Site(tmp_path, sim, app_key=TEST_APP_KEY_ENCODED, form=form)
    try:
        site.visits(1, 3)

        stats = site.pipeline.cycle()

        assert login_posts(sim) == login_posts(sim, form) >= 1  # every login signed in the pinned reading
        if form == kind:
            assert stats.sent == 3 and sim.counters["gateway_rejections"] == 0
            assert login_posts(sim) == 1
        else:
            assert stats.paused and stats.sent == 0
            assert sim.counters["gateway_rejections"] == login_posts(sim)
            error = site.store.state.get_config_error()
            assert error is not None and APP_KEY_REFUSED in error["message"]
            assert "both readings" not in error["message"]
            assert all(r["attempts"] == 0 for r in site.rows().values())
        assert site.store.state.get_key_form() is None  # nothing learnt, nothing remembered
    finally:
        site.close()


def test_sixteen_threads_at_the_first_login_spend_one_extra_login_post(tmp_path: Path, sim: Simulator, kind: str) -> None:
    site = Site(tmp_path, sim)
    try:
        start = threading.Barrier(16)

        def lookup(i: int) -> bool:
            start.wait()
            return site.client.lookup(TEST_IDS[i % len(TEST_IDS)]).person is not None

        with ThreadPoolExecutor(16) as pool:
            assert all(pool.map(lookup, range(16)))
        assert sim.counters["logins"] == 1
        assert login_posts(sim) == (1 if kind == KEY_FORMS[0] else 2)
        assert site.store.state.get_key_form() == kind
    finally:
        site.close()


# --- what the operator sees ----------------------------------------------------------------


def test_status_and_check_say_which_reading_the_platform_accepted(
    tmp_path: Path, sim: Simulator, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    site = Site(tmp_path, sim)
    site.close()
    config = str(site.settings_path)
    capsys.readouterr()  # what the set-up logged
    assert cli.main(["status", "--json", "--config", config]) == 0
    status = cli.json.loads(capsys.readouterr().out)
    assert status["app_key_form"] == {"setting": "auto", "accepted": None, "accepted_at": None}

    assert cli.main(["check", "--config", config]) == 0
    out = capsys.readouterr().out
    assert f"[ OK ] app key reading: the platform accepts {kind}" in out, out

    assert cli.main(["status", "--json", "--config", config]) == 0
    status = cli.json.loads(capsys.readouterr().out)
    assert status["app_key_form"]["setting"] == "auto"
    assert status["app_key_form"]["accepted"] == kind
    assert status["app_key_form"]["accepted_at"]
    assert cli.main(["status", "--config", config]) == 0
    assert f"app key reading: {kind}, accepted by the platform" in capsys.readouterr().out


# --- the signer on its own -------------------------------------------------------------------


def test_the_signer_tries_the_other_reading_only_under_auto_and_only_when_it_differs() -> None:
    assert KeySigner(TEST_APP_KEY, "auto").alternative("as_printed") == "decoded"
    assert KeySigner(TEST_APP_KEY, "auto").alternative("decoded") == "as_printed"
    assert KeySigner(TEST_APP_KEY, "decoded").alternative("decoded") is None
    assert KeySigner(TEST_APP_KEY, "as_printed").alternative("as_printed") is None
    # A key without + / =: both readings are the same text, so there is nothing else to try.
    assert KeySigner("ABCDEF0123456789", "auto").alternative("as_printed") is None


def test_a_reading_learnt_inside_a_login_is_saved_afterwards() -> None:
    memory = MemoryKeyForm()
    signer = KeySigner(TEST_APP_KEY, "auto", memory)
    assert signer.state().form == "as_printed" and not signer.state().confirmed
    assert signer.accepted("decoded", save_now=False)
    assert signer.form == "decoded" and memory.form is None  # the login still holds the token row
    signer.save_pending()
    assert memory.form == "decoded"
    assert not signer.accepted("decoded", save_now=True)  # old news
    # A new process starts from the memory.
    assert KeySigner(TEST_APP_KEY_ENCODED, "auto", memory).state().confirmed
    assert KeySigner(TEST_APP_KEY_ENCODED, "auto", memory).form == "decoded"
    assert KeySigner(TEST_APP_KEY_ENCODED, "as_printed", memory).form == "as_printed"
