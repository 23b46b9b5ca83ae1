"""Pure: the one key-population decision, made for every visit before it may be uploaded.

The document: "目前只上传重点人群诊疗记录" (only key-population visits are uploaded for
now). A visit goes up only when its patient is *known* to be key population; nothing
is ever presumed. Every path that can end in an upload (first send, retry, a requeue
of a skipped, invalid, dead or failed row, a re-settlement, the nightly reconcile)
asks ``decide`` at dispatch time, with what is known then:

- the settings: ``key_crowd.source`` and ``key_crowd.upload_only_key_crowd``;
- the card type: the label API can only be asked about resident ID numbers (10);
- the HIS's ``key_crowd`` column as the outbox holds it (``1``/``0``/none);
- the label lookup's result: a person with labels, one without, nobody, a failure,
  or not asked.

Three outcomes: SEND (with the ``keyCrowd`` to upload), SKIP (with how it was decided),
UNDECIDED (try again later with the record's back-off; never a default).

Who decides:
- ``source: lookup`` and a resident ID card: the label API (cache first) alone. A
  person the platform knows without any label is not key population (FAQ 15).
- otherwise (``source: column``, or a card the label API cannot be asked about): the
  HIS's ``key_crowd`` column. Without a value there is nothing to go on: skipped.

With ``upload_only_key_crowd: false`` a visit known *not* to be key population is sent
with ``keyCrowd "0"``; one whose status is unknown is still never sent (a guess could
be wrong either way), and neither is one without any ``key_crowd`` value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

from sync import localtime
from sync.records import RESIDENT_ID
from sync.upstream.person import Person


class Verdict(StrEnum):
    SEND = "send"
    SKIP = "skip"
    UNDECIDED = "undecided"


class LabelState(StrEnum):
    NOT_ASKED = "not_asked"  # no lookup made (yet): nothing is known
    KEY = "key"  # the platform returned the person with at least one label
    NO_LABELS = "no_labels"  # the platform knows the person, without any label (FAQ 15: not key population)
    NOBODY = "nobody"  # the platform answered data null: not key population
    FAILED = "failed"  # the lookup failed: nothing is known


@dataclass(frozen=True, kw_only=True)
class LabelResult:
    """What the label lookup said about one person."""

    state: LabelState
    codes: tuple[str, ...] = ()  # the label codes (KEY)
    via: str = ""  # where and when: "label API 2026-03-01 16:00+08:00", "label cache ..."
    error: str | None = None  # FAILED: why

    @classmethod
    def not_asked(cls) -> LabelResult:
        return cls(state=LabelState.NOT_ASKED)


def from_labels(person: Person | None, *, via: str, at: datetime) -> LabelResult:
    """What the label API's answer (or the label cache's copy of it), read ``at`` (UTC), says."""
    checked = f"{via} {localtime.text(at, seconds=False)}"
    if person is None:
        return LabelResult(state=LabelState.NOBODY, via=checked)
    if person.is_key_population:
        return LabelResult(state=LabelState.KEY, codes=tuple(lbl.code for lbl in person.labels), via=checked)
    return LabelResult(state=LabelState.NO_LABELS, via=checked)


@dataclass(frozen=True, kw_only=True)
class Decision:
    verdict: Verdict
    # SEND: the keyCrowd to upload ("1"; "0" only with upload_only_key_crowd off).
    # SKIP: what is known ("0") or None when nothing is. UNDECIDED: None.
    key_crowd: str | None
    how: str  # how it was decided, for last_error and the logs
    needs_lookup: bool = False  # UNDECIDED because the label API has not been asked yet


def needs_lookup(*, source: Literal["column", "lookup"], card_type: str | None) -> bool:
    """Whether the label API decides this visit."""
    return source == "lookup" and card_type == RESIDENT_ID


def decide(
    *,
    source: Literal["column", "lookup"],
    upload_only_key_crowd: bool,
    card_type: str | None,
    column: str | None,
    labels: LabelResult,
) -> Decision:
    """Whether this visit may be uploaded now, and with which ``keyCrowd``."""
    if needs_lookup(source=source, card_type=card_type):
        return _by_labels(labels, upload_only_key_crowd)
    return _by_column(source, card_type, column, upload_only_key_crowd)


def _by_labels(labels: LabelResult, upload_only: bool) -> Decision:
    state = labels.state
    if state is LabelState.KEY:
        return Decision(
            verdict=Verdict.SEND, key_crowd="1", how=f"{labels.via}: key population ({','.join(labels.codes)})"
        )
    if state in (LabelState.NO_LABELS, LabelState.NOBODY):
        how = (
            f"{labels.via}: known to the platform but without labels (FAQ 15: the county must import the labels)"
            if state is LabelState.NO_LABELS
            else f"{labels.via}: not in the key population (no labels returned)"
        )
        if upload_only:
            return Decision(verdict=Verdict.SKIP, key_crowd="0", how=how)
        return Decision(verdict=Verdict.SEND, key_crowd="0", how=how + "; sent as keyCrowd 0 (upload_only_key_crowd: false)")
    if state is LabelState.FAILED:
        return Decision(
            verdict=Verdict.UNDECIDED, key_crowd=None,
            how=f"label lookup failed, key population unknown, tried again later: {labels.error or 'no answer'}",
        )
    return Decision(verdict=Verdict.UNDECIDED, key_crowd=None, how="label lookup not made yet", needs_lookup=True)


def _by_column(source: str, card_type: str | None, column: str | None, upload_only: bool) -> Decision:
    origin = (
        "key_crowd column"
        if source == "column"
        else f"card type {card_type or '(empty)'} (not a resident ID card, the label API cannot be asked): key_crowd column"
    )
    if column == "1":
        return Decision(verdict=Verdict.SEND, key_crowd="1", how=f"{origin} = 1")
    if column == "0":
        how = f"{origin} = 0: the HIS says this patient is not in the key population"
        if upload_only:
            return Decision(verdict=Verdict.SKIP, key_crowd="0", how=how)
        return Decision(verdict=Verdict.SEND, key_crowd="0", how=how + "; sent as keyCrowd 0 (upload_only_key_crowd: false)")
    if source == "column":
        how = "key_crowd column is empty: the HIS does not say whether this patient is key population; fill it in his.query"
    else:
        how = (
            f"card type {card_type or '(empty)'} is not a resident ID card (10): the label API cannot be asked; "
            "return a key_crowd column from his.query to decide these visits"
        )
    return Decision(verdict=Verdict.SKIP, key_crowd=None, how=how)


def may_upload(*, upload_only_key_crowd: bool, key_crowd: str | None) -> bool:
    """The last check before a body leaves: the keyCrowd it carries is allowed."""
    if upload_only_key_crowd:
        return key_crowd == "1"
    return key_crowd in ("1", "0")
