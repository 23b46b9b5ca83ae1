"""The DDL a DBA can review and run by hand for databases the test machine lacks."""

from __future__ import annotations

import re

import pytest

from sync.outbox.migrate import head_revision, render_offline
from sync.outbox.schema import sync_outbox


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
    assert head_revision() == "0008"


def test_lsh_gets_a_binary_collation_where_the_default_ignores_case() -> None:
    mysql = render_offline("mysql+pymysql://")
    assert "ALTER TABLE sync_outbox MODIFY lsh VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL" in mysql
    assert "ALTER TABLE sync_cursor MODIFY lsh VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL" in mysql
    mssql = render_offline("mssql+pymssql://")
    drop = mssql.index("ALTER TABLE sync_outbox DROP CONSTRAINT pk_sync_outbox")
    alter = mssql.index("ALTER TABLE sync_outbox ALTER COLUMN lsh NVARCHAR(255) COLLATE Latin1_General_100_BIN2 NOT NULL")
    add = mssql.index("ALTER TABLE sync_outbox ADD CONSTRAINT pk_sync_outbox PRIMARY KEY (lsh)")
    assert drop < alter < add
    # Oracle's VARCHAR2 and PostgreSQL's default collations compare case-sensitively already.
    for url in ("oracle+oracledb://", "postgresql+psycopg2://"):
        upgrade = render_offline(url).split("Running upgrade 0002 -> 0003")[1].split("Running upgrade 0003")[0]
        assert "lsh" not in upgrade


def test_the_label_cache_keeps_no_label_data_object() -> None:
    for url in ("oracle+oracledb://", "mssql+pymssql://", "mysql+pymysql://", "postgresql+psycopg2://"):
        upgrade = render_offline(url).split("Running upgrade 0003 -> 0004")[1]
        assert "DELETE FROM sync_label_cache" in upgrade
        assert "DROP COLUMN data" in upgrade


@pytest.mark.parametrize("url", ["oracle+oracledb://", "mssql+pymssql://"])
def test_offline_ddl_keys_the_outbox_by_institution_and_tags_existing_rows(url: str) -> None:
    sql = render_offline(url, "450001")
    upgrade = sql[sql.index("upgrade 0006 -> 0007"):]
    assert "ADD CONSTRAINT pk_sync_outbox PRIMARY KEY (institution, lsh)" in upgrade
    assert "DEFAULT '450001'" in upgrade  # every row already there is the institution's it served
    assert "name = 'config_error:450001' WHERE name = 'config_error'" in upgrade
