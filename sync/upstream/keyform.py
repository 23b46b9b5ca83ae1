"""Which reading of the app key the requests are signed in, learnt from the platform.

The document does not say whether ``hie_secret`` is computed over the app key as
printed (``%2B``) or decoded (``+``); signing.py makes both. With
``upstream.app_key_form: auto`` the signer uses the reading remembered in the
outbox, or as printed when none is known yet. When the platform refuses the key
or the signature, the client tries the other reading once; the reading the
platform takes is remembered (``sync_state``), so every process uses it from then
on without trying again. A pinned reading (``decoded`` or ``as_printed``) is used
as it is and nothing is ever tried.

No I/O of its own: the memory is given (the outbox's, or one in this process).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal, Protocol

from sync.upstream.signing import KEY_FORMS, KeyForm, other_form, platform_app_key, signed_query

Setting = Literal["auto", "decoded", "as_printed"]

# For operators: the reading and what it means for the signature.
FORM_NAMES: dict[KeyForm, str] = {
    "as_printed": "as_printed (原样 %2B, MD5 over the key as printed)",
    "decoded": "decoded (解码 +/=, MD5 over the base64 key)",
}


class KeyFormMemory(Protocol):
    def recall(self) -> KeyForm | None:
        """The reading the platform last accepted, if any is known."""
        ...

    def remember(self, form: KeyForm) -> None:
        """The platform accepted ``form``: keep it for every process."""
        ...


class MemoryKeyForm:
    """One process only (tests, and clients built without an outbox)."""

    def __init__(self, form: KeyForm | None = None) -> None:
        self.form = form

    def recall(self) -> KeyForm | None:
        return self.form

    def remember(self, form: KeyForm) -> None:
        self.form = form


@dataclass(frozen=True, kw_only=True)
class KeyFormState:
    setting: Setting
    form: KeyForm  # the reading the next request is signed in
    confirmed: bool  # the platform accepted it (in this process, or remembered from before)


class KeySigner:
    """The current reading of the app key, and the one switch to the other. Thread-safe."""

    def __init__(self, raw_key: str, setting: Setting, memory: KeyFormMemory | None = None) -> None:
        self._keys: dict[KeyForm, str] = {form: platform_app_key(raw_key, form) for form in KEY_FORMS}
        self._setting: Setting = setting
        self._memory: KeyFormMemory = memory if memory is not None else MemoryKeyForm()
        self._lock = threading.Lock()
        # Read once, here: a login runs inside the token row's lock, where the outbox cannot be read.
        remembered: KeyForm | None = None
        if setting == "auto":
            remembered = self._memory.recall()
            self._form: KeyForm = remembered or KEY_FORMS[0]
        else:
            self._form = setting
        self._saved: KeyForm | None = remembered  # what the memory holds, as far as this process knows
        self._unsaved: KeyForm | None = None
        self._confirmed = remembered is not None

    @property
    def form(self) -> KeyForm:
        return self._form

    def state(self) -> KeyFormState:
        return KeyFormState(setting=self._setting, form=self._form, confirmed=self._confirmed)

    def query(self, form: KeyForm, event_code: str, time_stamp_ms: int) -> str:
        """The signed query string for one request in reading ``form``."""
        return signed_query(event_code, self._keys[form], time_stamp_ms)

    def alternative(self, refused: KeyForm) -> KeyForm | None:
        """The reading to try once after ``refused`` was refused; None when the setting pins
        the reading, or when the key has no ``+``, ``/`` or ``=`` (both readings are one text)."""
        if self._setting != "auto":
            return None
        other = other_form(refused)
        return None if self._keys[other] == self._keys[refused] else other

    def accepted(self, form: KeyForm, *, save_now: bool) -> bool:
        """The platform took a request signed in ``form``: sign in it from now on and remember
        it (now, or at the next ``save_pending`` when the caller is inside a login). True when
        this is news: the reading was not known to be accepted before."""
        if form == self._form and self._confirmed and (self._saved == form or self._setting != "auto"):
            return False  # every accepted request after the first one: nothing to do
        with self._lock:
            news = not self._confirmed or form != self._form
            self._form = form
            self._confirmed = True
            if self._setting == "auto" and self._saved != form:
                self._unsaved = form
        if save_now:
            self.save_pending()
        return news

    def save_pending(self) -> None:
        """Write a reading learnt during a login, once the login's lock on the outbox is gone."""
        if self._unsaved is None:
            return
        with self._lock:
            form, self._unsaved = self._unsaved, None
        if form is None or form == self._saved:
            return
        # Outside the lock: another thread may be logging in, holding the outbox, and need it.
        self._memory.remember(form)
        self._saved = form
