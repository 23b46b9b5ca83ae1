"""Small named facts in ``sync_state``, shared by every process using the outbox.

Each row holds one JSON object: the configuration error holding sending back, the
platform found unreachable, the last reading of the HIS clock, the reading of the
app key the platform accepts, the process holding the instance lock.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog

from sync.outbox.engine import utc
from sync.outbox.model import DEFAULT_INSTITUTION
from sync.outbox.schema import sync_state
from sync.upstream.keyform import KeyFormMemory
from sync.upstream.signing import KEY_FORMS, KeyForm

log = structlog.get_logger(__name__)

CONFIG_ERROR = "config_error"
# Kept while the platform is unreachable (dispatch probes it with back-off).
PLATFORM_DOWN = "platform_down"
HIS_CLOCK = "his_clock"
KEY_FORM = "app_key_form"
INSTANCE = "instance"
# The running service's next poll and next reconcile (`status`).
SCHEDULE = "schedule"
# Facts of one institution (each has its own key and account): the row is named
# `config_error:CODE`, `app_key_form:CODE`. The platform being down is shared.
PER_INSTITUTION = (CONFIG_ERROR, KEY_FORM)


def named(fact: str, institution: str) -> str:
    """The sync_state row of one institution's ``fact``."""
    return f"{fact}:{institution}"


class State:
    """The ``sync_state`` rows."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    @staticmethod
    def read(conn: sa.Connection, name: str) -> dict[str, Any] | None:
        """The row's object, None when absent or unreadable."""
        value = conn.execute(sa.select(sync_state.c.value).where(sync_state.c.name == name)).scalar()
        if not value:
            return None
        try:
            data = json.loads(value)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def get(self, name: str) -> dict[str, Any] | None:
        with self._engine.connect() as conn:
            return self.read(conn, name)

    def put(self, name: str, value: dict[str, Any] | None, *, now: datetime) -> None:
        text = None if value is None else json.dumps(value, ensure_ascii=False, default=str)
        for attempt in (1, 2):
            try:
                with self._engine.begin() as conn:
                    updated = conn.execute(
                        sa.update(sync_state).where(sync_state.c.name == name).values(value=text, updated_at=utc(now))
                    ).rowcount
                    if not updated:
                        conn.execute(sa.insert(sync_state).values(name=name, value=text, updated_at=utc(now)))
                return
            except sa.exc.IntegrityError:
                # Another process inserted the same name first: update it instead.
                if attempt == 2:
                    raise

    def delete(self, name: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(sa.delete(sync_state).where(sync_state.c.name == name))

    # -- the HIS clock ---------------------------------------------------------------------
    def put_his_clock(self, reading: dict[str, Any], *, now: datetime) -> None:
        """Keep the last reading of the HIS clock (``sync.clock.state``) for status and /healthz."""
        self.put(HIS_CLOCK, reading, now=now)

    def get_his_clock(self) -> dict[str, Any] | None:
        return self.get(HIS_CLOCK)

    # -- sending held back ------------------------------------------------------------------
    def set_config_error(
        self, *, message: str, hint: str, now: datetime, institution: str = DEFAULT_INSTITUTION
    ) -> None:
        """Hold ``institution``'s sending back until its configuration is fixed; ``since`` keeps
        the first occurrence."""
        previous = self.get_config_error(institution)
        since = previous.get("since") if previous else None
        self.put(
            named(CONFIG_ERROR, institution),
            {"message": message, "hint": hint, "since": since or utc(now).isoformat(timespec="seconds")},
            now=now,
        )

    def get_config_error(self, institution: str = DEFAULT_INSTITUTION) -> dict[str, Any] | None:
        """``{message, hint, since}`` (since: ISO text, UTC) while ``institution``'s sending is held
        back, else None."""
        return self.get(named(CONFIG_ERROR, institution))

    def clear_config_error(self, institution: str = DEFAULT_INSTITUTION) -> None:
        self.delete(named(CONFIG_ERROR, institution))

    def get_platform_down(self) -> dict[str, Any] | None:
        """``{since, reason, probes, next_probe_at}`` (ISO text, UTC) while the platform is unreachable."""
        return self.get(PLATFORM_DOWN)

    def set_platform_down(self, *, reason: str, now: datetime, next_probe_at: datetime) -> dict[str, Any]:
        """Record that the platform did not answer (first time or a failed probe): ``since`` keeps the
        first occurrence, ``probes`` counts the failed probes since."""
        previous = self.get_platform_down()
        state = {
            "since": (previous or {}).get("since") or utc(now).isoformat(timespec="seconds"),
            "reason": reason,
            "probes": int((previous or {}).get("probes") or 0) + (1 if previous else 0),
            "last_failure_at": utc(now).isoformat(timespec="seconds"),
            "next_probe_at": utc(next_probe_at).isoformat(timespec="milliseconds"),
        }
        self.put(PLATFORM_DOWN, state, now=now)
        return state

    def clear_platform_down(self) -> None:
        self.delete(PLATFORM_DOWN)

    # -- the reading of the app key -----------------------------------------------------------
    def get_key_form(self, institution: str = DEFAULT_INSTITUTION) -> KeyForm | None:
        """The reading of ``institution``'s app key the platform last accepted, shared by every process."""
        value = self.get(named(KEY_FORM, institution))
        form = value.get("form") if value else None
        return next((f for f in KEY_FORMS if f == form), None)

    def put_key_form(self, form: KeyForm, *, now: datetime, institution: str = DEFAULT_INSTITUTION) -> None:
        self.put(
            named(KEY_FORM, institution), {"form": form, "accepted_at": utc(now).isoformat(timespec="seconds")}, now=now
        )

    def key_form_memory(self, institution: str = DEFAULT_INSTITUTION) -> KeyFormMemory:
        """For ``Client(key_forms=...)``: the accepted reading of ``institution``'s key kept in ``sync_state``."""
        return _KeyFormRow(self, institution)


class _KeyFormRow:
    """``sync.upstream.keyform.KeyFormMemory`` on an institution's ``app_key_form`` state row."""

    def __init__(self, state: State, institution: str) -> None:
        self._state = state
        self._institution = institution

    def recall(self) -> KeyForm | None:
        return self._state.get_key_form(self._institution)

    def remember(self, form: KeyForm) -> None:
        try:
            self._state.put_key_form(form, now=datetime.now(UTC), institution=self._institution)
        except sa.exc.SQLAlchemyError as exc:
            # Not worth failing an upload for: without it, the next process tries both readings again.
            log.warning(
                "app_key_form_not_saved", form=form, error=type(exc).__name__,
                consequence="the next process to log in tries both readings of the app key again",
            )
