"""PyMySQL's conversions of DATETIME, TIMESTAMP and DATE text, made cheap for a back-fill.

PyMySQL turns each date and time value the server sends into a Python value with a
regular expression and ``int()`` of every part: a few microseconds a value, four values
a visit, and the largest single cost of reading a window on the client. The usual text
(``YYYY-MM-DD hh:mm:ss[.ffffff]``, ``YYYY-MM-DD``) goes through the standard library's C
parser here; anything else (zero dates, fractions of other lengths, values out of range)
goes to PyMySQL's own converter, so every value comes out exactly as PyMySQL gives it.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes | bytearray) else str(value)


def conversions() -> dict[Any, Any] | None:
    """PyMySQL's decoders with the fast date and time ones (None: PyMySQL is not installed)."""
    try:
        from pymysql import converters
        from pymysql.constants import FIELD_TYPE
    except ImportError:
        return None
    slow_datetime, slow_date = converters.convert_datetime, converters.convert_date

    def fast_datetime(value: Any) -> Any:
        text = _text(value)
        # Only the exact forms PyMySQL reads the same way: 19 characters, or 26 with microseconds.
        if (len(text) == 19 or (len(text) == 26 and text[19] == ".")) and text[10] in " T" and text[4] == "-" == text[7]:
            try:
                return datetime.fromisoformat(text)
            except ValueError:
                pass
        return slow_datetime(value)

    def fast_date(value: Any) -> Any:
        text = _text(value)
        if len(text) == 10 and text[4] == "-" == text[7]:
            try:
                return date.fromisoformat(text)
            except ValueError:
                pass
        return slow_date(value)

    table = dict(converters.conversions)
    table[FIELD_TYPE.DATETIME] = fast_datetime
    table[FIELD_TYPE.TIMESTAMP] = fast_datetime
    table[FIELD_TYPE.DATE] = fast_date
    return table
