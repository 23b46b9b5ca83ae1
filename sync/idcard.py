"""Pure: resident ID numbers (GB 11643-1999), one place for every user.

An 18-character number is a 6-digit county code, the birth date ``yyyymmdd``, a
3-digit sequence and a check digit (``0``-``9`` or ``X``) over the first 17. A
first-generation card has 15 digits (``yymmdd``, 19xx) and no check digit; the
platform takes it as it is.
"""

from __future__ import annotations

import operator
import re
from datetime import date

# The check digit: sum of digit x weight over the first 17, mod 11, indexes CHECKS.
WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CHECKS = "10X98765432"
_ZERO = ord("0") * sum(WEIGHTS)
_ID18_RE = re.compile(r"\d{17}[\dX]")
_ID15_RE = re.compile(r"\d{15}")


def check_digit(body: str) -> str:
    """The check digit of the first 17 digits of a number."""
    if body.isascii():
        # The digits' bytes minus ord("0") each: no int() per character (every row of a back-fill).
        total = sum(map(operator.mul, body.encode(), WEIGHTS)) - _ZERO
    else:
        total = sum(map(operator.mul, map(int, body), WEIGHTS))  # \d also matches other scripts' digits
    return CHECKS[total % 11]


def check(text: str) -> str:
    """A resident ID number, upper-cased X; ValueError unless 18 characters with the right
    check digit or 15 digits (first-generation card, sent as is)."""
    number = text.strip().upper()
    if _ID15_RE.fullmatch(number):
        return number
    if not _ID18_RE.fullmatch(number):
        raise ValueError(
            "not a resident ID number: 18 characters (17 digits and a digit or X) or 15 digits "
            "(身份证号码应为18位或15位)"
        )
    expected = check_digit(number[:17])
    if number[17] != expected:
        # The platform matches labels by the exact number: a mistyped one never matches.
        raise ValueError(f"wrong check digit, expected {expected} (身份证校验码错误): the number is mistyped in the HIS")
    return number


def looks_resident(text: str) -> bool:
    """Whether ``text`` has the shape of a resident ID number (18 or 15 characters), right or not."""
    number = text.strip().upper()
    return bool(_ID18_RE.fullmatch(number) or _ID15_RE.fullmatch(number))


def make(county: str, born: date, sequence: int) -> str:
    """A valid 18-character number: ``county`` (6 digits), ``born``, ``sequence`` (0 to 999)."""
    body = f"{county}{born:%Y%m%d}{sequence:03d}"
    return body + check_digit(body)


def birth_date(number: str) -> date | None:
    """The birth date a number holds; None when it holds none that the calendar knows."""
    number = number.strip()
    if len(number) == 18:
        digits = number[6:14]
    elif len(number) == 15:
        digits = "19" + number[6:12]
    else:
        return None
    if not (digits.isascii() and digits.isdigit()):
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None
