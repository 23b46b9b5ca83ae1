"""One HIS row -> what the outbox holds for it: the payload or the raw row kept exactly, the key,
what the DBA sees beside it, and the visits the HIS's key_crowd column alone parks as skipped."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time
from decimal import Decimal

from sync.intake import incoming, parse_raw_json, raw_json, rebuild
from sync.outbox.model import Status
from sync.records import build, payload_json
from sync.settings import KeyCrowd
from tests.unit.test_records import ID, TODAY, row

LOOKUP = KeyCrowd(source="lookup")
COLUMN = KeyCrowd(source="column")


def test_a_good_row_is_pending_with_its_payload_and_what_the_dba_sees() -> None:
    item = incoming(row(), key_crowd=COLUMN, today=TODAY)
    assert item.status is Status.PENDING and item.reason is None
    assert item.lsh == "ZY2024000123"
    assert item.payload_json == payload_json(build(row(), today=TODAY))
    assert (item.card_type, item.card_no, item.visit_type, item.key_crowd) == ("10", ID, "1", "1")
    assert item.settlement_date == date(2024, 1, 9)
    assert item.source_changed_at == datetime(2024, 1, 9, 16, 30)


def test_in_lookup_mode_a_resident_card_waits_for_the_label_api_whatever_the_column_says() -> None:
    item = incoming(row(key_crowd="0"), key_crowd=LOOKUP, today=TODAY)
    assert item.status is Status.PENDING
    assert item.key_crowd is None  # nothing known yet: dispatch asks the label API
    # Its stored payload holds keyCrowd 1 as in earlier versions: hashes of visits already sent stay.
    assert json.loads(item.payload_json)["keyCrowd"] == "1"


def test_the_column_alone_parks_what_must_not_go_at_once() -> None:
    item = incoming(row(key_crowd="0"), key_crowd=COLUMN, today=TODAY)
    assert item.status is Status.SKIPPED and item.key_crowd == "0"
    assert item.reason is not None and "key_crowd column = 0" in item.reason
    passport = incoming(row(card_type="50", card_no="E1234567", key_crowd=None), key_crowd=LOOKUP, today=TODAY)
    assert passport.status is Status.SKIPPED and "label API cannot be asked" in str(passport.reason)


def test_an_invalid_row_keeps_its_raw_values_and_the_reason() -> None:
    item = incoming(row(total_fee=-1, visit_type="住院", card_no=ID.lower()[:-1] + "x"), key_crowd=COLUMN, today=TODAY)
    assert item.status is Status.INVALID
    assert item.reason is not None and "totalFee (total_fee)" in item.reason
    back = parse_raw_json(item.payload_json)
    assert back is not None and back[0]["total_fee"] == -1
    assert (item.card_type, item.visit_type) == ("10", "1")  # as the payload would carry them
    assert item.card_no is not None and item.card_no.endswith("X")


def test_rows_without_a_usable_lsh_get_a_key_of_their_own() -> None:
    missing = incoming(row(lsh=None), key_crowd=COLUMN, today=TODAY)
    assert missing.lsh.startswith("(missing lsh) ") and missing.status is Status.INVALID
    long = incoming(row(lsh="Z" * 300), key_crowd=COLUMN, today=TODAY)
    assert len(long.lsh) < 255 and long.lsh.startswith("Z" * 200)


def test_rebuild_leaves_built_payloads_alone_and_validates_a_parked_raw_row_again() -> None:
    built = incoming(row(), key_crowd=COLUMN, today=TODAY)
    assert rebuild(built.lsh, built.payload_json, key_crowd=COLUMN, today=TODAY) is None
    fixed = rebuild("ZY2024000123", raw_json(row()), key_crowd=COLUMN, today=TODAY)
    assert fixed is not None and fixed.status is Status.PENDING and fixed.payload_hash == built.payload_hash
    still_bad = rebuild("ZY2024000123", raw_json(row(total_fee=-1)), key_crowd=COLUMN, today=TODAY)
    assert still_bad is not None and still_bad.status is Status.INVALID


def test_rebuild_refuses_what_the_outbox_could_not_keep_exactly() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd"

    lost = rebuild("ZY1", raw_json(row(icd_name=Odd())), key_crowd=COLUMN, today=TODAY)
    assert lost is not None and lost.status is Status.INVALID and "icd_name (unsupported Odd)" in str(lost.reason)
    old = rebuild("ZY1", '{"lsh":"ZY1","total_fee":"12.30"}', key_crowd=COLUMN, today=TODAY)
    assert old is not None and old.status is Status.INVALID and "earlier version" in str(old.reason)


def test_raw_json_keeps_an_unbuildable_row_readable() -> None:
    text = raw_json(row(total_fee=Decimal("12.30"), ins_fee=float("nan"), icd_code=b"\x01\xff", changed_at=datetime(2024, 1, 9, 16, 30)))
    data = json.loads(text)
    assert data["total_fee"] == "12.30"
    assert data["ins_fee"] == "nan"
    assert data["icd_code"] == "01ff"
    assert data["changed_at"] == "2024-01-09T16:30:00"
    assert data["enter_date"] == "2024-01-05"
    assert data["icd_name"] == "社区获得性肺炎"


def test_raw_json_gives_back_exactly_what_the_his_returned() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd"

    original = row(
        card_no=b"\x51\x01\x00\x19\x85\x06\x02\x00\x36",  # its hex is a valid ID number: it must stay bytes
        code=510100198506020036.0,  # a DOUBLE column: the float as it came, digits already lost
        total_fee=Decimal("12.30"), ins_fee=1.005, deficient_fee=float("inf"), key_crowd=True,
        enter_date=datetime(2024, 1, 5, 8, 30, 15, 123456, tzinfo=UTC), leave_date=date(2024, 1, 9),
        visit_type=1, icd_name=None, icd_code=time(8, 30), lsh="ZY1",
    )
    back, lost = parse_raw_json(raw_json(original))  # type: ignore[misc]
    assert lost == {}
    assert back == original
    assert [type(back[k]) for k in original] == [type(v) for v in original.values()]
    # A value of a type it cannot keep is named, and the rest still comes back.
    back, lost = parse_raw_json(raw_json(row(icd_name=Odd())))  # type: ignore[misc]
    assert lost == {"icd_name": "unsupported Odd"} and back["total_fee"] == Decimal("3324.00")
    # Rows parked by earlier versions (no type map) and payloads are not raw rows of this form.
    assert parse_raw_json('{"lsh":"ZY1","total_fee":"12.30","card_no":"5101"}') is None
    assert parse_raw_json(payload_json(build(row(), today=TODAY))) is None
