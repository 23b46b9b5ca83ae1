"""`crowd-sync check`: every precondition of a working service, each failure with its fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from sync.errors import SyncError, platform_said
from sync.settings import Settings

# Document section 3.1: ID numbers that answer with labels in each environment.
PROBE_IDS = {"test": "510100198506020036", "prod": "110104198506020037"}
MAX_SKEW_S = 300


def run_checks(settings: Settings, *, out: TextIO) -> list[SyncError]:
    """Run every check, print one line each; return what failed (empty when nothing did)."""
    from sync import clock as his_clocks
    from sync.dberrors import DB_ERRORS
    from sync.his import HisSource
    from sync.outbox.engine import describe_error
    from sync.outbox.store import Store
    from sync.upstream.client import Client

    failures: list[SyncError] = []

    def report(name: str, fn: Callable[[], str]) -> bool:
        try:
            detail = fn()
        except SyncError as exc:
            failures.append(exc)
            print(f"[FAIL] {name}: {exc.message}", file=out)
            said = platform_said(exc)
            if said:
                print(f"       平台返回 platform said: {said}", file=out)
            if exc.hint:
                print(f"       处理 fix: {exc.hint}", file=out)
            return False
        print(f"[ OK ] {name}: {detail}" if detail else f"[ OK ] {name}", file=out)
        return True

    print(f"[ OK ] settings: {settings.source_path} parsed", file=out)

    outbox_url = settings.outbox.url.get_secret_value()
    stores: list[Store] = []
    sources: list[HisSource] = []
    client: Client | None = None
    try:
        def outbox() -> str:
            opened = Store(outbox_url, lease_s=settings.outbox.lease_s)
            stores.append(opened)
            try:
                opened.ensure_schema()
            except DB_ERRORS as exc:
                # Unreachable, refused or unusable: a FAIL line with the fix, and the other checks go on.
                described = describe_error(exc, outbox_url)
                if described is None:
                    raise
                raise described from None
            return f"{opened.url_for_humans} schema current"

        outbox_ok = report("outbox", outbox)

        def his_query() -> str:
            his = HisSource(
                settings.his, need_key_crowd=settings.key_crowd.source == "column", zone=settings.his_timezone
            )
            sources.append(his)
            columns = his.check()
            return f"query returns the {len(columns)} expected columns"

        his_ok = report("HIS database and query", his_query)

        def his_clock() -> str:
            his = sources[0]
            reading = his.clock()
            found = his_clocks.findings(reading, his.probe(reading), host_zone=settings.schedule.timezone)
            if found:
                raise SyncError(
                    "; ".join(f.message for f in found),
                    hint=" — ".join(f.fix for f in found),
                )
            return his_clocks.note(reading, host_zone=settings.schedule.timezone)

        if his_ok:
            report("HIS clock", his_clock)

        if not outbox_ok:
            print("[SKIP] platform checks: they need the outbox (it keeps the shared login token)", file=out)
            return failures
        store = stores[0]
        client = Client(settings.upstream, store.token_store(), key_forms=store.key_form_memory())
        c = client

        def login() -> str:
            from sync.upstream.tokens import utcnow

            tok = store.token_store().current()
            if tok is not None and tok.valid_at(utcnow()):
                return (
                    "the shared token is still valid (not logging in again: that would push out "
                    "the running service's session)"
                )
            store.token_store().renew(None, c.login)
            return f"logged in as {settings.upstream.username}"

        login_ok = report("platform login", login)

        def lookup() -> str:
            probe = PROBE_IDS[settings.upstream.env]
            result = c.lookup(probe)
            if result.person is None:
                return f"label API answered (no labels for the document's probe ID {probe[:6]}…)"
            return f"label API answered: {len(result.person.labels)} label(s) for the document's probe ID"

        if login_ok:
            report("label lookup", lookup)

        def key_form() -> str:
            from sync.upstream.keyform import FORM_NAMES

            state = c.key_form()
            if state.setting != "auto":
                taken = "accepted by the platform" if state.confirmed else "not accepted by the platform yet"
                return f"{FORM_NAMES[state.form]}, pinned by upstream.app_key_form ({taken})"
            if state.confirmed:
                return f"the platform accepts {FORM_NAMES[state.form]}; remembered in the outbox for every process"
            return f"none accepted yet (upstream.app_key_form: auto tries {FORM_NAMES[state.form]} first)"

        report("app key reading", key_form)

        def clock() -> str:
            skew = c.clock_skew_s()
            if skew is None:
                return "platform sent no Date header; cannot compare"
            if abs(skew) > MAX_SKEW_S:
                raise SyncError(
                    f"this host's clock differs from the platform's by {skew:+.0f} s",
                    hint="the platform answers (401) 未经授权 when hie_time_stamp is not current: "
                    "synchronise the clock (chrony/ntp)",
                )
            return f"within {abs(skew):.0f} s of the platform"

        report("clock", clock)
    finally:
        if client is not None:
            client.close()
        for source in sources:
            source.dispose()
        for opened in stores:
            opened.dispose()
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed", file=out)
    return failures
