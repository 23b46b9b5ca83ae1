"""sync_outbox.crashes: how many times uploading the current payload crashed crowd-sync.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

An exception where none should be (a payload a DBA edited into broken JSON, a bug)
used to release the record and leave it due: it crashed again every cycle, for ever,
never gaining an attempt or a status. Now each crash is counted, and at the third
the record is parked ``invalid`` with the exception's text.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "sync_outbox",
        sa.Column(
            "crashes", sa.Integer, nullable=False, server_default=sa.text("0"),
            comment="times uploading the current payload crashed crowd-sync (a payload edited by hand, a bug); "
            "at 3 the row is parked invalid / 上传崩溃次数",
        ),
    )


def downgrade() -> None:
    # Plain DROP COLUMN, SQLite's too (3.35 and later): a batch copy of the table would break the
    # views that read it (0002).
    op.drop_column("sync_outbox", "crashes")
