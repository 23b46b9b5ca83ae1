"""The common query parameters every platform call carries (document 2.2).

Pure: no I/O. The app key is a base64 string that the document prints already
percent-encoded (``%2B``, ``%2F``, ``%3D``), and the document never says which
text ``hie_secret`` is computed over. Two readings, both supported:

- *decoded*: the platform knows the base64 text (``+``, ``/``, ``=``). It goes
  into the MD5 as is and onto the wire percent-encoded once (``%2B``).
- *as printed*: the platform knows the key exactly as the document prints it
  (``%2B`` included). It goes into the MD5 as printed and onto the wire
  percent-encoded once more (``%252B``), so that after the platform's one
  decoding of the query it reads the printed text it signed. The one public
  client of this platform (scmt1/healthyCheck) signs this way.

Either way the settings may hold the key in either form: ``platform_app_key``
gives the text the platform compares and signs under each reading, and
``signed_query`` puts that text on the wire encoded once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote

from sync.errors import ConfigError
from sync.settings import EventCodes

Env = Literal["test", "prod"]
EndpointName = Literal["login", "labels", "upload"]
# Which text of the app key the platform compares and signs (module docstring).
KeyForm = Literal["decoded", "as_printed"]

# The order ``upstream.app_key_form: auto`` tries them in. As printed first: the one
# public client known to log in to this platform configures the key as printed and
# signs that text (docs/signing.md).
KEY_FORMS: tuple[KeyForm, KeyForm] = ("as_printed", "decoded")

# Appended to the concatenation before hashing (document 2.2, hie_secret).
SALT = "HIE_ADAPTER_382d8d3b4e6bc62de8b984ac84acf492"

# Required on every request in the test environment only; prod rejects nothing without it.
EHRKEY_HEADER = ("ehrkey", "ehr#health@check")


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    method: Literal["GET", "POST"]
    path: str  # the labels path ends with "/" and takes the ID number appended


ENDPOINTS: dict[EndpointName, Endpoint] = {
    "login": Endpoint(method="POST", path="/adapter/http/ehrc/login/integration"),
    "labels": Endpoint(method="GET", path="/adapter/http/ehrc/v1.0/api/ehr/rybq/"),
    "upload": Endpoint(method="POST", path="/adapter/http/ehrc/v1.0/api/crowd/medical/record/insertOrUpdate"),
}

# Per endpoint and environment; login's code is the same in both (document 2.3).
DOCUMENT_EVENT_CODES: dict[Env, dict[EndpointName, str]] = {
    "test": {
        "login": "177cf201a6997f4ca0b8da298e31e3f1",
        "labels": "2af82deac11d4670977580bcc01aaa94",
        "upload": "a7a87688f52e4100ab33a2514ec1971f",
    },
    "prod": {
        "login": "177cf201a6997f4ca0b8da298e31e3f1",
        "labels": "8f6fa17d4dbf4b95bf1dfb01b0837345",
        "upload": "b60eb517bdcd4525958aebadeef76d63",
    },
}

_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")


def decode_app_key(raw: str) -> str:
    """The base64 text of the app key, whether given percent-encoded (as printed) or not.

    Decoded exactly once: base64 never contains ``%``, so a ``%XX`` can only be
    an encoding. A key pasted twice-encoded (``%252B``) stays wrong on purpose
    rather than being guessed at.
    """
    key = raw.strip()
    if _PERCENT.search(key):
        return unquote(key)
    return key


def printed_app_key(raw: str) -> str:
    """The key as the document prints it (``%2B``, ``%2F``, ``%3D``), whichever form ``raw`` is in.

    Rebuilt from the base64 text, so a key pasted decoded and the same key pasted
    as printed give the same string.
    """
    return quote(decode_app_key(raw), safe="")


def platform_app_key(raw: str, form: KeyForm) -> str:
    """The text the platform compares and signs under ``form``: what it must read in
    ``hie_app_key`` after its one decoding of the query."""
    if form == "decoded":
        return decode_app_key(raw)
    return printed_app_key(raw)


def other_form(form: KeyForm) -> KeyForm:
    return "decoded" if form == "as_printed" else "as_printed"


def app_key_texts(raw: str) -> tuple[str, ...]:
    """Every text of the key that a request or a message could carry, for the log redactor:
    as given, decoded, as printed, and each reading as it travels on the wire."""
    texts = {raw.strip()}
    for form in KEY_FORMS:
        key = platform_app_key(raw, form)
        texts |= {key, quote(key, safe="")}
    return tuple(sorted(texts))


def event_code(env: Env, endpoint: EndpointName, overrides: EventCodes | None = None) -> str:
    """The document's event code for this endpoint in this environment, unless overridden in settings."""
    if overrides is not None:
        override: str | None = getattr(overrides, endpoint)
        if override:
            return override.strip()
    try:
        return DOCUMENT_EVENT_CODES[env][endpoint]
    except KeyError:
        raise ConfigError(
            f"没有该接口的 event code / no event code for endpoint {endpoint!r} in environment {env!r}",
            hint="upstream.env 须为 test 或 prod / upstream.env must be test or prod",
        ) from None


def hie_secret(event_code: str, app_key: str, time_stamp_ms: str) -> str:
    """Lower-case hex MD5 of event code + app key + time stamp + SALT, no separators.

    ``app_key`` is the text the platform signs (``platform_app_key``): the base64
    text when decoded, the printed text when as printed.
    """
    text = f"{event_code}{app_key}{time_stamp_ms}{SALT}"
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def signed_query(event_code: str, app_key: str, time_stamp_ms: int) -> str:
    """The query string (without ``?``): every value percent-encoded exactly once.

    ``app_key`` is ``platform_app_key(raw, form)``: the platform reads it back
    after decoding the query once, and recomputes the secret over it. As printed,
    that makes ``%2B`` travel as ``%252B``.
    """
    stamp = str(int(time_stamp_ms))
    secret = hie_secret(event_code, app_key, stamp)
    parts = (
        ("hie_event_code", event_code),
        ("hie_app_key", app_key),
        ("hie_time_stamp", stamp),
        ("hie_secret", secret),
    )
    return "&".join(f"{name}={quote(value, safe='')}" for name, value in parts)
