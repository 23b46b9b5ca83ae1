"""The HTTP side of the platform client: sessions, the rate limit, and a total deadline per call.

- One ``requests`` session per thread, its proxies and CA bundle read from the
  environment once; nothing is retried here (retries belong to the outbox: an
  upload retried inside the HTTP layer could hide a lost answer).
- A token bucket shared by every call of one client (``upstream.rate_limit_per_s``).
- One call never takes longer than ``upstream.timeout_s`` in total, even against a
  server that trickles its answer a byte at a time: a watchdog thread cuts the
  socket of a call whose deadline has passed.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import requests
import structlog
from requests.adapters import HTTPAdapter
from requests.hooks import default_hooks
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager

from sync.errors import ConfigError, PlatformUnavailable, TransientError
from sync.settings import Upstream
from sync.upstream import neterrors

log = structlog.get_logger(__name__)

_READ_CHUNK = 4096
NETWORK_FIX = (
    "请检查网络、防火墙与 upstream.base_url；稍后自动重试 / "
    "check the network, firewall and upstream.base_url: retried later"
)


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
                    "排队请求太多，按 upstream.rate_limit_per_s 无法按时发出 / too many requests queued for upstream.rate_limit_per_s to send this one in time",
                    hint="调高 upstream.rate_limit_per_s 或调低 upstream.concurrency / raise upstream.rate_limit_per_s or lower upstream.concurrency",
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


class _GuardedHTTPSConnection(_GuardedHTTPConnection, HTTPSConnection):
    """The same registration over TLS: the MRO puts HTTPSConnection's connect behind it."""


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


# ---------------------------------------------------------------- sending


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
class Raw:
    """One HTTP answer as it came, read whole."""

    status: int
    body: bytes
    content_type: str | None
    date: str | None


class Transport:
    """Sends prepared requests for one client; safe to share between threads."""

    def __init__(
        self, upstream: Upstream, *, count: Callable[[str], None], limiter: RateLimiter | None = None
    ) -> None:
        """``count`` is told of each network error (the client's counters); ``limiter``: the
        rate limit shared with the other institutions' clients (one platform, one limit)."""
        self._up = upstream
        self._count = count
        self._verify: bool | str = upstream.ca_bundle or upstream.verify_tls
        self._limiter = limiter or RateLimiter(upstream.rate_limit_per_s)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def slot(self) -> float:
        """Wait for the rate limit; returns the call's deadline (``time.monotonic``).

        The caller signs its request after this, so that the time stamp is current."""
        deadline = time.monotonic() + self._up.timeout_s
        self._limiter.acquire(deadline)
        return deadline

    def exchange(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], *, deadline: float, endpoint: str
    ) -> Raw:
        """One HTTP exchange, the answer read whole before ``deadline`` (``slot``'s); network
        failures and timeouts raise PlatformUnavailable, a TLS or URL problem ConfigError."""
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
                    return Raw(
                        status=response.status_code, body=b"".join(chunks),
                        content_type=response.headers.get("Content-Type"), date=response.headers.get("Date"),
                    )
                finally:
                    response.close()
            except requests.exceptions.SSLError as exc:
                raise ConfigError(
                    f"TLS 证书校验失败 / TLS verification of {self._up.base_url} failed ({type(exc).__name__})",
                    hint="设置 upstream.ca_bundle 为医院/平台的 CA 证书 / set upstream.ca_bundle to the CA "
                    "certificate file (verify_tls: false only as a last resort)",
                ) from None
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
                raise ConfigError(
                    f"upstream.base_url {self._up.base_url!r} 不是可用的地址 / is not a usable URL ({type(exc).__name__})",
                    hint="例如 / e.g. http://11.6.226.2:9091",
                ) from None
            except (requests.exceptions.RequestException, OSError, TransientError) as exc:
                # Never chain the original: its text holds the signed URL.
                if guard.fired or time.monotonic() >= deadline:
                    message = (
                        f"{endpoint}: {neterrors.host_of(self._up.base_url)} 在 upstream.timeout_s={timeout_s:g}s 内未完整应答 "
                        f"/ no complete answer within upstream.timeout_s={timeout_s:g}s"
                    )
                else:
                    message = f"{endpoint}: 无法连接 / cannot reach {neterrors.describe(exc, self._up.base_url)}"
                self._count("network_errors")
                log.warning("upstream_error", endpoint=endpoint, outcome="transient", http_status=None,
                            error=message)
                raise PlatformUnavailable(message, hint=NETWORK_FIX) from None

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

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
