"""Pure: a canonical HIS row -> a validated upload payload, by the document's rules.

Every rule of the province's table (document 3.2.1) is checked here, before
anything is sent: a record the platform would reject with 参数校验错误 is parked
locally with the exact reason instead of burning an upload. All problems of a
record are collected into one ``InvalidRecord``, so the operator fixes them in
one pass instead of discovering them one retry at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime, time
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, NotRequired, TypedDict, cast

from sync import idcard
from sync.columns import Unreadable, normalize_row
from sync.errors import InvalidRecord
from sync.logs import mask_id

# The payload's fields in the document's order, each with the HIS column it comes from.
# The canonical JSON follows this order so that one visit always hashes the same.
FIELD_COLUMNS: dict[str, str] = {
    "cardType": "card_type",
    "cardNo": "card_no",
    "type": "visit_type",
    "lsh": "lsh",
    "code": "code",
    "enterDate": "enter_date",
    "leaveDate": "leave_date",
    "keyCrowd": "key_crowd",
    "icdName": "icd_name",
    "icdCode": "icd_code",
    "totalFee": "total_fee",
    "insFee": "ins_fee",
    "totalPrepayment": "total_prepayment",
    "deficientFee": "deficient_fee",
    "settlementDate": "settlement_date",
}
FIELDS: tuple[str, ...] = tuple(FIELD_COLUMNS)
_COLUMN_FIELDS: dict[str, str] = {column: field for field, column in FIELD_COLUMNS.items()}
MONEY_FIELDS: tuple[str, ...] = ("totalFee", "insFee", "totalPrepayment", "deficientFee")
DATE_FIELDS: tuple[str, ...] = ("enterDate", "leaveDate", "settlementDate")
OPTIONAL_FIELDS: frozenset[str] = frozenset({"leaveDate", "icdName", "icdCode"})

# Lengths of the string fields (document column 长度), counted in characters.
MAX_LENGTH: dict[str, int] = {
    "cardType": 2,
    "cardNo": 40,
    "type": 1,
    "lsh": 50,
    "code": 50,
    "keyCrowd": 1,
    "icdName": 200,
    "icdCode": 100,
}

# Document dictionary for cardType.
CARD_TYPES: dict[str, str] = {
    "10": "身份证",
    "30": "军官证",
    "43": "台湾居民来往大陆通行证",
    "44": "港澳同胞回乡证",
    "50": "护照",
    "60": "其他",
}
RESIDENT_ID = "10"
INPATIENT = "1"
OUTPATIENT = "2"

# N(8,2): 8 digits, 2 of them after the point.
MAX_MONEY = Decimal("999999.99")
_CENT = Decimal("0.01")
_ZERO_CENTS = Decimal("0.00")  # Decimals are immutable: one shared zero
_VALUE_WIDTH = 60

_VISIT_TYPES: dict[str, str] = {
    "1": INPATIENT,
    "2": OUTPATIENT,
    "住院": INPATIENT,
    "门诊": OUTPATIENT,
    "inpatient": INPATIENT,
    "outpatient": OUTPATIENT,
    "i": INPATIENT,
    "o": OUTPATIENT,
}
_KEY_CROWD: dict[str, str] = {
    "1": "1",
    "0": "0",
    "是": "1",
    "否": "0",
    "y": "1",
    "n": "0",
    "yes": "1",
    "no": "0",
    "t": "1",
    "f": "0",
    "true": "1",
    "false": "0",
}

# Date strings the HIS databases we meet return: 2024-01-05, 2024/01/05, 2024.01.05,
# 2024-1-5, each optionally followed by a time (" 10:00:00", "T10:00:00", fractions);
# and the compact 20240105 of VARCHAR(8)/NUMBER(8) columns.
_DATE_RE = re.compile(
    r"(\d{4})([-/.])(\d{1,2})\2(\d{1,2})"
    r"(?:[ T](\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?)?"
)
_COMPACT_DATE_RE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_MONEY_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_GROUPED_MONEY_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


class Payload(TypedDict):
    """The JSON body of the upsert (document 3.2.1); money stays Decimal until serialised."""

    cardType: str
    cardNo: str
    type: str
    lsh: str
    code: str
    enterDate: str
    leaveDate: NotRequired[str]
    keyCrowd: str
    icdName: NotRequired[str]
    icdCode: NotRequired[str]
    totalFee: Decimal
    insFee: Decimal
    totalPrepayment: Decimal
    deficientFee: Decimal
    settlementDate: str


# --------------------------------------------------------------------------- columns


def unreadable_problems(row: Mapping[str, Any]) -> list[str]:
    """One violation per column of ``row`` the driver could not read."""
    problems: list[str] = []
    for column, value in row.items():
        if isinstance(value, Unreadable):
            field = _COLUMN_FIELDS.get(column)
            name = f"{field} ({column})" if field else f"column {column}"
            problems.append(
                f"{name} cannot be read from the HIS database ({value.reason}): correct the value in the HIS, "
                "or convert the column in his.query (e.g. CONVERT(col USING utf8mb4), CAST(col AS ...))"
            )
    return problems



# --------------------------------------------------------------------------- value parsers
# Each parser returns the normalised value or raises ValueError whose text is the broken
# rule, phrased to follow "field (column) = value: ".


def _text(value: Any) -> str | None:
    """Trimmed text, None when NULL or empty; numbers from NUMBER/INT columns become their digits."""
    if value is None:
        return None
    if type(value) is str:  # the common case first: called nine times per row
        return value.strip() or None
    if isinstance(value, bytes | bytearray | memoryview):
        # MySQL binary collations and some ODBC drivers hand out bytes.
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text: convert the column to text in his.query") from None
    if isinstance(value, str):
        text = value.strip()
        return text or None
    if isinstance(value, bool):
        raise ValueError("a boolean, expected text")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return str(int(value))
    # Floats are refused: an 18-digit number does not survive a float, so a float here
    # means the digits may already be wrong.
    raise ValueError(f"a {type(value).__name__}, expected text: cast the column to text in his.query")


def _small_code(value: Any) -> str | None:
    """Text for dictionary columns, where 1, 1.0 and Decimal('1') all mean "1"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return _text(value)


def decode_card_type(value: Any) -> str | None:
    """``cardType`` from the dictionary (10 -> "10"); None when NULL; ValueError when unknown."""
    text = _small_code(value)
    if text is None:
        return None
    if text not in CARD_TYPES:
        raise ValueError(
            "not in the document's dictionary 10 身份证, 30 军官证, 43 台湾居民来往大陆通行证, "
            "44 港澳同胞回乡证, 50 护照, 60 其他 (字典)"
        )
    return text


def decode_visit_type(value: Any) -> str | None:
    """``type``: "1" inpatient, "2" outpatient, from 1/2, 住院/门诊, inpatient/outpatient, I/O."""
    text = _small_code(value)
    if text is None:
        return None
    decoded = _VISIT_TYPES.get(text.lower())
    if decoded is None:
        raise ValueError("not a visit type: 1 or 住院 (inpatient), 2 or 门诊 (outpatient) (字典：1住院 2门诊)")
    return decoded


def decode_key_crowd(value: Any) -> str | None:
    """``keyCrowd`` "1"/"0" from 1/0, 是/否, Y/N, true/false, BIT(1) bytes; None when empty or unknown."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, bytes | bytearray) and value in (b"\x01", b"\x00"):
        # MySQL BIT(1) columns arrive as a single raw byte.
        return "1" if value == b"\x01" else "0"
    try:
        text = _small_code(value)
    except ValueError:
        return None
    if text is None:
        return None
    return _KEY_CROWD.get(text.lower())


def parse_date(value: Any) -> date:
    """A calendar date from DATE, DATETIME, 8-digit numbers and the usual string forms."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise ValueError(f"a {type(value).__name__}, expected a date (日期型 yyyy-MM-dd)")
    text = value.strip()
    match = _DATE_RE.fullmatch(text)
    if match:
        year, month, day = int(match[1]), int(match[3]), int(match[4])
        hour, minute, second = match[5], match[6], match[7]
        if hour is not None and (int(hour) > 23 or int(minute) > 59 or (second is not None and int(second) > 59)):
            raise ValueError("not a valid time of day (日期型 yyyy-MM-dd)")
    else:
        compact = _COMPACT_DATE_RE.fullmatch(text)
        if not compact:
            raise ValueError("not a date: expected yyyy-MM-dd, yyyyMMdd or yyyy/MM/dd (日期型 yyyy-MM-dd)")
        year, month, day = int(compact[1]), int(compact[2]), int(compact[3])
    try:
        return date(year, month, day)
    except ValueError:
        raise ValueError("no such day in the calendar (日期型 yyyy-MM-dd)") from None


def parse_money(value: Any) -> Decimal:
    """An amount rounded half-up to cents, from Decimal, int, float or a plain number string.

    Floats are accepted because drivers return them for DOUBLE/FLOAT columns; they go
    through ``str()`` (the shortest repr) so that 1.005 stays 1.005 and rounds to 1.01,
    where ``Decimal(1.005)`` would be 1.00499999... and round to 1.00.
    """
    amount: Decimal
    if isinstance(value, bool):
        raise ValueError("a boolean, expected an amount (数字型 N(8,2))")
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("not a finite number (数字型 N(8,2))")
        amount = Decimal(str(value))
    elif isinstance(value, str):
        text = value.strip()
        if _GROUPED_MONEY_RE.fullmatch(text):
            raise ValueError("thousands separators are not accepted: return a plain number from his.query (数字型 N(8,2))")
        if not _MONEY_RE.fullmatch(text):
            raise ValueError("not a number (数字型 N(8,2))")
        amount = Decimal(text)
    else:
        raise ValueError(f"a {type(value).__name__}, expected an amount (数字型 N(8,2))")
    if not amount.is_finite():
        raise ValueError("not a finite number (数字型 N(8,2))")
    if amount.is_zero():
        return _ZERO_CENTS  # also turns -0 and -0.001 into plain 0.00
    if amount.adjusted() >= 7:
        # Checked before quantize: a huge exponent would overflow the decimal context.
        raise ValueError(f"more than {MAX_MONEY} (数字型 N(8,2))")
    try:
        cents = amount.quantize(_CENT, rounding=ROUND_HALF_UP)
    except InvalidOperation:  # pragma: no cover - ruled out by the magnitude check above
        raise ValueError("not a number (数字型 N(8,2))") from None
    return _ZERO_CENTS if cents.is_zero() else cents


# --------------------------------------------------------------------------- build


def _show(value: Any, *, secret_id: bool = False) -> str:
    """A value as it appears in a violation: strings quoted, ID numbers masked, cut to 60 chars."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).hex()
    if isinstance(value, Decimal | int | float | date | time) and not isinstance(value, bool):
        text = value.isoformat() if isinstance(value, date | time) else str(value)
        return text if not secret_id else mask_id(text)
    text = value if isinstance(value, str) else str(value)
    if secret_id:
        text = mask_id(text)
    if len(text) > _VALUE_WIDTH:
        text = text[:_VALUE_WIDTH] + f"… ({len(text)} characters)"
    return json.dumps(text, ensure_ascii=False)


class _Problems:
    """Collects every violation of one record, in the document's field order."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, field: str, value: Any, rule: str) -> None:
        shown = _show(value, secret_id=field == "cardNo")
        self.items.append(f"{field} ({FIELD_COLUMNS[field]}) = {shown}: {rule}")

    def required(self, field: str, value: Any) -> None:
        self.add(field, value, "required (必填)")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _checked_text(problems: _Problems, field: str, raw: Any, *, required: bool) -> str | None:
    try:
        text = _text(raw)
    except ValueError as exc:
        problems.add(field, raw, str(exc))
        return None
    if text is None:
        if required:
            problems.required(field, raw)
        return None
    limit = MAX_LENGTH[field]
    if len(text) > limit:
        problems.add(field, text, f"longer than {limit} characters (长度{limit}): has {len(text)}")
        return None
    return text


def _checked_date(problems: _Problems, field: str, raw: Any, *, today: date, required: bool) -> date | None:
    if _blank(raw):
        if required:
            problems.required(field, raw)
        return None
    try:
        day = parse_date(raw)
    except ValueError as exc:
        problems.add(field, raw, str(exc))
        return None
    if day > today:
        problems.add(field, day, f"in the future (after {today.isoformat()}): check the HIS clock / the column")
        return None
    return day


def _checked_money(problems: _Problems, field: str, raw: Any) -> Decimal | None:
    if _blank(raw):
        problems.required(field, raw)
        return None
    try:
        amount = parse_money(raw)
    except ValueError as exc:
        problems.add(field, raw, str(exc))
        return None
    if amount < 0:
        problems.add(field, amount, "must not be negative (不能为负数)")
        return None
    if amount > MAX_MONEY:
        problems.add(field, amount, f"more than {MAX_MONEY} (数字型 N(8,2))")
        return None
    return amount


def build(row: Mapping[str, Any], *, key_crowd: str | None = None, today: date | None = None) -> Payload:
    """The upload payload for one canonical HIS row, or InvalidRecord listing every broken rule.

    ``key_crowd`` is "1"/"0" when the caller decided it (label lookup); None reads the
    row's key_crowd column. ``today`` bounds the dates (default: the local date).
    """
    if key_crowd is not None and decode_key_crowd(key_crowd) is None:
        raise ValueError(f"key_crowd must be '1' or '0', not {key_crowd!r}")
    row = normalize_row(row)
    today = today or date.today()
    if unreadable := unreadable_problems(row):
        raise _invalid(optional_text(row.get("lsh")), unreadable)
    problems = _Problems()

    card_type: str | None = None
    try:
        card_type = decode_card_type(row.get("card_type"))
        if card_type is None:
            problems.required("cardType", row.get("card_type"))
    except ValueError as exc:
        problems.add("cardType", row.get("card_type"), str(exc))

    card_no = _checked_text(problems, "cardNo", row.get("card_no"), required=True)
    if card_no is not None and card_type == RESIDENT_ID:
        try:
            card_no = idcard.check(card_no)
        except ValueError as exc:
            problems.add("cardNo", card_no, str(exc))

    visit_type: str | None = None
    try:
        visit_type = decode_visit_type(row.get("visit_type"))
        if visit_type is None:
            problems.required("type", row.get("visit_type"))
    except ValueError as exc:
        problems.add("type", row.get("visit_type"), str(exc))

    lsh = _checked_text(problems, "lsh", row.get("lsh"), required=True)
    code = _checked_text(problems, "code", row.get("code"), required=True)

    enter = _checked_date(problems, "enterDate", row.get("enter_date"), today=today, required=True)
    leave_raw = row.get("leave_date")
    leave = _checked_date(problems, "leaveDate", leave_raw, today=today, required=False)
    if visit_type == INPATIENT and _blank(leave_raw):
        problems.add("leaveDate", leave_raw, "required for inpatients (住院：是)")
    if leave is not None and enter is not None and leave < enter:
        problems.add("leaveDate", leave, f"before enterDate {enter.isoformat()} (如果有值，不能小于诊疗时间)")

    crowd = key_crowd if key_crowd is not None else decode_key_crowd(row.get("key_crowd"))
    if crowd is None:
        raw_crowd = row.get("key_crowd")
        if _blank(raw_crowd):
            problems.required("keyCrowd", raw_crowd)
        else:
            problems.add("keyCrowd", raw_crowd, "not 1 or 0 (字典：1是 0否)")

    icd_name = _checked_text(problems, "icdName", row.get("icd_name"), required=False)
    icd_code = _checked_text(problems, "icdCode", row.get("icd_code"), required=False)

    fees = {field: _checked_money(problems, field, row.get(FIELD_COLUMNS[field])) for field in MONEY_FIELDS}
    total, deficient = fees["totalFee"], fees["deficientFee"]
    if total is not None and deficient is not None and total < deficient:
        problems.add("totalFee", total, f"less than deficientFee {deficient} (不能小于欠费金额)")

    settled = _checked_date(problems, "settlementDate", row.get("settlement_date"), today=today, required=True)
    if settled is not None and enter is not None and settled < enter:
        problems.add("settlementDate", settled, f"before enterDate {enter.isoformat()} (不能小于诊疗时间)")

    if problems.items:
        raise _invalid(lsh or optional_text(row.get("lsh")), problems.items)

    # Every value below was checked above; the asserts only narrow the types for mypy.
    assert card_type is not None
    assert card_no is not None
    assert visit_type is not None
    assert lsh is not None
    assert code is not None
    assert enter is not None
    assert crowd is not None
    assert settled is not None
    out: dict[str, Any] = {
        "cardType": card_type,
        "cardNo": card_no,
        "type": visit_type,
        "lsh": lsh,
        "code": code,
        "enterDate": enter.isoformat(),
    }
    if leave is not None:
        out["leaveDate"] = leave.isoformat()
    out["keyCrowd"] = crowd
    if icd_name is not None:
        out["icdName"] = icd_name
    if icd_code is not None:
        out["icdCode"] = icd_code
    out.update(fees)
    out["settlementDate"] = settled.isoformat()
    return cast(Payload, out)


def optional_text(value: Any) -> str | None:
    """Trimmed text, None when NULL, empty, or not text (see ``_text``)."""
    try:
        return _text(value)
    except ValueError:
        return None


def _invalid(lsh: str | None, violations: list[str]) -> InvalidRecord:
    count = len(violations)
    noun = "problem" if count == 1 else "problems"
    if lsh is None:
        hint = (
            "correct the HIS data or his.query; a record without lsh cannot be uploaded "
            "(lsh is the platform's upsert key)"
        )
    else:
        hint = (
            "correct the HIS data or his.query; the record is re-validated when its source row "
            f"changes, or run `crowd-sync retry --lsh {lsh}`"
        )
    message = f"record lsh={lsh if lsh is not None else '<missing>'}: {count} {noun}: " + "; ".join(violations)
    return InvalidRecord(message, violations=violations, hint=hint, lsh=lsh)


# --------------------------------------------------------------------------- JSON

_FIELD_KEYS: frozenset[str] = frozenset(FIELDS)
# (field, its JSON key and colon, whether it is money), in the document's order.
_FIELD_PREFIX: tuple[tuple[str, str, bool], ...] = tuple(
    (field, json.dumps(field) + ":", field in MONEY_FIELDS) for field in FIELDS
)
_encode_str: Callable[[str], str] = json.encoder.encode_basestring


def payload_json(payload: Mapping[str, Any]) -> str:
    """The canonical JSON body: the document's field order, no spaces, money with two decimals.

    Money is written from Decimal text, never through float, so 0.10 + 0.20 is 0.30 on the
    wire. The same visit always yields the same bytes, which is what payload_hash relies on.
    """
    if not _FIELD_KEYS.issuperset(payload):
        unknown = [key for key in payload if key not in FIELD_COLUMNS]
        raise ValueError(f"not fields of the upload payload: {', '.join(sorted(unknown))}")
    # Built by hand rather than json.dumps(dict): money must be written as JSON numbers from
    # their Decimal text. This runs for every row of a back-fill, hence the prefixes computed
    # once and the C string encoder (the same bytes as json.dumps(value, ensure_ascii=False)).
    parts: list[str] = []
    for field, prefix, money in _FIELD_PREFIX:
        value = payload.get(field)
        if value is None:
            if field in OPTIONAL_FIELDS:
                continue
            raise ValueError(f"payload field {field} is missing")
        if money:
            rendered = _money_text(value)
        elif isinstance(value, str):
            rendered = _encode_str(value)
        else:
            raise ValueError(f"payload field {field} must be text, not {type(value).__name__}")
        parts.append(prefix + rendered)
    return "{" + ",".join(parts) + "}"


def _money_text(value: Any) -> str:
    """An amount as canonical JSON text: two decimals, half-up, -0 as 0.00."""
    if type(value) is Decimal:
        text = str(value)
        # Already in canonical form (what build() produces): cents, not negative, at most
        # 999999.99. Anything else takes parse_money, which rounds, normalises or refuses.
        if 4 <= len(text) <= 9 and text[-3] == "." and text[0] != "-" and text[:-3].isdigit() and text[-2:].isdigit():
            return text
    return format(parse_money(value), "f")


def payload_hash(payload: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON: equal hashes mean the platform already has it."""
    return text_hash(payload_json(payload))


def text_hash(text: str) -> str:
    """sha256 hex of ``payload_json``'s text: ``payload_hash`` without building the JSON twice."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_key_crowd(stored: str, key_crowd: str) -> str:
    """A stored payload with ``keyCrowd`` as decided at dispatch; money stays Decimal (never float)."""
    payload = json.loads(stored, parse_float=Decimal)
    if payload.get("keyCrowd") == key_crowd:
        return stored
    payload["keyCrowd"] = key_crowd
    return payload_json(payload)
