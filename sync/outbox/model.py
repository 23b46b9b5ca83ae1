"""Pure: what goes into the outbox and what comes out of it, as plain values.

A row moves ``pending -> sent`` (or ``failed``/``invalid``/``dead``/``skipped``):
intake hands the store ``Incoming`` rows, dispatch gets ``Claimed`` rows under a
lease and hands back one outcome for each (``Sent``, ``Failed`` or ``Parked``);
the store alone turns an outcome into SQL.

Times handed in are UTC (aware values are converted, naive ones taken as UTC),
except ``source_changed_at``, which is the HIS's own clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    INVALID = "invalid"
    DEAD = "dead"
    SKIPPED = "skipped"


# The institution of the outbox's rows when the settings name none (the single-institution
# form without institution.code). Not empty: Oracle stores '' as NULL, and it is part of the key.
DEFAULT_INSTITUTION = "default"

# Rows dispatch takes once their next_attempt_at has come.
DUE = (Status.PENDING.value, Status.FAILED.value)


@dataclass(frozen=True, kw_only=True)
class Incoming:
    """One visit read from the HIS, after local validation; the key is (institution, lsh)."""

    institution: str = DEFAULT_INSTITUTION
    lsh: str
    payload_json: str
    payload_hash: str
    status: Status  # PENDING, SKIPPED or INVALID
    key_crowd: str | None
    reason: str | None  # becomes last_error for SKIPPED and INVALID
    source_changed_at: datetime | None
    card_type: str | None
    card_no: str | None
    visit_type: str | None
    settlement_date: date | None


@dataclass(frozen=True, kw_only=True)
class EnqueueResult:
    inserted: int
    changed: int
    unchanged: int
    # Of the rows written (inserted or changed), how many were parked at once.
    invalid: int = 0
    skipped: int = 0


@dataclass(frozen=True, kw_only=True)
class Claimed:
    """A row leased to one worker for uploading."""

    institution: str = DEFAULT_INSTITUTION
    lsh: str
    payload_json: str
    payload_hash: str
    key_crowd: str | None
    card_type: str | None
    card_no: str | None
    attempts: int
    generic_failures: int
    first_failed_at: datetime | None
    lease_owner: str


# -- outcomes: what became of one claimed row ---------------------------------------------
# Each is written only if the row is still the claimer's and its payload unchanged (see
# ``Leases.record``); the lease is dropped either way.


@dataclass(frozen=True, kw_only=True)
class Sent:
    """The platform accepted ``body`` (新增成功 / 修改成功)."""

    claimed: Claimed
    body: str  # the payload as sent: it replaces the stored one
    key_crowd: str
    answer: str  # the platform's success answer
    http_status: int | None
    at: datetime
    # When dispatch rebuilt the payload (a requeued row that local validation had parked),
    # its hash replaces the stored one, so the next read of the unchanged HIS row finds it current.
    payload_hash: str | None = None


@dataclass(frozen=True, kw_only=True)
class Failed:
    """A failure charged to the record: tried again at ``retry_at``, one attempt more."""

    claimed: Claimed
    error: str
    http_status: int | None
    at: datetime
    retry_at: datetime
    generic: bool  # an unexplained refusal (中间请求异常 and the like)


@dataclass(frozen=True, kw_only=True)
class Parked:
    """Not sent and not due: ``invalid`` (tried again when the HIS row changes or on
    ``retry``), ``dead`` (only on ``retry``) or ``skipped`` (re-checked by the reconcile).
    Invalid and dead count an attempt; skipped does not."""

    claimed: Claimed
    status: Status
    error: str
    http_status: int | None
    at: datetime
    # SKIPPED: what is known of the key population ("0"), or None to keep the column as it is.
    key_crowd: str | None = None


Outcome = Sent | Failed | Parked


@dataclass(frozen=True, kw_only=True)
class Summary:
    """What ``crowd-sync status`` shows.

    ``oldest_pending_at``: among pending and failed rows, the earliest moment one
    has been waiting since: its first transient failure if it has failed, else
    its last change (enqueued, changed or requeued). None when nothing waits.
    """

    counts: dict[str, int]  # every Status value, as plain text
    oldest_pending_at: datetime | None
    last_sent_at: datetime | None
    last_run: dict[str, Any] | None
    last_successful_run: dict[str, Any] | None
    config_error: dict[str, Any] | None
    leased: int
    # {form, accepted_at}: the reading of the app key the platform last accepted (upstream.app_key_form: auto).
    key_form: dict[str, Any] | None = None
    # While the platform is unreachable: {since, reason, probes, next_probe_at} (ISO text, UTC).
    platform_down: dict[str, Any] | None = None
    # Each institution apart (code -> {counts, config_error, key_form}); ``counts``,
    # ``config_error`` (the first institution paused) and ``key_form`` (the first one's) above
    # are all of them together.
    institutions: dict[str, dict[str, Any]] = field(default_factory=dict)
