"""The DDL a DBA can review and run by hand for databases the test machine lacks."""

from __future__ import annotations

import re

import pytest

from sync.outbox.schema import sync_outbox
from sync.outbox.store import head_revision, render_offline


@pytest.mark.parametrize("url", ["oracle+oracledb://", "mssql+pymssql://"])
def test_offline_ddl_creates_the_outbox_with_comments(url: str) -> None:
    sql = render_offline(url)
    assert re.search(r"CREATE TABLE sync_outbox\s*\(", sql)
    for table in ("sync_cursor", "sync_run", "sync_token", "sync_label_cache", "sync_state", "sync_schema_version"):
        assert f"CREATE TABLE {table}" in sql
    if url.startswith("oracle"):
        comments = re.findall(r"COMMENT ON COLUMN sync_outbox\.(\w+) IS", sql)
        assert "COMMENT ON TABLE sync_outbox IS" in sql
    else:
        comments = re.findall(r"sp_addextendedproperty 'MS_Description', N'[^\n]*'table', sync_outbox, 'column', (\w+)", sql)
    assert set(comments) == {c.name for c in sync_outbox.columns}
    assert "平台应答" in sql  # Chinese comments survive
    assert f"'{head_revision()}'" in sql  # the version is recorded
    assert "INSERT INTO sync_token" in sql


def test_sql_server_text_columns_hold_chinese() -> None:
    sql = render_offline("mssql+pymssql://")
    assert re.search(r"\bpayload NVARCHAR\(max\) NOT NULL", sql)
    assert re.search(r"\blast_answer NVARCHAR\(200\)", sql)
    assert re.search(r"\bnext_attempt_at DATETIME2\b", sql)


def test_head_is_the_newest_revision() -> None:
    assert head_revision() == "0002"
