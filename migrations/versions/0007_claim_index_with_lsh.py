"""The claim's index gains lsh: (status, next_attempt_at, lsh).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

A claim takes the due rows of one status in the order ``next_attempt_at, lsh`` with a
``LIMIT``. With ``lsh`` in the index that order is the index's own, so the database reads
the batch's rows and stops: a claim costs its batch, however many rows are due. Without
it, rows made due in the same instant (an enqueue batch, a requeue of thousands) tie on
``next_attempt_at`` and every claim sorted all of them. The new index serves every query
the old one served, so the old one goes.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_sync_outbox_status_next_attempt_at_lsh", "sync_outbox", ["status", "next_attempt_at", "lsh"])
    op.drop_index("ix_sync_outbox_status_next_attempt_at", table_name="sync_outbox")


def downgrade() -> None:
    op.create_index("ix_sync_outbox_status_next_attempt_at", "sync_outbox", ["status", "next_attempt_at"])
    op.drop_index("ix_sync_outbox_status_next_attempt_at_lsh", table_name="sync_outbox")
