"""The HIS read's date and time conversions give exactly what PyMySQL's own give, for
every text a server may send (zero dates and impossible days come back as text)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from pymysql import converters
from pymysql.constants import FIELD_TYPE

from sync import hisconv

TABLE = hisconv.conversions()
assert TABLE is not None

DATETIMES = [
    "2024-01-01 00:00:00", "2024-01-01 00:00:00.123456", "2024-01-01T01:02:03", "0000-00-00 00:00:00",
    "2024-02-31 00:00:00", "2024-01-01 00:00:00.123", "2024-01-01", "10000-01-01 00:00:00", "2024-1-1 00:00:00",
    "2024-01-01 24:00:00", "2024-01-01 23:59:60", "2024-01-01 00:00:00.1234567", "2024-01-01 00:00:00+08:00",
    b"2024-01-01 10:11:12", b"2024-12-31 23:59:59.999999", "", "garbage", "2024-01-0100:00:00",
]
DATES = ["2024-01-01", "0000-00-00", "2024-02-30", "2024-1-01", b"2023-12-31", "20240101", "", "2024-01-01 00:00:00"]


def outcome(convert: Callable[[Any], Any], text: str | bytes) -> tuple[str, Any]:
    """What a conversion gives: its value and type, or the exception it raises."""
    try:
        value = convert(text)
    except Exception as exc:  # PyMySQL's own raise for some texts: so must ours
        return "raises", type(exc)
    return type(value).__name__, value


def same(fast: Callable[[Any], Any], slow: Callable[[Any], Any], text: str | bytes) -> bool:
    return outcome(fast, text) == outcome(slow, text)


@pytest.mark.parametrize("text", DATETIMES)
def test_datetime_and_timestamp_text_read_as_pymysql_reads_it(text: str | bytes) -> None:
    for kind in (FIELD_TYPE.DATETIME, FIELD_TYPE.TIMESTAMP):
        assert same(TABLE[kind], converters.convert_datetime, text)


@pytest.mark.parametrize("text", DATES)
def test_date_text_read_as_pymysql_reads_it(text: str | bytes) -> None:
    assert same(TABLE[FIELD_TYPE.DATE], converters.convert_date, text)


def test_random_date_and_time_texts_read_as_pymysql_reads_them() -> None:
    rng = random.Random(20261208)
    for _ in range(5000):
        y, mo, d = rng.randrange(0, 10000), rng.randrange(0, 14), rng.randrange(0, 33)
        h, mi, s, us = rng.randrange(0, 25), rng.randrange(0, 61), rng.randrange(0, 61), rng.randrange(0, 10**6)
        day = f"{y:04d}-{mo:02d}-{d:02d}"
        for text in (day, f"{day} {h:02d}:{mi:02d}:{s:02d}", f"{day} {h:02d}:{mi:02d}:{s:02d}.{us:06d}"):
            assert same(TABLE[FIELD_TYPE.DATETIME], converters.convert_datetime, text), text
            assert same(TABLE[FIELD_TYPE.DATE], converters.convert_date, text), text
