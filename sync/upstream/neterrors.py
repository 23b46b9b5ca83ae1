"""Pure: what a network error means, in words an operator can act on.

requests wraps the operating system's error several layers deep (ConnectionError around
MaxRetryError around NewConnectionError around ConnectionRefusedError), and the texts
of those layers carry the signed URL. This walks the chain for the cause alone and
names the host from the settings, never from the error's text.
"""

from __future__ import annotations

import errno
import socket
from urllib.parse import urlsplit

# (cause, Chinese) by the first matching exception type in the chain.
_CAUSES: tuple[tuple[type[BaseException], str, str], ...] = (
    (socket.gaierror, "name not resolved", "域名无法解析"),
    (ConnectionRefusedError, "connection refused", "连接被拒绝"),
    (ConnectionResetError, "connection reset", "连接被重置"),
    (ConnectionAbortedError, "connection aborted", "连接被中断"),
    (TimeoutError, "timed out", "超时"),
    (BrokenPipeError, "connection closed", "连接被关闭"),
)
_ERRNOS = {
    errno.ENETUNREACH: ("network unreachable", "网络不可达"),
    errno.EHOSTUNREACH: ("no route to host", "主机不可达"),
    errno.ECONNREFUSED: ("connection refused", "连接被拒绝"),
    errno.ECONNRESET: ("connection reset", "连接被重置"),
    errno.ETIMEDOUT: ("timed out", "超时"),
}


def host_of(base_url: str) -> str:
    """``host:port`` of the platform's base URL (the port the scheme implies when none is written)."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname or base_url}:{port}"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 20:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        for nxt in (getattr(e, "reason", None), e.__cause__, e.__context__, *getattr(e, "args", ())):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return seen


def cause(exc: BaseException) -> tuple[str, str]:
    """(English, Chinese) of what went wrong on the network, e.g. ("connection refused", "连接被拒绝")."""
    chain = _chain(exc)
    for kind, en, zh in _CAUSES:
        if any(isinstance(e, kind) for e in chain):
            return en, zh
    for e in chain:
        number = getattr(e, "errno", None)
        if isinstance(number, int) and number in _ERRNOS:
            return _ERRNOS[number]
    names = {type(e).__name__ for e in chain}
    if names & {"ConnectTimeout", "ReadTimeout", "ConnectTimeoutError", "ReadTimeoutError"}:
        return "timed out", "超时"
    if names & {"SSLError"}:
        return "TLS handshake failed", "TLS 握手失败"
    if names & {"ProtocolError", "RemoteDisconnected", "ChunkedEncodingError", "IncompleteRead"}:
        return "connection dropped before a complete answer", "应答未完成连接即断开"
    if names & {"ProxyError"}:
        return "the proxy refused or failed", "代理出错"
    return f"network error ({type(exc).__name__})", "网络错误"


def describe(exc: BaseException, base_url: str) -> str:
    """``cannot reach 11.6.226.2:9091: connection refused / 连接被拒绝``."""
    en, zh = cause(exc)
    return f"{host_of(base_url)}: {zh} / {en}"
