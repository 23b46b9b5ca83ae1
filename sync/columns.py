"""Pure: the columns ``his.query`` returns (product contract), checked and normalised.

The HIS source (his.py) streams rows with exactly these keys, in lower case; a value
the database driver could not read stands there as ``Unreadable``, so that the row
is parked invalid naming the column instead of failing the whole window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sync.errors import ConfigError

# The columns the hospital's query returns (product contract), matched case-insensitively.
COLUMNS: tuple[str, ...] = (
    "lsh",
    "code",
    "card_type",
    "card_no",
    "visit_type",
    "enter_date",
    "leave_date",
    "key_crowd",
    "icd_name",
    "icd_code",
    "total_fee",
    "ins_fee",
    "total_prepayment",
    "deficient_fee",
    "settlement_date",
    "changed_at",
    "institution",
)
# key_crowd is needed only with `key_crowd.source: column`; institution (the code of the
# visit's institution, `institutions[].code`) only when the settings list several.
OPTIONAL_COLUMNS: frozenset[str] = frozenset({"key_crowd", "institution"})
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in OPTIONAL_COLUMNS)
_CANONICAL_KEYS: frozenset[str] = frozenset(COLUMNS)


class Unreadable:
    """A value the database driver could not read, in place of the value: bytes that are not
    text in the connection's character set, a date no calendar holds. The row is parked
    ``invalid`` naming the column; the other rows of the window go on.

    As text it is empty, so that code asking a row for its lsh finds none.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __str__(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"<unreadable: {self.reason}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unreadable) and other.reason == self.reason

    def __hash__(self) -> int:
        return hash(self.reason)


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row with lower-case keys: Oracle folds unquoted aliases to upper case."""
    if _CANONICAL_KEYS.issuperset(row):
        # Rows from HisSource are canonical already; this runs for every row of a back-fill.
        return dict(row)
    return {str(key).strip().lower(): value for key, value in row.items()}


def check_columns(columns: Iterable[str], *, need_key_crowd: bool, need_institution: bool = False) -> None:
    """Raise ConfigError unless the query returns exactly the contract's columns (any case)."""
    seen: list[str] = [str(c).strip().lower() for c in columns]
    present = set(seen)
    required = (
        list(REQUIRED_COLUMNS) + (["key_crowd"] if need_key_crowd else []) + (["institution"] if need_institution else [])
    )
    missing = [c for c in required if c not in present]
    extra = sorted({c for c in seen if c not in COLUMNS})
    twice = sorted({c for c in seen if seen.count(c) > 1})
    if not (missing or extra or twice):
        return
    problems: list[str] = []
    for column in missing:
        fix = f"add `... AS {column}` to his.query"
        if column == "key_crowd":
            fix += " (needed by key_crowd.source: column), or set key_crowd.source: lookup"
        if column == "institution":
            fix += " (the code of each visit's institution, one of institutions[].code: the settings list several)"
        problems.append(f"缺少列 / missing column {column}: {fix}")
    problems.extend(f"未知列 / unknown column {c}: remove or rename it" for c in extra)
    problems.extend(f"列重复 / column {c} appears more than once (names are case-insensitive): keep one" for c in twice)
    parts: list[str] = []
    if missing:
        parts.append("missing column(s) " + ", ".join(missing))
    if extra:
        parts.append("unknown column(s) " + ", ".join(extra))
    if twice:
        parts.append("repeated column(s) " + ", ".join(twice))
    raise ConfigError(
        "his.query 返回的列不对 / his.query returns the wrong columns: " + "; ".join(parts),
        problems=problems,
        hint="his.query 须返回下列列（大小写、顺序不限）/ his.query must return these columns, in any case and order: "
        + ", ".join(REQUIRED_COLUMNS)
        + (", key_crowd" if need_key_crowd else "")
        + (", institution" if need_institution else "")
        + "; see the product contract's column table",
    )
