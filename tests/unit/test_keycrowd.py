"""The one key-population decision: every combination of what can be known, and nothing presumed."""

from __future__ import annotations

import itertools
from typing import Literal

import pytest

from sync.keycrowd import Decision, LabelResult, LabelState, Verdict, decide, may_upload, needs_lookup

SOURCES: tuple[Literal["column", "lookup"], ...] = ("column", "lookup")
CARDS = ("10", "50", None)
COLUMNS = ("1", "0", None)
LABELS = (
    LabelResult(state=LabelState.KEY, codes=("J01.01",), via="label API"),
    LabelResult(state=LabelState.NO_LABELS, via="label API"),
    LabelResult(state=LabelState.NOBODY, via="label cache"),
    LabelResult(state=LabelState.FAILED, error="504"),
    LabelResult.not_asked(),
)


def _decide(source: Literal["column", "lookup"], only: bool, card: str | None, column: str | None,
            labels: LabelResult) -> Decision:
    return decide(source=source, upload_only_key_crowd=only, card_type=card, column=column, labels=labels)


def _known_key(source: str, card: str | None, column: str | None, labels: LabelResult) -> bool:
    """Independently: is the patient known to be key population from what the decision saw?"""
    if source == "lookup" and card == "10":
        return labels.state is LabelState.KEY
    return column == "1"


def _known_not_key(source: str, card: str | None, column: str | None, labels: LabelResult) -> bool:
    if source == "lookup" and card == "10":
        return labels.state in (LabelState.NO_LABELS, LabelState.NOBODY)
    return column == "0"


@pytest.mark.parametrize("only", [True, False])
def test_every_combination_sends_only_what_is_known(only: bool) -> None:
    for source, card, column, labels in itertools.product(SOURCES, CARDS, COLUMNS, LABELS):
        d = _decide(source, only, card, column, labels)
        case = (source, card, column, labels.state, d)
        known_key = _known_key(source, card, column, labels)
        known_not = _known_not_key(source, card, column, labels)
        if d.verdict is Verdict.SEND:
            assert may_upload(upload_only_key_crowd=only, key_crowd=d.key_crowd), case
            if only:
                # The invariant: with upload_only_key_crowd on, only known key population goes.
                assert known_key and d.key_crowd == "1", case
            else:
                assert (known_key and d.key_crowd == "1") or (known_not and d.key_crowd == "0"), case
        if known_key:
            assert (d.verdict, d.key_crowd) == (Verdict.SEND, "1"), case
        elif known_not:
            expected = Verdict.SKIP if only else Verdict.SEND
            assert (d.verdict, d.key_crowd) == (expected, "0"), case
        else:
            # Nothing known: never sent, never "1".
            assert d.verdict is not Verdict.SEND and d.key_crowd is None, case
        assert d.how, case


def test_the_label_api_alone_decides_resident_id_cards_in_lookup_mode() -> None:
    # A HIS column saying 1 does not override labels saying no, nor a failed lookup.
    nobody = LabelResult(state=LabelState.NOBODY, via="label API")
    assert _decide("lookup", True, "10", "1", nobody).verdict is Verdict.SKIP
    failed = _decide("lookup", True, "10", "1", LabelResult(state=LabelState.FAILED, error="中间请求异常"))
    assert failed.verdict is Verdict.UNDECIDED and not failed.needs_lookup and "中间请求异常" in failed.how
    unasked = _decide("lookup", True, "10", "1", LabelResult.not_asked())
    assert unasked.verdict is Verdict.UNDECIDED and unasked.needs_lookup
    assert needs_lookup(source="lookup", card_type="10")
    assert not needs_lookup(source="lookup", card_type="50")
    assert not needs_lookup(source="column", card_type="10")


def test_reasons_say_how_it_was_decided() -> None:
    key = _decide("lookup", True, "10", None, LabelResult(state=LabelState.KEY, codes=("J01.01", "H01.01"), via="v"))
    assert "J01.01,H01.01" in key.how
    assert "FAQ 15" in _decide("lookup", True, "10", None, LabelResult(state=LabelState.NO_LABELS, via="v")).how
    assert "key_crowd column = 0" in _decide("column", True, "10", "0", LabelResult.not_asked()).how
    passport = _decide("lookup", True, "50", None, LabelResult.not_asked())
    assert passport.verdict is Verdict.SKIP and "return a key_crowd column" in passport.how
    empty = _decide("column", False, "10", None, LabelResult.not_asked())
    assert empty.verdict is Verdict.SKIP and "empty" in empty.how


def test_the_last_check_before_sending() -> None:
    assert may_upload(upload_only_key_crowd=True, key_crowd="1")
    for value in ("0", None, "", "2"):
        assert not may_upload(upload_only_key_crowd=True, key_crowd=value)
    assert may_upload(upload_only_key_crowd=False, key_crowd="0")
    assert not may_upload(upload_only_key_crowd=False, key_crowd=None)
