"""structlog set-up, and the masking every line goes through.

Two promises are kept here for every log line, at every level, tracebacks and
third-party loggers (urllib3, sqlalchemy, apscheduler) included:
- resident ID numbers are masked, first 6 and last 4 kept (15 or 18 characters);
- registered secrets (password, app key in both encodings, token, hie_secret) and
  the signing parameters of a URL never appear.

Redaction runs on the event dict after tracebacks are rendered to text and just
before the renderer, so structlog events and stdlib records (with their
``%s`` arguments and ``exc_info``) pass the same gate.

Under systemd, stderr is a stream into the journal, which reads a ``<N>`` at the
start of each line as its syslog priority (sd-daemon(3), SyslogLevelPrefix=yes):
every line gets one there, so ``journalctl -p warning`` shows warnings and errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO
from urllib.parse import quote, quote_plus, unquote

import structlog

from sync import localtime

REDACTED = "[secret]"

# 18 characters (17 digits and a digit or X) or 15 digits, not inside a longer run
# of letters or digits: a 13-digit millisecond time stamp or a 32-hex MD5 never matches.
_ID_RE = re.compile(r"(?<![0-9A-Za-z])(\d{6})(\d{8}|\d{5})(\d{3}[0-9Xx]|\d{4})(?![0-9A-Za-z])")

# Credential-bearing parameters, as `key=value` (query strings, form bodies, console
# key/value output) or as a quoted key followed by `:` (JSON, Python reprs). An unquoted
# `password: ...` is left alone: that is how our own configuration messages name the key.
_SIGNED_KEYS = r"hie_app_key|hie_secret|app_?key|\w*token|\w*password|passwd|pwd|\w*secret"
_SIGNED_RE = re.compile(
    rf"""(?P<key>\b(?:{_SIGNED_KEYS})\b)"""
    r"""(?P<sep>\s*=\s*|["']\s*:\s*)"""
    r"""(?:(?P<q>["'])(?P<qv>(?:\\.|(?!(?P=q)).)*)(?P=q)|(?!\[secret\])(?P<v>[^&\s"',;}\])]+))""",
    re.IGNORECASE,
)
# The token as an HTTP header line (http.client's debug output prints headers unquoted).
_HEADER_RE = re.compile(r"(?P<key>\baccesstoken)(?P<sep>\s*:\s*)(?!\[secret\])[^\s'\",;}]+", re.IGNORECASE)
# Passwords inside database URLs: scheme://user:password@host
_URL_PW_RE = re.compile(r"([a-zA-Z][\w+.-]*://[^:/@\s]*:)([^@\s]+)(@)")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secret_re: re.Pattern[str] | None = None

# Marks the handler `configure` installs, so a second call replaces it.
_HANDLER_FLAG = "_crowd_sync_handler"

# Syslog priorities by logging level (sd-daemon(3)): what journald reads from a "<N>" prefix.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7
# Whether lines to stderr carry the prefix, as `configure` decided; None: not configured yet.
_prefix_stderr: bool | None = None


def mask_id(value: str) -> str:
    """``510100198506020036`` -> ``510100********0036``.

    Any other document number is masked the same way (first 6 and last 4 kept) when
    longer than 10 characters, and entirely when shorter.
    """
    v = value.strip()
    if len(v) > 10:
        return v[:6] + "*" * (len(v) - 10) + v[-4:]
    return "*" * len(v)


def _forms(value: str) -> set[str]:
    """The spellings a secret takes on its way to the wire or into a JSON text."""
    plain = {value}
    if "%" in value:
        # An app key may be configured already percent-encoded; its decoded form is what gets signed.
        plain.add(unquote(value))
    out: set[str] = set()
    for v in plain:
        out |= {v, quote(v, safe=""), quote(v, safe="/"), quote_plus(v), json.dumps(v, ensure_ascii=False)[1:-1]}
    return out


def register_secret(*values: str | None) -> None:
    """Never let these strings (nor their percent-encoded or JSON-escaped forms) reach a log line.

    Values shorter than 4 characters are ignored: masking them would shred ordinary text.
    """
    global _secret_re
    with _secrets_lock:
        for value in values:
            if not value or len(value) < 4:
                continue
            _secrets.update(f for f in _forms(value) if len(f) >= 4)
        ordered = sorted(_secrets, key=len, reverse=True)
        _secret_re = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None


def _signed_sub(m: re.Match[str]) -> str:
    q = m.group("q")
    value = f"{q}{REDACTED}{q}" if q else REDACTED
    return f"{m.group('key')}{m.group('sep')}{value}"


def redact(text: str) -> str:
    """Mask ID numbers and remove registered secrets, credential parameters and URL passwords from text."""
    if not text:
        return text
    pattern = _secret_re
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _SIGNED_RE.sub(_signed_sub, text)
    text = _HEADER_RE.sub(rf"\g<key>\g<sep>{REDACTED}", text)
    text = _URL_PW_RE.sub(rf"\1{REDACTED}\3", text)
    return _ID_RE.sub(lambda m: m.group(1) + "*" * len(m.group(2)) + m.group(3), text)


def _redact_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_redact_value(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    # Anything else would reach the renderer as its repr(), unredacted: turn it into text here.
    return redact(str(value))


def _mask_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Redact every key and value; must run after ``format_exc_info`` so tracebacks are text."""
    return {_redact_value(k): _redact_value(v) for k, v in event_dict.items()}


class _RedactingFilter(logging.Filter):
    """Renders and redacts the message of plain `logging` records (urllib3, sqlalchemy...).

    Done on the record itself so that even logging's own error report (printed when a
    handler fails) shows only redacted text. structlog records are left to the formatter.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict) and hasattr(record, "_logger"):
            return True
        if record.levelno < logging.INFO and record.name.startswith("sqlalchemy.engine"):
            # Result rows: the shared token as read by a process that did not log in (no
            # registered secret there) and patients' label data, which no pattern recognises.
            # Statements and their parameters (INFO) still show when debugging.
            return False
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken third-party format string must not kill logging
            message = f"{record.msg} (arguments did not match the format)"
        record.msg = redact(message)
        record.args = None
        return True


def priority(level: int | str) -> int:
    """The syslog priority of a logging level (a number, or a name such as ``"warning"``)."""
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        level = number if isinstance(number, int) else logging.INFO
    for threshold, value in _PRIORITIES:
        if level >= threshold:
            return value
    return _DEBUG_PRIORITY


def with_priority(text: str, level: int | str) -> str:
    """``text`` with ``<N>`` before each of its lines: journald takes each line as one entry."""
    prefix = f"<{priority(level)}>"
    return "\n".join(prefix + line for line in text.split("\n"))


def is_journal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr) is connected to the journal: systemd names that connection's
    device and inode in ``$JOURNAL_STREAM`` (a child's redirected stderr no longer matches)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):  # closed, or no file descriptor (a StringIO)
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def for_stderr(text: str, level: int | str = "error") -> str:
    """What a command prints on stderr besides the log: with the journald priority when the
    log lines carry theirs (or, before ``configure``, when stderr is the journal)."""
    wanted = is_journal() if _prefix_stderr is None else _prefix_stderr
    return with_priority(text, level) if wanted else text


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that can put the journald priority before each line."""

    def __init__(self, stream: TextIO, *, prefix: bool) -> None:
        super().__init__(stream)
        self.prefix = prefix
        # Set up on stderr: keep writing to whatever sys.stderr is at the time, so that lines
        # logged under the terminal's live progress display scroll above it (it redirects stderr).
        self._follow_stderr = stream is sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow_stderr and self.stream is not sys.stderr:
            self.stream = sys.stderr
        super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return with_priority(text, record.levelno) if self.prefix else text


def _timestamp(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The time of the line in schedule.timezone with its offset (one clock for people)."""
    event_dict["timestamp"] = localtime.now().isoformat(timespec="milliseconds")
    return event_dict


def configure(
    level: str = "info",
    fmt: str = "json",
    stream: TextIO | None = None,
    *,
    priority_prefix: bool | Literal["auto"] = "auto",
) -> None:
    """Route structlog and stdlib logging to one stream, every line redacted.

    ``priority_prefix``: put ``<N>`` (the syslog priority) before each line; ``"auto"``
    does so when the stream is connected to the journal. Calling it again replaces the
    previous set-up (no duplicated lines).
    """
    global _prefix_stderr
    out = stream or sys.stderr
    prefix = is_journal(out) if priority_prefix == "auto" else bool(priority_prefix)
    if out is sys.stderr:
        _prefix_stderr = prefix
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _timestamp,
    ]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    else:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
    structlog.configure(
        processors=[
            *shared,
            # Render the traceback while the exception is current, then redact the
            # event dict before it leaves structlog for the stdlib handler.
            structlog.processors.format_exc_info,
            _mask_processor,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Stdlib records arrive here with exc_info still an exception: render, then redact.
            structlog.processors.format_exc_info,
            _mask_processor,
            renderer,
        ],
    )
    handler = _Handler(out, prefix=prefix)
    handler.setFormatter(formatter)
    handler.addFilter(_RedactingFilter())
    setattr(handler, _HANDLER_FLAG, True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_FLAG, False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
    # Chatty libraries stay at warning unless debugging.
    for name in ("urllib3", "sqlalchemy", "apscheduler", "alembic"):
        logging.getLogger(name).setLevel(lvl if lvl <= logging.DEBUG else logging.WARNING)
