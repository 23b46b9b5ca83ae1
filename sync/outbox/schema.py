"""The outbox tables, as SQLAlchemy Core metadata.

A DBA reads these tables with plain SQL, so every table and column carries a
comment (English / Chinese) saying what it holds. Alembic owns the schema: this
metadata is what the code expects, ``migrations/versions`` is how a database
gets there.

Timestamps are naive UTC everywhere (portable across SQLite, MySQL, PostgreSQL,
Oracle and SQL Server, which disagree about time zones), except
``sync_outbox.source_changed_at``, which is the HIS's own clock.

Columns that may hold Chinese text are Unicode types: NVARCHAR on SQL Server,
whose VARCHAR depends on the database collation; the same as String elsewhere.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mssql, mysql, oracle

from sync.outbox.model import DEFAULT_INSTITUTION

# Constraint and index names are spelled out so that every dialect (and Alembic)
# agrees on them; Oracle and SQL Server would otherwise invent their own.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# MySQL/MariaDB DATETIME, Oracle DATE and SQL Server DATETIME drop or round
# fractions of a second; keeping them keeps the cursor and lease arithmetic exact.
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb").with_variant(oracle.TIMESTAMP(), "oracle").with_variant(mssql.DATETIME2, "mssql")

# The platform's upsert key is case-sensitive, and so is every comparison of it here:
# MySQL/MariaDB's and SQL Server's default collations are not (migration 0003). NVARCHAR
# on SQL Server so that the binary collation's code page never narrows the column.
Key = (
    sa.String(255)
    .with_variant(mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")
    .with_variant(mssql.NVARCHAR(255, collation="Latin1_General_100_BIN2"), "mssql")
)

STATUSES = ("pending", "sent", "failed", "invalid", "dead", "skipped")

# The code of an institution (institutions[].code): lsh is unique only within one (0007).
Code = sa.String(40)

sync_outbox = sa.Table(
    "sync_outbox",
    metadata,
    sa.Column("institution", Code, primary_key=True, default=DEFAULT_INSTITUTION,
              comment="code of the visit's institution (institutions[].code; lsh is unique only within one) / 机构编码"),
    sa.Column("lsh", Key, primary_key=True,
              comment="visit serial number, the platform's upsert key (the platform allows 50 characters; longer ones are kept to be reported invalid) / 就诊流水号"),
    sa.Column("status", sa.String(16), nullable=False,
              comment="pending | sent | failed | invalid | dead | skipped / 状态"),
    sa.Column("payload", sa.UnicodeText, nullable=False,
              comment="JSON last built: what is or was sent (for invalid rows: the raw HIS row) / 上传报文"),
    sa.Column("payload_hash", sa.String(64), nullable=False,
              comment="sha256 of the payload; an unchanged hash means nothing to resend / 报文摘要"),
    sa.Column("sent_hash", sa.String(64), nullable=True,
              comment="hash of the payload the platform last accepted / 平台最近接受的报文摘要"),
    sa.Column("key_crowd", sa.String(1), nullable=True,
              comment="1 key population, 0 not; NULL = not decided yet (label lookup at dispatch) / 是否重点人群"),
    sa.Column("card_type", sa.String(8), nullable=True, comment="ID document type (10, 30, 43...) / 证件类型"),
    sa.Column("card_no", sa.String(64), nullable=True, comment="ID document number / 证件号码"),
    sa.Column("visit_type", sa.String(1), nullable=True, comment="1 inpatient, 2 outpatient / 就诊类型"),
    sa.Column("settlement_date", sa.Date, nullable=True, comment="settlement date / 结算日期"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0"),
              comment="upload attempts of the current payload / 上传尝试次数"),
    sa.Column("generic_failures", sa.Integer, nullable=False, server_default=sa.text("0"),
              comment="answers 中间请求异常 received for the current payload (retried a bounded number of times) / 通用异常次数"),
    sa.Column("crashes", sa.Integer, nullable=False, server_default=sa.text("0"),
              comment="times uploading the current payload crashed crowd-sync (a payload edited by hand, a bug); "
              "at 3 the row is parked invalid / 上传崩溃次数"),
    sa.Column("first_failed_at", Timestamp, nullable=True,
              comment="UTC, first transient failure of the current payload; drives retry.give_up_after_h / 首次失败时间(UTC)"),
    sa.Column("next_attempt_at", Timestamp, nullable=True,
              comment="UTC, when the row is due to be sent; NULL = not scheduled / 下次尝试时间(UTC)"),
    sa.Column("last_error", sa.UnicodeText, nullable=True,
              comment="why the last attempt failed, or why the row is invalid or skipped / 最近错误"),
    sa.Column("last_http_status", sa.Integer, nullable=True, comment="HTTP status of the last answer / 最近HTTP状态码"),
    sa.Column("last_answer", sa.Unicode(200), nullable=True,
              comment="what the platform answered (新增成功 / 修改成功) / 平台应答"),
    sa.Column("first_seen_at", Timestamp, nullable=False, comment="UTC, when the visit was first read from the HIS / 首次读取时间(UTC)"),
    sa.Column("updated_at", Timestamp, nullable=False, comment="UTC, last change of this row / 最近更新时间(UTC)"),
    sa.Column("sent_at", Timestamp, nullable=True, comment="UTC, when the platform last accepted the row / 上传成功时间(UTC)"),
    sa.Column("source_changed_at", Timestamp, nullable=True,
              comment="HIS clock (not UTC), when the visit was last settled or re-settled / HIS结算变更时间(HIS时钟)"),
    sa.Column("lease_owner", sa.String(100), nullable=True,
              comment="worker currently uploading the row (host:pid:id); NULL = free / 当前处理进程"),
    sa.Column("lease_until", Timestamp, nullable=True,
              comment="UTC, the lease ends here; a crashed worker's rows come back after it / 租约到期时间(UTC)"),
    # The claim's: one institution's rows of one status in the order it takes them.
    sa.Index(None, "institution", "status", "next_attempt_at", "lsh"),
    sa.Index(None, "lsh"),
    sa.Index(None, "card_no"),
    sa.Index(None, "source_changed_at"),
    sa.Index(None, "settlement_date"),
    comment="one row per visit: what was sent to the provincial platform, what failed and why / 就诊记录上传队列",
)

sync_cursor = sa.Table(
    "sync_cursor",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True, comment="cursor name (his) / 游标名称"),
    sa.Column("changed_at", Timestamp, nullable=True,
              comment="HIS clock, changed_at of the last row read / 已读取到的HIS变更时间(HIS时钟)"),
    sa.Column("lsh", Key, nullable=True, comment="lsh of the last row read, to break ties / 已读取到的流水号"),
    sa.Column("updated_at", Timestamp, nullable=True, comment="UTC, when the cursor last moved / 更新时间(UTC)"),
    comment="how far the HIS has been read / HIS读取进度",
)

sync_run = sa.Table(
    "sync_run",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True, comment="run number / 运行编号"),
    sa.Column("kind", sa.String(16), nullable=False, comment="poll | dispatch | cycle | reconcile | once / 运行类型"),
    sa.Column("started_at", Timestamp, nullable=False, comment="UTC, start / 开始时间(UTC)"),
    sa.Column("finished_at", Timestamp, nullable=True, comment="UTC, end; NULL = running or crashed / 结束时间(UTC)"),
    sa.Column("host", sa.String(255), nullable=True, comment="host name / 主机名"),
    sa.Column("pid", sa.Integer, nullable=True, comment="process id / 进程号"),
    sa.Column("rows_read", sa.Integer, nullable=False, server_default=sa.text("0"), comment="HIS rows read / 读取行数"),
    sa.Column("enqueued", sa.Integer, nullable=False, server_default=sa.text("0"),
              comment="rows new or changed in the outbox / 入队行数"),
    sa.Column("sent", sa.Integer, nullable=False, server_default=sa.text("0"), comment="records accepted by the platform / 上传成功数"),
    sa.Column("failed", sa.Integer, nullable=False, server_default=sa.text("0"), comment="transient failures / 失败数"),
    sa.Column("invalid", sa.Integer, nullable=False, server_default=sa.text("0"), comment="records found invalid / 校验不通过数"),
    sa.Column("skipped", sa.Integer, nullable=False, server_default=sa.text("0"),
              comment="records not uploaded: not in the key population / 非重点人群跳过数"),
    sa.Column("dead", sa.Integer, nullable=False, server_default=sa.text("0"), comment="records given up / 放弃数"),
    sa.Column("error", sa.UnicodeText, nullable=True, comment="why the run stopped early; NULL = it did not / 运行错误"),
    comment="one row per run of poll, dispatch or reconcile / 运行记录",
)

sync_token = sa.Table(
    "sync_token",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False, comment="always 1 / 固定为1"),
    sa.Column("token", sa.Text, nullable=True, comment="the platform login token shared by all processes / 平台登录令牌"),
    sa.Column("obtained_at", Timestamp, nullable=True, comment="UTC, login time / 登录时间(UTC)"),
    sa.Column("expires_at", Timestamp, nullable=True, comment="UTC, when the token is renewed / 过期时间(UTC)"),
    sa.Column("updated_at", Timestamp, nullable=True, comment="UTC, last change / 更新时间(UTC)"),
    sa.Column("institution", Code, nullable=True,
              comment="whose token: each institution logs in with its own account / 机构编码"),
    comment="the shared login token: one login serves every worker / 共享登录令牌",
)

sync_label_cache = sa.Table(
    "sync_label_cache",
    metadata,
    sa.Column("card_hash", sa.String(64), primary_key=True,
              comment="sha256 of the ID number (the cache does not repeat ID numbers) / 证件号摘要"),
    sa.Column("labels", sa.Text, nullable=True,
              comment='label codes per list as JSON, e.g. {"jjxBq":["J01.02"]}; NULL = the platform returned no data '
              "(not in the key population) / 标签代码"),
    sa.Column("key_crowd", sa.String(1), nullable=True, comment="1 key population, 0 not / 是否重点人群"),
    sa.Column("fetched_at", Timestamp, nullable=False, comment="UTC, when the labels were fetched / 查询时间(UTC)"),
    # Only what the key-population decision needs: no name, no ID number, no county (0004).
    comment="key-population labels recently looked up / 人员标签缓存",
)

sync_state = sa.Table(
    "sync_state",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True,
              comment="config_error (sending held back) or instance (the running process) / 状态名"),
    sa.Column("value", sa.UnicodeText, nullable=True, comment="JSON / 状态值(JSON)"),
    sa.Column("updated_at", Timestamp, nullable=True, comment="UTC, last change / 更新时间(UTC)"),
    comment="small named facts: the configuration error holding sending back, the running instance / 运行状态",
)

sync_attempt = sa.Table(
    "sync_attempt",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True, comment="attempt number / 编号"),
    sa.Column("lsh", Key, nullable=False, comment="visit serial number (sync_outbox.lsh) / 就诊流水号"),
    sa.Column("institution", Code, nullable=True, comment="code of the visit's institution / 机构编码"),
    sa.Column("at", Timestamp, nullable=False, comment="UTC, when the attempt ended / 时间(UTC)"),
    sa.Column("kind", sa.String(16), nullable=False,
              comment="upload (a request to the platform) | check (local validation) | decision "
              "(key population) | crash / 类型"),
    sa.Column("outcome", sa.String(16), nullable=False,
              comment="the status the visit took: sent | failed | invalid | dead | skipped / 结果"),
    sa.Column("http_status", sa.Integer, nullable=True, comment="HTTP status of the platform's answer / HTTP状态码"),
    sa.Column("answer", sa.Unicode(200), nullable=True, comment="what the platform answered (新增成功 / 修改成功) / 平台应答"),
    sa.Column("error", sa.UnicodeText, nullable=True,
              comment="why it failed, was refused or skipped; ID numbers masked / 错误"),
    sa.Index("ix_sync_attempt_lsh_at", "lsh", "at"),
    sa.Index("ix_sync_attempt_at", "at"),
    comment="each attempt at each visit: uploads and the platform's answers, local checks, decisions / 上传尝试记录",
)

sync_timezone = sa.Table(
    "sync_timezone",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False, comment="always 1 / 固定为1"),
    sa.Column("zone", sa.String(64), nullable=False, comment="schedule.timezone / 时区"),
    sa.Column("utc_offset_minutes", sa.Integer, nullable=False,
              comment="the zone's offset from UTC in minutes (480 = UTC+8) / 与UTC相差分钟数"),
    sa.Column("updated_at", Timestamp, nullable=True, comment="UTC, last change / 更新时间(UTC)"),
    comment="the zone people read times in; the DBA views count days in it / 本地时区",
)
