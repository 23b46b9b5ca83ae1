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
  against a server that trickles its answer a byte at a time.
"""

from __future__ import annotations

import collections
import copy
import heapq
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import requests
import structlog
from requests.adapters import HTTPAdapter
from requests.hooks import default_hooks
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager

from sync.crashpoints import crash_point
from sync.errors import ConfigError, PlatformUnavailable, SyncError, TransientError
from sync.logs import mask_id, register_secret
from sync.settings import Upstream
from sync.upstream.answers import Answer, Outcome, classify, faq, passed_app_key, refuses_app_key, to_error
from sync.upstream.keyform import FORM_NAMES, KeyFormMemory, KeyFormState, KeySigner
from sync.upstream.person import Person, parse_person
from sync.upstream.signing import EHRKEY_HEADER, ENDPOINTS, EndpointName, KeyForm, app_key_texts, event_code
from sync.upstream.tokens import Token, TokenStore

log = structlog.get_logger(__name__)

# The platform refuses time stamps this far from its own clock with "(401) 未经授权" (FAQ 12).
CLOCK_SKEW_WARN_S = 300.0
CLOCK_SKEW_WARN_EVERY_S = 600.0
_READ_CHUNK = 4096
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
_NETWORK_FIX = (
    "请检查网络、防火墙与 upstream.base_url；稍后自动重试 / "
    "check the network, firewall and upstream.base_url: retried later"
)


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


# ---------------------------------------------------------------- rate limit


class RateLimiter:
    """Token bucket shared by every call of one Client.

    Over any second the requests let through never exceed ``rate`` by more than
    ``burst`` (one by default). Callers reserve their slot under the lock and
    sleep outside it, so waiting threads are served in arrival order.
    """

    def __init__(
        self,
        rate_per_s: float,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self._rate = rate_per_s
        self._burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = burst
        self._updated = clock()

    def acquire(self, deadline: float | None = None) -> None:
        """Wait for a slot; TransientError if it would come after ``deadline`` (same clock)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
            self._updated = now
            wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate
            if deadline is not None and now + wait > deadline:
                raise TransientError(
                    "too many requests queued for upstream.rate_limit_per_s to send this one in time",
                    hint="raise upstream.rate_limit_per_s or lower upstream.concurrency",
                )
            # Reserve now (the balance may go negative): later callers queue behind this one.
            self._tokens -= 1
        if wait > 0:
            self._sleep(wait)


# ---------------------------------------------------------------- total deadline

# requests' read timeout restarts with every byte received, so a server that
# trickles its answer would hold a call for ever. Each call therefore arms a
# timer that shuts down the socket in use when the deadline passes; the
# connection classes below tell the call which socket that is.


class _Guard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: HTTPConnection | None = None
        self._done = False
        self.fired = False

    def attach(self, conn: HTTPConnection) -> None:
        with self._lock:
            self._conn = conn

    def cut(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            with suppress(OSError):  # already closed: nothing left to cut
                sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self._lock:
            self._done = True


_current = threading.local()


def _attach(conn: HTTPConnection) -> None:
    guard: _Guard | None = getattr(_current, "guard", None)
    if guard is not None:
        guard.attach(conn)


class _GuardedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        _attach(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        # Reused keep-alive connections skip connect(): register them here too.
        _attach(self)
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        _attach(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)
        super().request(*args, **kwargs)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


def _guard_pools(manager: PoolManager) -> None:
    manager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        _guard_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, PoolManager):
            _guard_pools(manager)
        return manager


class _Watchdog:
    """One thread cuts every call whose deadline has passed.

    A timer thread per call would start and stop a thread for every request: at a few
    hundred uploads per second that is a sizeable share of the process's CPU and GIL.
    Finished guards stay in the heap until their deadline comes and are skipped then.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Guard]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, guard: _Guard, seconds: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + max(seconds, 0.0), next(self._seq), guard))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="upstream-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is guard:
                self._cond.notify()  # earlier than what the thread sleeps towards

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    wait_s = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait_s is not None and wait_s <= 0:
                        break
                    self._cond.wait(wait_s)
                _, _, guard = heapq.heappop(self._heap)
            guard.cut()  # a finished guard ignores it


_watchdog = _Watchdog()


@contextmanager
def _deadline_guard(seconds: float) -> Iterator[_Guard]:
    guard = _Guard()
    _current.guard = guard
    _watchdog.arm(guard, seconds)
    try:
        yield guard
    finally:
        guard.finish()
        _current.guard = None


# ---------------------------------------------------------------- client


def _prepared(
    session: requests.Session, method: str, url: str, body: bytes | None, headers: dict[str, str]
) -> requests.PreparedRequest:
    """The request ``Session.request`` would prepare, built directly: the URL is already
    percent-encoded by signing, and parsing and re-quoting it in requests (before urllib3
    parses it again) was the largest single share of an upload's CPU time."""
    req = requests.PreparedRequest()
    req.method = method
    req.url = url
    merged: CaseInsensitiveDict[str] = CaseInsensitiveDict(
        {k: v if isinstance(v, str) else v.decode("latin-1") for k, v in session.headers.items()}
    )
    merged.update(headers)
    if body is not None:
        merged["Content-Length"] = str(len(body))
    req.headers = merged
    req.body = body
    req.hooks = default_hooks()
    if session.cookies:
        req.prepare_cookies(session.cookies)
    return req



@dataclass(frozen=True, kw_only=True)
class _Raw:
    status: int
    body: bytes
    content_type: str | None
    date: str | None


class Client:
    """Calls the platform; safe to share between threads."""

    def __init__(
        self, upstream: Upstream, store: TokenStore, *, wall_clock: Callable[[], float] = time.time,
        key_forms: KeyFormMemory | None = None,
    ) -> None:
        """``key_forms`` remembers which reading of the app key the platform accepts
        (the outbox's ``Store.key_form_memory()``; in this process only when None)."""
        self._up = upstream
        self._store = store
        self._wall = wall_clock
        raw_key = upstream.app_key.get_secret_value()
        register_secret(*app_key_texts(raw_key), upstream.password.get_secret_value())
        self._signer = KeySigner(raw_key, upstream.app_key_form, key_forms)
        self._codes = {name: event_code(upstream.env, name, upstream.event_codes) for name in ENDPOINTS}
        self._verify: bool | str = upstream.ca_bundle or upstream.verify_tls
        self._limiter = RateLimiter(upstream.rate_limit_per_s)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
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

    # -- public calls

    def login(self) -> Token:
        """One real login; the store calls this when the token must be renewed."""
        body = json.dumps(
            {"username": self._up.username, "password": self._up.password.get_secret_value()}, ensure_ascii=False
        ).encode("utf-8")
        self._count("logins")
        answer = self._send("login", body=body, token=None)
        token_value = answer.data.get("token") if answer.ok and isinstance(answer.data, Mapping) else None
        if not isinstance(token_value, str) or not token_value:
            log.warning(
                "login_failed", username=self._up.username, outcome=str(answer.outcome),
                http_status=answer.http_status, platform_message=answer.message,
            )
            error = to_error(answer)
            if isinstance(error, ConfigError):
                raise error
            # Whatever else a login answers (an outage, 中间请求异常, no token), it says nothing
            # about any record: sending waits for the platform.
            raise PlatformUnavailable(
                f"login failed: {error.message}", hint=error.hint or _NETWORK_FIX, http_status=answer.http_status,
                platform_message=error.platform_message,
            )
        register_secret(token_value)
        crash_point("during_login")
        now = self._now()
        token = Token(value=token_value, obtained_at=now, expires_at=now + timedelta(hours=self._up.token_ttl_h))
        log.info("login_succeeded", username=self._up.username, expires_at=token.expires_at.isoformat())
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
        log.info("record_uploaded", lsh=lsh, created=created, message=message)
        return UploadResult(created=created, message=message, http_status=answer.http_status)

    def clock_skew_s(self) -> float | None:
        """The platform's Date header minus our clock, from the latest answer (None before any)."""
        return self._skew

    def key_form(self) -> KeyFormState:
        """The reading of the app key requests are signed in, and whether the platform took it."""
        return self._signer.state()

    def close(self) -> None:
        self._signer.save_pending()
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

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
                f"the platform pushed this account's token out {kicks} times within "
                f"{KICK_WINDOW_S / 60:g} minutes: another program is logging in with upstream.username "
                f"{self._up.username!r} (FAQ 4)",
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

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Retries belong to the outbox: an upload retried here could hide a lost answer.
            adapter = _Adapter(pool_connections=1, pool_maxsize=self._up.concurrency, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            # Proxies and CA bundle from the environment (HTTPS_PROXY, NO_PROXY,
            # REQUESTS_CA_BUNDLE) are read once here: requests would otherwise walk the
            # whole environment on every call, a sizeable share of an upload's CPU time.
            env = session.merge_environment_settings(self._up.base_url, {}, None, self._verify, None)
            session.proxies.update(env["proxies"])
            session.verify = env["verify"]
            if isinstance(session.verify, str) and self._up.base_url.lower().startswith("http://") and not session.proxies:
                # Nothing to verify over plain HTTP, and a path here (REQUESTS_CA_BUNDLE) costs a
                # stat() of it on every call.
                session.verify = True
            session.trust_env = False
            # The URL is built here and sent prepared (see _prepared): check it once the way
            # requests would, so that a malformed base_url is still a configuration error.
            requests.PreparedRequest().prepare_url(self._up.base_url, None)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

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
        deadline = time.monotonic() + self._up.timeout_s
        self._limiter.acquire(deadline)
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
        raw = self._exchange(spec.method, url, body, headers, deadline, endpoint)
        self._note_clock(raw.date)
        return classify(raw.status, raw.body, raw.content_type, endpoint=endpoint)

    def _exchange(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], deadline: float, endpoint: str
    ) -> _Raw:
        remaining = deadline - time.monotonic()
        timeout_s = self._up.timeout_s
        with _deadline_guard(remaining) as guard:
            try:
                session = self._session()
                response = session.send(
                    _prepared(session, method, url, body, headers), stream=True, allow_redirects=False,
                    timeout=(min(self._up.connect_timeout_s, max(remaining, 0.001)), max(remaining, 0.001)),
                    verify=session.verify, proxies=session.proxies, cert=None,
                )
                try:
                    chunks: list[bytes] = []
                    for chunk in response.iter_content(_READ_CHUNK):
                        chunks.append(chunk)
                        if time.monotonic() > deadline:
                            guard.fired = True
                            raise TransientError("deadline")
                    return _Raw(
                        status=response.status_code, body=b"".join(chunks),
                        content_type=response.headers.get("Content-Type"), date=response.headers.get("Date"),
                    )
                finally:
                    response.close()
            except requests.exceptions.SSLError as exc:
                raise ConfigError(
                    f"TLS verification of {self._up.base_url} failed ({type(exc).__name__})",
                    hint="设置 upstream.ca_bundle 为医院/平台的 CA 证书 / set upstream.ca_bundle to the CA "
                    "certificate file (verify_tls: false only as a last resort)",
                ) from None
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
                raise ConfigError(
                    f"upstream.base_url {self._up.base_url!r} is not a usable URL ({type(exc).__name__})",
                    hint="e.g. http://11.6.226.2:9091",
                ) from None
            except (requests.exceptions.RequestException, OSError, TransientError) as exc:
                # Never chain the original: its text holds the signed URL.
                if guard.fired or time.monotonic() >= deadline:
                    message = f"{endpoint}: no complete answer within upstream.timeout_s={timeout_s:g}s"
                else:
                    message = f"{endpoint}: network error ({type(exc).__name__})"
                self._count("network_errors")
                log.warning("upstream_error", endpoint=endpoint, outcome="transient", http_status=None,
                            error=message)
                raise PlatformUnavailable(message, hint=_NETWORK_FIX) from None

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
    "RateLimiter",
    "UploadResult",
]
