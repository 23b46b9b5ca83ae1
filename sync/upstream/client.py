"""The platform client: signed HTTP calls, the shared login token, labels and uploads.

What the platform demands and this module keeps:
- every call carries fresh signed query parameters (signing.py), the ``ehrkey``
  header in the test environment, and ``accesstoken`` on every call but login;
- logging in again pushes the previous token out (FAQ 4), so the token lives in
  a shared ``TokenStore`` and is renewed by exactly one login however many
  threads saw it refused; a failed login is not tried again before a back-off
  (the threads waiting meanwhile get the same error at once), and a token pushed
  out again and again (another program logging in with this account) stops
  sending with FAQ 4's fix instead of fighting it for ever;
- nothing is retried inside the HTTP layer: an upload that reached the platform
  but lost its answer is retried by the outbox, and the upsert by ``lsh`` makes
  that harmless;
- one call never takes longer than ``upstream.timeout_s`` in total, even
  against a server that trickles its answer a byte at a time (transport.py).
"""

from __future__ import annotations

import collections
import copy
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import structlog

from sync.crashpoints import crash_point
from sync.errors import ConfigError, PlatformUnavailable, SyncError
from sync.logs import mask_id, register_secret
from sync.settings import Upstream
from sync.upstream.answers import Answer, Outcome, classify, faq, passed_app_key, refuses_app_key, to_error
from sync.upstream.keyform import FORM_NAMES, KeyFormMemory, KeyFormState, KeySigner
from sync.upstream.person import Person, parse_person
from sync.upstream.signing import EHRKEY_HEADER, ENDPOINTS, EndpointName, KeyForm, app_key_texts, event_code
from sync.upstream.tokens import Token, TokenStore
from sync.upstream.transport import NETWORK_FIX, RateLimiter, Transport

log = structlog.get_logger(__name__)

# The platform refuses time stamps this far from its own clock with "(401) 未经授权" (FAQ 12).
CLOCK_SKEW_WARN_S = 300.0
CLOCK_SKEW_WARN_EVERY_S = 600.0
# After a failed login, no other login for this long (doubling per failure up to the cap):
# however many records are waiting for a token, one login per step reaches the platform.
# Short: across cycles the pipeline's probes of an unreachable platform space the logins
# out (up to a minute); this only keeps the threads of one dispatch from each trying.
LOGIN_BACKOFF_FIRST_S = 1.0
LOGIN_BACKOFF_MAX_S = 10.0
# This many kick-outs (FAQ 4) within the window mean another program keeps logging in with
# the same account: stop and say so, instead of pushing each other out for ever.
KICKS_TO_PAUSE = 3
KICK_WINDOW_S = 600.0


# ---------------------------------------------------------------- values


@dataclass(frozen=True, kw_only=True)
class LookupResult:
    person: Person | None
    data: dict[str, Any] | None  # the raw `data` object, for the label cache


@dataclass(frozen=True, kw_only=True)
class UploadResult:
    created: bool  # 新增成功 (True) or 修改成功 (False)
    message: str
    http_status: int


class Client:
    """Calls the platform; safe to share between threads."""

    def __init__(
        self, upstream: Upstream, store: TokenStore, *, wall_clock: Callable[[], float] = time.time,
        key_forms: KeyFormMemory | None = None, limiter: RateLimiter | None = None,
    ) -> None:
        """``key_forms`` remembers which reading of the app key the platform accepts
        (the outbox's ``Store.key_form_memory()``; in this process only when None);
        ``limiter``: the rate limit shared by the clients of several institutions."""
        self._up = upstream
        self._store = store
        self._wall = wall_clock
        raw_key, self._username, self._password = upstream.credentials()
        register_secret(*app_key_texts(raw_key), self._password)
        self._signer = KeySigner(raw_key, upstream.app_key_form, key_forms)
        self._codes = {name: event_code(upstream.env, name, upstream.event_codes) for name in ENDPOINTS}
        self._lock = threading.Lock()
        self._skew: float | None = None
        self._skew_warned_at: float | None = None
        # The shared token as this client last saw it. The store (a database row shared with
        # other processes) is read only when this one is missing, expired or refused: another
        # process renewing pushes ours out upstream, and the refusal sends us to the store.
        self._seen: Token | None = None
        # Login back-off: (monotonic time before which no login is tried, the error it failed with).
        self._login_block: tuple[float, SyncError] | None = None
        self._login_failures = 0
        # Kick-outs seen (monotonic time), one per refused token value.
        self._kicks: collections.deque[float] = collections.deque()
        self._kicked_tokens: set[str] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        # Called with (endpoint, seconds) for every request the platform answered (metrics).
        self.on_answer: Callable[[str, float], None] | None = None
        self._transport = Transport(upstream, count=self._count, limiter=limiter)

    # -- public calls

    def login(self) -> Token:
        """One real login; the store calls this when the token must be renewed."""
        body = json.dumps(
            {"username": self._username, "password": self._password}, ensure_ascii=False
        ).encode("utf-8")
        self._count("logins")
        answer = self._send("login", body=body, token=None)
        token_value = answer.data.get("token") if answer.ok and isinstance(answer.data, Mapping) else None
        if not isinstance(token_value, str) or not token_value:
            log.warning(
                "login_failed", username=self._username, outcome=str(answer.outcome),
                http_status=answer.http_status, platform_message=answer.message,
            )
            error = to_error(answer)
            if isinstance(error, ConfigError):
                raise error
            # Whatever else a login answers (an outage, 中间请求异常, no token), it says nothing
            # about any record: sending waits for the platform.
            raise PlatformUnavailable(
                f"登录失败 / login failed: {error.message}", hint=error.hint or NETWORK_FIX, http_status=answer.http_status,
                platform_message=error.platform_message,
            )
        register_secret(token_value)
        crash_point("during_login")
        now = self._now()
        token = Token(value=token_value, obtained_at=now, expires_at=now + timedelta(hours=self._up.token_ttl_h))
        log.info("login_succeeded", username=self._username, expires_at=token.expires_at.isoformat())
        return token

    def lookup(self, id_number: str) -> LookupResult:
        """The person's key-population labels; ``person`` is None when not key population."""
        id_number = id_number.strip()
        if not id_number:
            raise ValueError("id_number is empty")
        self._count("lookups")
        answer = self._authorized("labels", suffix=quote(id_number, safe=""), body=None, lsh=None, id_number=id_number)
        data = dict(answer.data) if isinstance(answer.data, Mapping) else None
        person = parse_person(data)
        if person is not None and not person.id_number:
            person = replace(person, id_number=id_number)
        log.info(
            "label_lookup", id_number=mask_id(id_number), key_population=bool(person and person.is_key_population),
            labels=len(person.labels) if person else 0,
            credit_constrained=bool(person and person.credit_constrained),
        )
        return LookupResult(person=person, data=data)

    def upload(self, payload_json: str, *, lsh: str) -> UploadResult:
        """Upsert one visit record; the body is sent exactly as given."""
        self._count("uploads")
        answer = self._authorized("upload", suffix="", body=payload_json.encode("utf-8"), lsh=lsh, id_number=None)
        # classify() let only the document's success answers through: 新增成功 or 修改成功.
        message = str(answer.data).strip()
        created = message == "新增成功"
        self._count("creates" if created else "updates")
        log.debug("record_uploaded", lsh=lsh, created=created, message=message)
        return UploadResult(created=created, message=message, http_status=answer.http_status)

    def clock_skew_s(self) -> float | None:
        """The platform's Date header minus our clock, from the latest answer (None before any)."""
        return self._skew

    def key_form(self) -> KeyFormState:
        """The reading of the app key requests are signed in, and whether the platform took it."""
        return self._signer.state()

    def close(self) -> None:
        self._signer.save_pending()
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- token handling

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._wall(), UTC)

    def _token(self) -> Token:
        now = self._now()
        token = self._seen
        if token is not None and token.valid_at(now):
            return token
        token = self._store.current()
        if token is None or not token.valid_at(now):
            # Passing the value we saw lets a renewal another thread just made be reused.
            token = self._store.renew(token.value if token is not None else None, self._login_with_backoff)
        self._seen = token
        return token

    def _login_with_backoff(self) -> Token:
        """``login``, unless one failed less than a back-off step ago: then its error again at once.

        Called inside the token store's single flight, so the threads that queued behind a
        failing login do not each send their own.
        """
        with self._lock:
            block = self._login_block
        if block is not None and time.monotonic() < block[0]:
            raise _again(block[1])
        try:
            token = self.login()
        except SyncError as exc:
            with self._lock:
                self._login_failures += 1
                step = min(LOGIN_BACKOFF_MAX_S, LOGIN_BACKOFF_FIRST_S * 2 ** (self._login_failures - 1))
                self._login_block = (time.monotonic() + step, exc)
            log.info("login_backoff", seconds=step, failures=self._login_failures)
            raise
        with self._lock:
            self._login_block = None
            self._login_failures = 0
        return token

    def _note_kick(self, answer: Answer, token: str) -> None:
        """Count a kick-out (FAQ 4) once per pushed-out token; too many: ConfigError with FAQ 4's fix."""
        if answer.faq != 4:
            return
        now = time.monotonic()
        with self._lock:
            if token in self._kicked_tokens:
                return
            self._kicked_tokens.add(token)
            self._kicks.append(now)
            while self._kicks and now - self._kicks[0] > KICK_WINDOW_S:
                self._kicks.popleft()
            kicks = len(self._kicks)
        if kicks >= KICKS_TO_PAUSE:
            raise ConfigError(
                f"该账号的令牌被挤掉 {kicks} 次 / the platform pushed this account's token out {kicks} times within "
                f"{KICK_WINDOW_S / 60:g} minutes: another program is logging in with upstream.username "
                f"{self._username!r} (FAQ 4)",
                hint=faq(4).fix + "；停止另一个程序或为其申请单独账号后，发送自动恢复 / stop the other program or "
                "give it an account of its own; sending resumes by itself once the token stays valid",
                platform_message=answer.message or None,
            )

    def _authorized(
        self, endpoint: EndpointName, *, suffix: str, body: bytes | None, lsh: str | None, id_number: str | None
    ) -> Answer:
        token = self._token()
        answer = self._send(endpoint, suffix=suffix, body=body, token=token.value)
        if answer.outcome is Outcome.AUTH:
            # Refused (expired early, or pushed out by a login elsewhere): renew once, retry once.
            self._count("auth_retries")
            log.info("token_refused", endpoint=endpoint, platform_message=answer.message)
            self._note_kick(answer, token.value)
            token = self._store.renew(token.value, self._login_with_backoff)
            self._seen = token
            answer = self._send(endpoint, suffix=suffix, body=body, token=token.value)
            if answer.outcome is Outcome.AUTH:
                self._note_kick(answer, token.value)
        if not answer.ok:
            self._count(f"errors_{answer.outcome}")
            log.warning(
                "upstream_error", endpoint=endpoint, outcome=str(answer.outcome), http_status=answer.http_status,
                lsh=lsh, id_number=mask_id(id_number) if id_number else None, platform_message=answer.message,
                fix=answer.fix,
            )
            raise to_error(answer, lsh=lsh)
        return answer

    # -- HTTP

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _send(self, endpoint: EndpointName, *, suffix: str = "", body: bytes | None, token: str | None) -> Answer:
        """One signed HTTP exchange, classified; network failures raise TransientError.

        With ``upstream.app_key_form: auto``, a refusal of the app key or of the signature is
        sent once more signed in the other reading of the key (keyform.py); the reading the
        platform takes is kept, and a refusal of both is one answer naming both.
        """
        signer = self._signer
        in_login = endpoint == "login"
        if not in_login:
            # A reading learnt by a login is saved here: the login ran inside the token row's lock.
            signer.save_pending()
        form = signer.form
        answer = self._signed(endpoint, form, suffix=suffix, body=body, token=token)
        if refuses_app_key(answer):
            other = signer.alternative(form)
            if other is None:
                return answer
            self._count("key_form_retries")
            # Expected while the reading is being learnt; a warning once a known reading is refused.
            report = log.warning if signer.state().confirmed else log.info
            report(
                "app_key_form_refused", endpoint=endpoint, form=form, trying=other, http_status=answer.http_status,
                platform_message=answer.message,
            )
            first, first_form, form = answer, form, other
            answer = self._signed(endpoint, form, suffix=suffix, body=body, token=token)
            if refuses_app_key(answer):
                return _both_refused(first_form, first, form, answer)
        if passed_app_key(answer) and signer.accepted(form, save_now=not in_login):
            log.info("app_key_form_accepted", form=form, endpoint=endpoint, setting=self._up.app_key_form)
        return answer

    def _signed(
        self, endpoint: EndpointName, form: KeyForm, *, suffix: str, body: bytes | None, token: str | None
    ) -> Answer:
        spec = ENDPOINTS[endpoint]
        deadline = self._transport.slot()
        query = self._signer.query(form, self._codes[endpoint], int(self._wall() * 1000))
        url = f"{self._up.base_url}{spec.path}{suffix}?{query}"
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json;charset=UTF-8"
        if self._up.env == "test":
            headers[EHRKEY_HEADER[0]] = EHRKEY_HEADER[1]
        if token is not None:
            headers["accesstoken"] = token
        self._count("requests")
        started = time.monotonic()
        raw = self._transport.exchange(spec.method, url, body, headers, deadline=deadline, endpoint=endpoint)
        if self.on_answer is not None:
            self.on_answer(endpoint, time.monotonic() - started)
        self._note_clock(raw.date)
        return classify(raw.status, raw.body, raw.content_type, endpoint=endpoint)

    def _note_clock(self, date_header: str | None) -> None:
        if not date_header:
            return
        try:
            server = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError):
            return
        skew = server - self._wall()
        self._skew = skew
        if abs(skew) <= CLOCK_SKEW_WARN_S:
            return
        now = time.monotonic()
        with self._lock:
            if self._skew_warned_at is not None and now - self._skew_warned_at < CLOCK_SKEW_WARN_EVERY_S:
                return
            self._skew_warned_at = now
        log.warning(
            "clock_skew", skew_s=round(skew, 1), limit_s=CLOCK_SKEW_WARN_S,
            consequence="the platform answers (401) 未经授权 to time stamps this far off",
            fix="同步本机时钟（开启 NTP） / synchronise this machine's clock (enable NTP)",
        )


def _both_refused(first_form: KeyForm, first: Answer, second_form: KeyForm, second: Answer) -> Answer:
    """One configuration answer for a key refused in both readings, naming each attempt."""
    said = (
        f"{FORM_NAMES[first_form]}: {first.message or first.cause}; "
        f"{FORM_NAMES[second_form]}: {second.message or second.cause}"
    )
    fixes = first.fix if first.fix == second.fix else f"{first.fix} | {second.fix}"
    return replace(
        second,
        cause="app key or signature refused in both readings of the key",
        message=said,
        fix="授权码原样（%2B）与解码两种读法均被拒绝 / the key was refused both as printed and decoded: " + fixes,
    )


def _again(exc: SyncError) -> SyncError:
    """A fresh copy of ``exc`` to raise in another thread (an exception object carries its traceback)."""
    again = copy.copy(exc)
    again.__traceback__ = None
    return again


__all__ = [
    "Client",
    "LookupResult",
    "UploadResult",
]
