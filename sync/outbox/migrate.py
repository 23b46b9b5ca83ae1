"""Alembic for the outbox: which schema revision a database is at, and bringing it to head.

``migrations/`` holds the revisions; their version table is ``sync_schema_version``.
"""

from __future__ import annotations

import io
from pathlib import Path

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from sync.errors import ConfigError
from sync.outbox.schema import sync_outbox

log = structlog.get_logger(__name__)

VERSION_TABLE = "sync_schema_version"
_MIGRATE_HINT = "运行 / run `crowd-sync migrate`"


def _alembic_config(output: io.StringIO | None = None) -> Config:
    cfg = Config(output_buffer=output) if output is not None else Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return cfg


def head_revision() -> str:
    """The schema revision this version of crowd-sync needs."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _known_revisions() -> set[str]:
    return {rev.revision for rev in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def _current_on(conn: sa.Connection) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def current_revision(engine: sa.Engine) -> str | None:
    """The database's schema revision; None for a database Alembic never touched."""
    with engine.connect() as conn:
        return _current_on(conn)


def _upgrade_on(conn: sa.Connection, institution: str | None = None) -> None:
    cfg = _alembic_config()
    cfg.attributes["connection"] = conn
    # Revision 0007: the institution the rows already there belong to.
    cfg.attributes["institution"] = institution
    command.upgrade(cfg, "head")


def render_offline(dialect_url: str, institution: str | None = None) -> str:
    """The DDL of every migration as SQL text for a DBA to run by hand (Alembic ``--sql``)."""
    buf = io.StringIO()
    cfg = _alembic_config(buf)
    cfg.attributes["url"] = dialect_url
    cfg.attributes["institution"] = institution
    command.upgrade(cfg, "head", sql=True)
    return buf.getvalue()


def ensure_schema(engine: sa.Engine, *, create: bool, shown: str) -> None:
    """Refuse to run against a schema other than head (a fresh SQLite file is created,
    unless ``create`` is False: the command only reads). ``shown``: the URL for messages."""
    head = head_revision()
    with engine.begin() as conn:
        current = _current_on(conn)
        if current == head:
            return
        if current is None:
            has_tables = sa.inspect(conn).has_table(sync_outbox.name)
            if engine.dialect.name == "sqlite" and not has_tables and create:
                _upgrade_on(conn)
                log.info("outbox_created", url=shown, revision=head)
                return
            if has_tables:
                raise ConfigError(
                    f"outbox 数据库有 crowd-sync 的表但没有结构版本 / the outbox database {shown} has crowd-sync tables but no schema version "
                    f"in {VERSION_TABLE}, this version needs {head}",
                    hint=f"if the schema is complete, record it with `alembic stamp {head}`; "
                    "otherwise point outbox.url at an empty database and run `crowd-sync migrate`",
                )
        elif current not in _known_revisions():
            raise ConfigError(
                f"outbox 结构比本版本 crowd-sync 新 / the outbox schema is at {current}, newer than this version of crowd-sync "
                f"knows (it needs {head})",
                hint="把 crowd-sync 升级到迁移过该库的版本 / upgrade crowd-sync to the version that migrated this database",
            )
    raise ConfigError(
        f"outbox 结构需要升级 / the outbox schema is at {current or 'none (empty database)'}, this version needs {head}",
        hint=_MIGRATE_HINT,
    )


def upgrade(engine: sa.Engine, *, shown: str, institution: str | None = None) -> tuple[str | None, str]:
    """Bring the database to head; returns the revisions before and after. ``institution``:
    the code the rows already there belong to (the first of the settings)."""
    with engine.begin() as conn:
        before = _current_on(conn)
        _upgrade_on(conn, institution)
    after = current_revision(engine)
    assert after is not None
    log.info("outbox_migrated", url=shown, before=before, after=after)
    return before, after
