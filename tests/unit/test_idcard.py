"""Resident ID numbers (GB 11643-1999): the check digit, the birth date, and valid numbers made for tests."""

from __future__ import annotations

import random
from datetime import date

import pytest

from sync import idcard


def _reference_check_digit(body: str) -> str:
    """The standard's own formula, independent of the module's tables: weight 2^(17-i) mod 11."""
    total = sum(int(c) * pow(2, 17 - i, 11) for i, c in enumerate(body))
    return "10X98765432"[total % 11]


def test_the_check_digit_is_the_standards_by_bytes_and_by_int() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        body = "".join(rng.choice("0123456789") for _ in range(17))
        good = body + _reference_check_digit(body)
        assert idcard.check(good.lower()) == good
        wrong = body + "10X98765432"[("10X98765432".index(good[-1]) + 1) % 11]
        with pytest.raises(ValueError, match="wrong check digit"):
            idcard.check(wrong)
    # Digits of other scripts (\d matches them) are judged by their value.
    arabic = "".join(chr(0x660 + int(c)) for c in "51010019850602003") + "6"  # 510100198506020036
    assert idcard.check(arabic) == arabic


def test_the_documents_test_numbers_are_valid() -> None:
    for number in ("510100198506020036", "510100198506020132", "510100198506020028", "110104198506020037"):
        assert idcard.check(number) == number


@pytest.mark.parametrize(
    ("text", "rule"),
    [("51010019850602003", "18 characters"), ("5101001985060200361", "18 characters"), ("51010019850602003A", "18")],
)
def test_malformed_numbers_say_what_is_expected(text: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        idcard.check(text)


def test_first_generation_numbers_pass_as_they_are() -> None:
    assert idcard.check(" 510100850602003 ") == "510100850602003"
    assert idcard.birth_date("510100850602003") == date(1985, 6, 2)


def test_made_numbers_are_valid_and_hold_their_birth_date() -> None:
    number = idcard.make("511425", date(1972, 2, 29), 7)
    assert number.startswith("51142519720229007")
    assert idcard.check(number) == number
    assert idcard.birth_date(number) == date(1972, 2, 29)


def test_no_birth_date_where_the_number_holds_none() -> None:
    assert idcard.birth_date("51010019851302003X") is None  # month 13
    assert idcard.birth_date("E1234567") is None
