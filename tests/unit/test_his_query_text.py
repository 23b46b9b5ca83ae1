"""his.query is the hospital's SQL: a `:word` inside its string literals and comments is text,
and only :since and :until outside them are parameters."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest

from sync.errors import ConfigError
from sync.his import HisSource
from sync.settings import His as HisSettings
from tests.support import His, make_visit, write_settings

T0 = datetime(2024, 5, 20, 10, 0, 0)

QUERY_WITH_COLONS = """\
SELECT -- filled in by crowd-sync: :since and :until (this comment names them, it does not use them)
       serial_no AS lsh, visit_no AS code, id_type AS card_type, id_no AS card_no,
       kind AS visit_type, admitted AS enter_date, discharged AS leave_date, is_key AS key_crowd,
       'note :x, at 12:00:00 /* not a comment */' AS icd_name, diag_code AS icd_code, total AS total_fee,
       insurance AS ins_fee, deposit AS total_prepayment, owed AS deficient_fee, settled AS settlement_date,
       changed AS changed_at /* was :changed */
FROM his_settlement
WHERE changed >= :since AND changed < :until AND visit_no <> 'it''s :none'
"""


def test_a_colon_word_in_a_literal_or_a_comment_is_left_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'his.db'}"
    his = His(url)
    his.insert([make_visit(1, changed=T0)])
    his.dispose()
    src = HisSource(HisSettings(url=url, query=QUERY_WITH_COLONS), need_key_crowd=True)  # type: ignore[arg-type]
    try:
        src.check()
        rows = list(src.rows(T0 - timedelta(minutes=1), T0 + timedelta(minutes=1)))
    finally:
        src.dispose()
    assert [r["lsh"] for r in rows] == ["LSH000001"]
    assert rows[0]["icd_name"] == "note :x, at 12:00:00 /* not a comment */"


def test_only_parameters_outside_literals_and_comments_count() -> None:
    from sync.sqltext import escape_literal_colons, query_parameters

    assert query_parameters(QUERY_WITH_COLONS) == ["since", "until"]
    assert query_parameters("SELECT 1 -- :a\nWHERE x = :since # :b", "mysql") == ["since"]
    assert query_parameters("SELECT 1 WHERE x = :since # :b") == ["since", "b"]  # `#` starts a comment in MySQL only
    assert query_parameters(r"SELECT 'it\'s :a' WHERE x = :since", "mysql") == ["since"]
    assert query_parameters("SELECT $q$ :a $q$, x::date WHERE x = :since", "postgresql") == ["since"]
    assert escape_literal_colons("SELECT ':a' WHERE x = :since") == "SELECT '\\:a' WHERE x = :since"


def _problems(tmp_path: Path, query: str) -> str:
    with pytest.raises(ConfigError) as raised:
        write_settings(
            tmp_path / "settings.yaml", his_url=f"sqlite:///{tmp_path / 'his.db'}",
            outbox_url=f"sqlite:///{tmp_path / 'outbox.db'}", base_url="http://127.0.0.1:9", overrides={"his": {"query": query}},
        )
    return str(raised.value)


def test_since_named_only_in_a_comment_is_missing(tmp_path: Path) -> None:
    text = _problems(tmp_path, "-- a query\nSELECT * FROM v -- changed >= :since\nWHERE changed < :until")
    assert "his.query: must use the bind parameters :since and :until (missing :since)" in text


def test_an_unknown_parameter_is_named_at_load(tmp_path: Path) -> None:
    text = _problems(tmp_path, "SELECT * FROM v WHERE changed >= :since AND changed < :until AND ward = :ward")
    assert "his.query: uses :ward" in text
    assert "only :since and :until" in text
