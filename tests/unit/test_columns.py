"""The columns his.query returns: the contract's, in any letter case, each problem named with its fix."""

from __future__ import annotations

import pytest

from sync.columns import COLUMNS, REQUIRED_COLUMNS, check_columns, normalize_row
from sync.errors import ConfigError
from sync.records import build
from tests.unit.test_records import TODAY, row


def test_the_contracts_columns_pass_in_any_case() -> None:
    check_columns(COLUMNS, need_key_crowd=True)
    check_columns([c.upper() for c in REQUIRED_COLUMNS], need_key_crowd=False)


def test_missing_columns_are_named_with_the_fix() -> None:
    columns = [c for c in COLUMNS if c not in ("total_fee", "key_crowd")]
    with pytest.raises(ConfigError) as info:
        check_columns(columns, need_key_crowd=True)
    error = info.value
    assert "missing column(s) key_crowd, total_fee" in error.message or "missing column(s) total_fee, key_crowd" in error.message
    assert "缺少列 / missing column total_fee: add `... AS total_fee` to his.query" in error.problems
    assert any("key_crowd" in p and "key_crowd.source: lookup" in p for p in error.problems)


def test_key_crowd_column_is_only_needed_when_the_source_is_the_column() -> None:
    check_columns(REQUIRED_COLUMNS, need_key_crowd=False)
    with pytest.raises(ConfigError, match="key_crowd"):
        check_columns(REQUIRED_COLUMNS, need_key_crowd=True)


def test_unknown_and_repeated_columns_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        check_columns([*REQUIRED_COLUMNS, "PATIENT_NAME", "LSH"], need_key_crowd=False)
    error = info.value
    assert "unknown column(s) patient_name" in error.message
    assert "未知列 / unknown column patient_name: remove or rename it" in error.problems
    assert any("column lsh appears more than once" in p for p in error.problems)
    assert "patient_name" in str(error)


def test_upper_case_columns_from_oracle_are_read() -> None:
    upper = {key.upper(): value for key, value in row().items()}
    assert normalize_row(upper) == row()
    assert build(upper, today=TODAY) == build(row(), today=TODAY)
