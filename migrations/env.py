"""Alembic environment for the outbox database.

There is no alembic.ini: ``sync.outbox.store`` builds the Alembic ``Config`` in
code. Online, the caller hands over an open connection in
``config.attributes["connection"]`` (so the upgrade runs inside the caller's
transaction and SQLite's locking); offline (``--sql``), the target URL comes from
``config.attributes["url"]`` or the ``sqlalchemy.url`` option.
"""

from __future__ import annotations

from alembic import context

from sync.outbox.schema import metadata

VERSION_TABLE = "sync_schema_version"

config = context.config
target_metadata = metadata


def run_migrations_offline() -> None:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    dialect = context.get_context().dialect
    if dialect.name == "mssql":
        # Without a server to ask, SQLAlchemy assumes an ancient SQL Server (DATE
        # as DATETIME, TEXT columns) and no default schema, which the comment
        # calls (sp_addextendedproperty) must name. Assume SQL Server 2012 or
        # later and the usual dbo schema.
        dialect.server_version_info = (11, 0)
        dialect.deprecate_large_types = True
        dialect.default_schema_name = dialect.default_schema_name or "dbo"
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("the outbox migrations run through crowd-sync (`crowd-sync migrate`), which passes a connection")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
