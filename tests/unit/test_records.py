"""The record rules: a HIS row becomes exactly the payload the document describes (3.2.1),
or a parked record whose message says every rule it breaks."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pytest

from sync.errors import InvalidRecord
from sync.records import (
    FIELDS,
    build,
    decode_key_crowd,
    payload_hash,
    payload_json,
)

TODAY = date(2024, 6, 1)
# A test ID number of the document (valid check digit) and the same with the last digit wrong.
ID = "510100198506020036"
BAD_CHECK_ID = "510100198506020037"


def row(**overrides: Any) -> dict[str, Any]:
    """A settled inpatient visit of a key-population patient, as the HIS query returns it."""
    base: dict[str, Any] = {
        "lsh": "ZY2024000123",
        "code": "Z000123",
        "card_type": "10",
        "card_no": ID,
        "visit_type": "1",
        "enter_date": date(2024, 1, 5),
        "leave_date": date(2024, 1, 9),
        "key_crowd": "1",
        "icd_name": "社区获得性肺炎",
        "icd_code": "J18.900",
        "total_fee": Decimal("3324.00"),
        "ins_fee": Decimal("2654.00"),
        "total_prepayment": Decimal("0.00"),
        "deficient_fee": Decimal("670.00"),
        "settlement_date": date(2024, 1, 9),
        "changed_at": datetime(2024, 1, 9, 16, 30),
    }
    base.update(overrides)
    return base


def problems(bad_row: dict[str, Any], **kwargs: Any) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as info:
        build(bad_row, today=TODAY, **kwargs)
    return info.value


# --------------------------------------------------------------------------- a good record


def test_a_good_row_becomes_the_documents_payload() -> None:
    payload = build(row(), today=TODAY)
    assert payload == {
        "cardType": "10",
        "cardNo": ID,
        "type": "1",
        "lsh": "ZY2024000123",
        "code": "Z000123",
        "enterDate": "2024-01-05",
        "leaveDate": "2024-01-09",
        "keyCrowd": "1",
        "icdName": "社区获得性肺炎",
        "icdCode": "J18.900",
        "totalFee": Decimal("3324.00"),
        "insFee": Decimal("2654.00"),
        "totalPrepayment": Decimal("0.00"),
        "deficientFee": Decimal("670.00"),
        "settlementDate": "2024-01-09",
    }


def test_document_example_serialises_as_printed() -> None:
    # The request example of document 3.2.1, field for field.
    example = {
        "cardType": "10", "cardNo": "123", "type": "1", "lsh": "1234", "code": "123",
        "enterDate": "2022-01-01", "leaveDate": "2022-01-02", "keyCrowd": "1", "icdName": "5", "icdCode": "4",
        "totalFee": Decimal("33.24"), "insFee": Decimal("6.54"), "totalPrepayment": Decimal("4.35"),
        "deficientFee": Decimal("6.51"), "settlementDate": "2022-01-02",
    }
    assert payload_json(example) == (
        '{"cardType":"10","cardNo":"123","type":"1","lsh":"1234","code":"123","enterDate":"2022-01-01",'
        '"leaveDate":"2022-01-02","keyCrowd":"1","icdName":"5","icdCode":"4","totalFee":33.24,"insFee":6.54,'
        '"totalPrepayment":4.35,"deficientFee":6.51,"settlementDate":"2022-01-02"}'
    )


# --------------------------------------------------------------------------- mapping rules


@pytest.mark.parametrize(
    "value",
    [
        date(2024, 1, 5),
        datetime(2024, 1, 5, 10, 0),
        "2024-01-05",
        "20240105",
        20240105,
        "2024-01-05 10:00:00",
        "2024-01-05 10:00:00.000",
        "2024/01/05",
        "2024-01-05T10:00:00",
        "2024.01.05",
        "2024-1-5",
        " 2024-01-05 ",
    ],
)
def test_dates_in_every_form_become_yyyy_mm_dd(value: Any) -> None:
    payload = build(row(enter_date=value), today=TODAY)
    assert payload["enterDate"] == "2024-01-05"


@pytest.mark.parametrize("value", ["05/01/2024", "2024-13-01", "2024-02-30", "yesterday", "2024-01-05 25:00", "2024-01/05", 1.5])
def test_unreadable_dates_are_violations_naming_the_value(value: Any) -> None:
    error = problems(row(enter_date=value))
    assert len(error.violations) == 1
    assert error.violations[0].startswith("enterDate (enter_date) = ")
    assert str(value) in error.violations[0]


@pytest.mark.parametrize("column", ["enter_date", "leave_date", "settlement_date"])
def test_a_date_in_the_future_is_a_violation(column: str) -> None:
    error = problems(row(**{column: "2024-06-02"}))
    assert any("in the future" in v and "HIS clock" in v for v in error.violations)
    assert build(row(leave_date=TODAY, settlement_date=TODAY), today=TODAY)["settlementDate"] == "2024-06-01"


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        (Decimal("12.5"), "12.50"),
        (12, "12.00"),
        ("12.5", "12.50"),
        (" 12.5 ", "12.50"),
        (12.5, "12.50"),
        (0.1 + 0.2, "0.30"),
        (Decimal("1.005"), "1.01"),
        (1.005, "1.01"),
        ("1.005", "1.01"),
        (Decimal("2.675"), "2.68"),
        (Decimal("-0.001"), "0.00"),
        (0, "0.00"),
        (Decimal("999999.99"), "999999.99"),
        (Decimal("999999.994"), "999999.99"),
        (Decimal("100.5"), "100.50"),
    ],
)
def test_money_is_rounded_half_up_to_cents_and_sent_as_a_number(value: Any, sent: str) -> None:
    payload = build(row(total_fee=value, deficient_fee=0), today=TODAY)
    assert payload["totalFee"] == Decimal(sent)
    assert f'"totalFee":{sent},' in payload_json(payload)


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (Decimal("-1"), "must not be negative (不能为负数)"),
        (-0.01, "must not be negative"),
        (Decimal("1000000"), "more than 999999.99"),
        (Decimal("999999.995"), "more than 999999.99"),
        (Decimal("1E+30"), "more than 999999.99"),
        ("1,234.50", "thousands separators are not accepted"),
        ("12.5元", "not a number"),
        ("abc", "not a number"),
        (float("nan"), "not a finite number"),
        (float("inf"), "not a finite number"),
        (Decimal("NaN"), "not a finite number"),
        ("Infinity", "not a number"),
        (True, "expected an amount"),
        (None, "required (必填)"),
        ("  ", "required (必填)"),
    ],
)
def test_bad_money_is_a_violation(value: Any, rule: str) -> None:
    error = problems(row(ins_fee=value))
    assert len(error.violations) == 1
    assert error.violations[0].startswith("insFee (ins_fee) = ")
    assert rule in error.violations[0]


def test_money_violation_reads_as_documented() -> None:
    error = problems(row(total_fee=-1, deficient_fee=0))
    assert error.violations == ["totalFee (total_fee) = -1.00: must not be negative (不能为负数)"]


@pytest.mark.parametrize("column", ["total_fee", "ins_fee", "total_prepayment", "deficient_fee"])
def test_every_amount_is_required_and_not_negative(column: str) -> None:
    assert any("required" in v for v in problems(row(**{column: None})).violations)
    assert any("不能为负数" in v for v in problems(row(**{column: "-5"})).violations)


def test_total_fee_below_deficient_fee_is_a_violation() -> None:
    error = problems(row(total_fee="100.00", deficient_fee="100.01"))
    assert error.violations == [
        "totalFee (total_fee) = 100.00: less than deficientFee 100.01 (不能小于欠费金额)"
    ]
    assert build(row(total_fee="100.00", deficient_fee="100.00"), today=TODAY)["deficientFee"] == Decimal("100.00")


@pytest.mark.parametrize(
    ("value", "sent"),
    [("10", "10"), (10, "10"), (Decimal("10"), "10"), (" 30 ", "30"), ("43", "43"), (44, "44"), ("50", "50"), (60, "60")],
)
def test_card_types_of_the_dictionary_are_accepted(value: Any, sent: str) -> None:
    card_no = ID if sent == "10" else "E12345678"
    assert build(row(card_type=value, card_no=card_no), today=TODAY)["cardType"] == sent


@pytest.mark.parametrize("value", ["11", "1", 99, "身份证", "10A"])
def test_card_type_outside_the_dictionary_is_a_violation(value: Any) -> None:
    (violation,) = problems(row(card_type=value)).violations
    assert violation.startswith("cardType (card_type) = ")
    assert "10 身份证" in violation


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        (ID, ID),
        (f"  {ID} ", ID),
        ("11010519491231002x", "11010519491231002X"),
        ("11010519491231002X", "11010519491231002X"),
        ("510100850602003", "510100850602003"),  # first-generation card, 15 digits: sent as is
    ],
)
def test_resident_id_numbers_are_normalised(value: str, sent: str) -> None:
    assert build(row(card_no=value), today=TODAY)["cardNo"] == sent


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("51010019850602003", "not a resident ID number"),
        ("5101001985060200366", "not a resident ID number"),
        ("51010019850602003A", "not a resident ID number"),
        ("510100 198506020036", "not a resident ID number"),
        (BAD_CHECK_ID, "wrong check digit, expected 6"),
    ],
)
def test_bad_resident_id_numbers_are_violations(value: str, rule: str) -> None:
    (violation,) = problems(row(card_no=value)).violations
    assert violation.startswith("cardNo (card_no) = ")
    assert rule in violation


def test_other_card_types_are_not_held_to_the_resident_id_format() -> None:
    assert build(row(card_type="50", card_no="E1234567"), today=TODAY)["cardNo"] == "E1234567"


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        (1, "1"), (2, "2"), ("1", "1"), ("2", "2"), (Decimal("2"), "2"),
        ("住院", "1"), ("门诊", "2"), ("Inpatient", "1"), ("OUTPATIENT", "2"), ("I", "1"), ("o", "2"),
    ],
)
def test_visit_types_are_decoded(value: Any, sent: str) -> None:
    assert build(row(visit_type=value), today=TODAY)["type"] == sent


@pytest.mark.parametrize("value", [3, "0", "急诊", "inpatients", None])
def test_unknown_visit_type_is_a_violation(value: Any) -> None:
    error = problems(row(visit_type=value))
    assert any(v.startswith("type (visit_type) = ") for v in error.violations)


def test_inpatients_need_a_leave_date() -> None:
    error = problems(row(visit_type="住院", leave_date=None))
    assert error.violations == ["leaveDate (leave_date) = NULL: required for inpatients (住院：是)"]


def test_outpatients_without_leave_date_omit_it() -> None:
    payload = build(row(visit_type="2", leave_date=None), today=TODAY)
    assert "leaveDate" not in payload
    assert '"leaveDate"' not in payload_json(payload)
    assert build(row(visit_type="2"), today=TODAY)["leaveDate"] == "2024-01-09"


def test_leave_date_before_enter_date_is_a_violation() -> None:
    error = problems(row(enter_date="2024-01-05", leave_date="2024-01-04"))
    assert error.violations == [
        "leaveDate (leave_date) = 2024-01-04: before enterDate 2024-01-05 (如果有值，不能小于诊疗时间)"
    ]


def test_settlement_date_before_enter_date_is_a_violation() -> None:
    error = problems(row(enter_date="2024-01-05", leave_date="2024-01-05", settlement_date="2024-01-04 23:59:59"))
    assert error.violations == [
        "settlementDate (settlement_date) = 2024-01-04: before enterDate 2024-01-05 (不能小于诊疗时间)"
    ]


def test_same_day_discharge_and_settlement_are_fine() -> None:
    payload = build(row(enter_date="2024-01-05 08:00", leave_date="2024-01-05 07:00:00", settlement_date=date(2024, 1, 5)), today=TODAY)
    assert (payload["enterDate"], payload["leaveDate"], payload["settlementDate"]) == ("2024-01-05",) * 3


@pytest.mark.parametrize(("column", "field"), [("lsh", "lsh"), ("code", "code"), ("card_no", "cardNo"), ("enter_date", "enterDate"), ("settlement_date", "settlementDate"), ("card_type", "cardType")])
@pytest.mark.parametrize("empty", [None, "", "   "])
def test_required_fields_missing_or_blank_are_violations(column: str, field: str, empty: Any) -> None:
    error = problems(row(**{column: empty}))
    assert any(v.startswith(f"{field} ({column}) = ") and "required (必填)" in v for v in error.violations)


@pytest.mark.parametrize(
    ("column", "field", "limit"),
    [("lsh", "lsh", 50), ("code", "code", 50), ("icd_name", "icdName", 200), ("icd_code", "icdCode", 100)],
)
def test_lengths_are_counted_in_characters(column: str, field: str, limit: int) -> None:
    assert build(row(**{column: "字" * limit}), today=TODAY)[field] == "字" * limit  # type: ignore[literal-required]
    (violation,) = problems(row(**{column: "字" * (limit + 1)})).violations
    assert violation.startswith(f"{field} ({column}) = ")
    assert f"longer than {limit} characters (长度{limit})" in violation
    assert violation.endswith(f": has {limit + 1}")


def test_card_no_longer_than_40_is_a_violation() -> None:
    (violation,) = problems(row(card_type="60", card_no="A" * 41)).violations
    assert "longer than 40 characters" in violation


def test_long_values_are_cut_to_60_characters_in_messages() -> None:
    (violation,) = problems(row(code="x" * 500)).violations
    assert "x" * 60 + "…" in violation
    assert "x" * 61 not in violation


def test_strings_are_trimmed_and_empty_optionals_omitted() -> None:
    payload = build(row(lsh="  ZY1  ", code=" Z1\u3000", icd_name="   ", icd_code=None), today=TODAY)
    assert (payload["lsh"], payload["code"]) == ("ZY1", "Z1")
    assert "icdName" not in payload
    assert "icdCode" not in payload
    assert '"icd' not in payload_json(payload)


def test_numeric_serials_from_number_columns_are_text() -> None:
    payload = build(row(lsh=2024000123, code=Decimal("123")), today=TODAY)
    assert (payload["lsh"], payload["code"]) == ("2024000123", "123")


def test_a_float_serial_is_refused_since_its_digits_may_be_lost() -> None:
    (violation,) = problems(row(lsh=1.5e17)).violations
    assert "cast the column to text" in violation


# --------------------------------------------------------------------------- keyCrowd


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("1", "1"), ("0", "0"), (1, "1"), (0, "0"), (True, "1"), (False, "0"), ("是", "1"), ("否", "0"),
        ("Y", "1"), ("n", "0"), ("true", "1"), ("FALSE", "0"), (Decimal("1"), "1"), (b"\x01", "1"), (b"\x00", "0"),
        (" 1 ", "1"), (None, None), ("", None), ("maybe", None), (2, None), (1.5, None),
    ],
)
def test_decode_key_crowd(value: Any, decoded: str | None) -> None:
    assert decode_key_crowd(value) == decoded


def test_key_crowd_from_the_column() -> None:
    assert build(row(key_crowd="否"), today=TODAY)["keyCrowd"] == "0"
    assert problems(row(key_crowd="maybe")).violations == ['keyCrowd (key_crowd) = "maybe": not 1 or 0 (字典：1是 0否)']
    assert problems(row(key_crowd=None)).violations == ["keyCrowd (key_crowd) = NULL: required (必填)"]


def test_key_crowd_decided_by_the_caller_wins_and_needs_no_column() -> None:
    without = {k: v for k, v in row().items() if k != "key_crowd"}
    assert build(without, key_crowd="0", today=TODAY)["keyCrowd"] == "0"
    assert build(row(key_crowd="0"), key_crowd="1", today=TODAY)["keyCrowd"] == "1"
    with pytest.raises(ValueError, match="key_crowd"):
        build(row(), key_crowd="yes please", today=TODAY)


# --------------------------------------------------------------------------- the error as a whole


def test_every_violation_is_collected_in_one_message() -> None:
    bad = row(
        card_no=BAD_CHECK_ID, visit_type="x", enter_date="someday", key_crowd="?", icd_code="c" * 101,
        total_fee="-3", ins_fee="abc", settlement_date="2099-01-01",
    )
    error = problems(bad)
    fields = [v.split(" ", 1)[0] for v in error.violations]
    assert fields == ["cardNo", "type", "enterDate", "keyCrowd", "icdCode", "totalFee", "insFee", "settlementDate"]
    assert error.lsh == "ZY2024000123"
    assert error.message == "record lsh=ZY2024000123: 8 problems: " + "; ".join(error.violations)
    assert "crowd-sync retry --lsh ZY2024000123" in error.hint
    assert "correct the HIS data or his.query" in error.hint


def test_one_problem_reads_in_the_singular() -> None:
    assert problems(row(code=None)).message.startswith("record lsh=ZY2024000123: 1 problem: code (code) = NULL")


def test_a_missing_lsh_is_named_in_the_message() -> None:
    error = problems(row(lsh=None))
    assert error.lsh is None
    assert error.message.startswith("record lsh=<missing>: 1 problem: lsh (lsh) = NULL: required")


def test_id_numbers_are_masked_in_messages() -> None:
    error = problems(row(card_no=BAD_CHECK_ID))
    text = f"{error} {error.violations} {error.hint}"
    assert BAD_CHECK_ID not in text
    assert "510100********0037" in text
    # Also when the number is fine but something else is wrong, and for other card types.
    assert ID not in str(problems(row(total_fee=-1)))
    passport = problems(row(card_type="50", card_no="P" + "9" * 40))
    assert "P" + "9" * 40 not in str(passport)


# --------------------------------------------------------------------------- JSON and hash


def test_payload_json_is_compact_ordered_and_keeps_chinese() -> None:
    payload = build(row(), today=TODAY)
    text = payload_json(payload)
    assert " " not in text.replace("社区获得性肺炎", "")
    assert "社区获得性肺炎" in text
    assert list(json.loads(text)) == [f for f in FIELDS]
    assert json.loads(text, parse_float=Decimal)["totalFee"] == Decimal("3324.00")
    assert '"totalPrepayment":0.00,' in text
    # The order comes from the document, not from how the mapping was built.
    assert payload_json(dict(reversed(list(payload.items())))) == text


def test_payload_json_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="extra"):
        payload_json({**build(row(), today=TODAY), "extra": "1"})


def test_hash_is_the_same_whatever_types_the_database_returned() -> None:
    from_date_columns = row()
    from_datetime_columns = row(
        enter_date=datetime(2024, 1, 5, 9, 12, 1), leave_date=datetime(2024, 1, 9, 10), settlement_date=datetime(2024, 1, 9, 16, 30),
    )
    from_strings = row(
        card_type=10, visit_type="住院", enter_date="2024-01-05 09:12:01", leave_date="20240109", settlement_date="2024/01/09",
        total_fee=3324, ins_fee="2654", total_prepayment=0.0, deficient_fee=670.0, key_crowd="是",
    )
    hashes = {payload_hash(build(r, today=TODAY)) for r in (from_date_columns, from_datetime_columns, from_strings)}
    assert len(hashes) == 1
    assert len(hashes.pop()) == 64


def test_hash_changes_when_the_visit_changes() -> None:
    assert payload_hash(build(row(), today=TODAY)) != payload_hash(build(row(deficient_fee=0), today=TODAY))
