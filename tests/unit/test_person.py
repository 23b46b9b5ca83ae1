"""The label API's answer parsed: who the person is, their labels, and whether they are key population."""

from __future__ import annotations

from sync.upstream.person import parse_person
from sync.upstream.simulator import TEST_IDS, default_people


def test_parse_person_tolerates_missing_parts_and_needs_labels_for_key_population() -> None:
    assert parse_person(None) is None
    bare = parse_person({"xm": "王五", "zjhm": "510100199001010011", "ylbx": "0", "jjxBq": None})
    assert bare is not None
    assert bare.insured is False
    assert bare.labels == ()
    assert not bare.is_key_population  # FAQ 15: imported without labels
    assert not bare.credit_constrained


def test_the_documents_test_person_has_labels_and_a_household_county() -> None:
    person = parse_person(default_people()[TEST_IDS[0]])
    assert person is not None
    assert person.is_key_population
    assert person.household_county
    assert all(label.code for label in person.labels)
