"""The one place crowd-sync's parts are built from settings.

The outbox, the platform client, the HIS source and the pipeline are assembled here
and nowhere else: the command line, the demo, ``check``, the benchmark and the tests
all run the same assembly. A part that needs another is handed it here (the client
shares the outbox's login token and its reading of the app key, so that every process
using one outbox logs in once).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from sync import localtime, logs
from sync.clock import utcnow
from sync.his import HisSource
from sync.outbox.store import Store
from sync.pipeline import Pipeline
from sync.settings import NOT_LOADED, Settings
from sync.upstream.client import Client
from sync.upstream.signing import app_key_texts
from sync.upstream.tokens import TokenStore
from sync.upstream.transport import RateLimiter

log = structlog.get_logger(__name__)


def register_secrets(settings: Settings) -> None:
    """Every secret the settings hold is masked in logs and messages from now on."""
    for member in settings.members:
        up = member.upstream
        key = up.app_key.get_secret_value() if up.app_key is not None else NOT_LOADED
        if key != NOT_LOADED:
            logs.register_secret(*app_key_texts(key))
        if up.password is not None and up.password.get_secret_value() != NOT_LOADED:
            logs.register_secret(up.password.get_secret_value())
    for url in (settings.his.url.get_secret_value(), settings.outbox.url.get_secret_value()):
        try:
            pw = make_url(url).password
        except ArgumentError:
            continue
        if pw:
            logs.register_secret(str(pw))


def open_store(settings: Settings, *, create: bool = True) -> Store:
    """The outbox. ``create=False`` for commands that only read it or need what it holds:
    they never create or migrate one (a wrong outbox.url must not look like an empty outbox)."""
    return Store(settings.outbox.url.get_secret_value(), lease_s=settings.outbox.lease_s, create=create)


def make_client(
    settings: Settings, store: Store, *, tokens: TokenStore | None = None, institution: str | None = None,
    limiter: RateLimiter | None = None,
) -> Client:
    """The platform client of one institution (None: the only one), through the outbox's
    shared token of that institution (a login of its own would push the running service out,
    FAQ 4) and its remembered reading of the app key. ``tokens``: that shared token seen
    through a wrapper (`check` refuses to replace a valid one)."""
    member = settings.member(institution)
    return Client(
        member.upstream, tokens or store.token_store(member.code), key_forms=store.key_form_memory(member.code),
        limiter=limiter,
    )


def make_clients(settings: Settings, store: Store) -> dict[str, Client]:
    """One client per institution, all under one rate limit (one platform)."""
    limiter = RateLimiter(settings.upstream.rate_limit_per_s)
    return {m.code: make_client(settings, store, institution=m.code, limiter=limiter) for m in settings.members}


def make_his(settings: Settings) -> HisSource:
    """The HIS database, seen through his.query (nothing is connected yet)."""
    return HisSource(
        settings.his, need_key_crowd=settings.key_crowd.source == "column", zone=settings.his_timezone,
        need_institution=len(settings.members) > 1,
    )


def make_pipeline(
    settings: Settings, store: Store, *, client: Client | None = None, his: HisSource | None = None,
    clock: Callable[[], datetime] = utcnow, sole_sender: bool = False,
) -> Pipeline:
    """The pipeline over ``store``, with its own client and HIS source unless given.
    ``sole_sender``: the caller holds the instance lock (run, once, reconcile)."""
    clients = {settings.members[0].code: client} if client is not None else make_clients(settings, store)
    return Pipeline(
        settings, store=store, clients=clients, his=his or make_his(settings), clock=clock, sole_sender=sole_sender,
    )


def keep_timezone(settings: Settings, store: Store) -> None:
    """The DBA views count days in schedule.timezone: keep its offset in the outbox (sync_timezone)."""
    try:
        store.put_timezone(
            settings.schedule.timezone, offset_minutes=localtime.offset_minutes(settings.schedule.tz), now=utcnow()
        )
    except Exception as exc:  # noqa: BLE001 - the views' day boundary must never stop the work
        log.warning("timezone_not_saved", error=f"{type(exc).__name__}: {exc}")
