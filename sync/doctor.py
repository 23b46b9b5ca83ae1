"""`crowd-sync check`: every precondition of a working service, each failure with its fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from sync import app
from sync import clock as his_clocks
from sync.dberrors import DB_ERRORS
from sync.errors import SyncError, platform_said
from sync.his import HisSource
from sync.outbox.engine import describe_error
from sync.outbox.store import Store
from sync.settings import Settings
from sync.upstream.client import Client
from sync.upstream.keyform import FORM_NAMES
from sync.upstream.tokens import utcnow

# Document section 3.1: ID numbers that answer with labels in each environment.
PROBE_IDS = {"test": "510100198506020036", "prod": "110104198506020037"}
MAX_SKEW_S = 300


def run_checks(settings: Settings, *, out: TextIO) -> list[SyncError]:
    """Run every check, print one line each; return what failed (empty when nothing did)."""
    checkup = _Checkup(settings, out)
    try:
        finished = checkup.run()
    finally:
        checkup.close()
    if finished:
        print("all checks passed" if not checkup.failures else f"{len(checkup.failures)} check(s) failed", file=out)
    return checkup.failures


class _Checkup:
    """One `check`: what it opened (closed at the end) and what failed."""

    def __init__(self, settings: Settings, out: TextIO) -> None:
        self.settings = settings
        self.out = out
        self.failures: list[SyncError] = []
        self.store: Store | None = None
        self.his: HisSource | None = None
        self.client: Client | None = None

    def run(self) -> bool:
        """Every check in order; False when the platform checks could not run (no outbox)."""
        print(f"[ OK ] settings: {self.settings.source_path} parsed", file=self.out)
        outbox_ok = self.report("outbox", self.outbox)
        if self.report("HIS database and query", self.his_query):
            self.report("HIS clock", self.his_clock)
        if not outbox_ok:
            print("[SKIP] platform checks: they need the outbox (it keeps the shared login token)", file=self.out)
            return False
        self.client = app.make_client(self.settings, self.store) if self.store is not None else None
        if self.report("platform login", self.login):
            self.report("label lookup", self.lookup)
        self.report("app key reading", self.key_form)
        self.report("clock", self.clock)
        return True

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.his is not None:
            self.his.dispose()
        if self.store is not None:
            self.store.dispose()

    def report(self, name: str, check: Callable[[], str]) -> bool:
        """One line for ``check``: OK with its detail, or FAIL with what the platform said and the fix."""
        try:
            detail = check()
        except SyncError as exc:
            self.failures.append(exc)
            print(f"[FAIL] {name}: {exc.message}", file=self.out)
            said = platform_said(exc)
            if said:
                print(f"       平台返回 platform said: {said}", file=self.out)
            if exc.hint:
                print(f"       处理 fix: {exc.hint}", file=self.out)
            return False
        print(f"[ OK ] {name}: {detail}" if detail else f"[ OK ] {name}", file=self.out)
        return True

    # -- the checks -------------------------------------------------------------------------

    def outbox(self) -> str:
        self.store = store = app.open_store(self.settings)
        try:
            store.ensure_schema()
        except DB_ERRORS as exc:
            # Unreachable, refused or unusable: a FAIL line with the fix, and the other checks go on.
            described = describe_error(exc, self.settings.outbox.url.get_secret_value())
            if described is None:
                raise
            raise described from None
        return f"{store.url_for_humans} schema current"

    def his_query(self) -> str:
        self.his = app.make_his(self.settings)
        columns = self.his.check()
        return f"query returns the {len(columns)} expected columns"

    def his_clock(self) -> str:
        assert self.his is not None
        zone = self.settings.schedule.timezone
        reading = self.his.clock()
        found = his_clocks.findings(reading, self.his.probe(reading), host_zone=zone)
        if found:
            raise SyncError("; ".join(f.message for f in found), hint=" — ".join(f.fix for f in found))
        return his_clocks.note(reading, host_zone=zone)

    def _client(self) -> Client:
        assert self.client is not None
        return self.client

    def login(self) -> str:
        assert self.store is not None
        tokens = self.store.token_store()
        tok = tokens.current()
        if tok is not None and tok.valid_at(utcnow()):
            return (
                "the shared token is still valid (not logging in again: that would push out "
                "the running service's session)"
            )
        tokens.renew(None, self._client().login)
        return f"logged in as {self.settings.upstream.username}"

    def lookup(self) -> str:
        probe = PROBE_IDS[self.settings.upstream.env]
        result = self._client().lookup(probe)
        if result.person is None:
            return f"label API answered (no labels for the document's probe ID {probe[:6]}…)"
        return f"label API answered: {len(result.person.labels)} label(s) for the document's probe ID"

    def key_form(self) -> str:
        state = self._client().key_form()
        if state.setting != "auto":
            taken = "accepted by the platform" if state.confirmed else "not accepted by the platform yet"
            return f"{FORM_NAMES[state.form]}, pinned by upstream.app_key_form ({taken})"
        if state.confirmed:
            return f"the platform accepts {FORM_NAMES[state.form]}; remembered in the outbox for every process"
        return f"none accepted yet (upstream.app_key_form: auto tries {FORM_NAMES[state.form]} first)"

    def clock(self) -> str:
        skew = self._client().clock_skew_s()
        if skew is None:
            return "platform sent no Date header; cannot compare"
        if abs(skew) > MAX_SKEW_S:
            raise SyncError(
                f"this host's clock differs from the platform's by {skew:+.0f} s",
                hint="the platform answers (401) 未经授权 when hie_time_stamp is not current: "
                "synchronise the clock (chrony/ntp)",
            )
        return f"within {abs(skew):.0f} s of the platform"
