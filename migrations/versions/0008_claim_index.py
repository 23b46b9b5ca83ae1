"""The claim's index: (institution, status, next_attempt_at, lsh).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

A claim takes the due rows of one institution and one status in the order
``next_attempt_at, lsh`` with a ``LIMIT``. With the index in that order, the database reads
the batch's rows and stops: a claim costs its batch, however many rows are due. Without
``lsh`` in it, rows made due in the same instant (an enqueue batch, a requeue of thousands)
tie on ``next_attempt_at`` and every claim sorted all of them. The new index serves every
query the two it replaces served ((status, next_attempt_at) and (institution, status)).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW = "ix_sync_outbox_institution_status_next_attempt_at_lsh"


def upgrade() -> None:
    op.create_index(NEW, "sync_outbox", ["institution", "status", "next_attempt_at", "lsh"])
    op.drop_index("ix_sync_outbox_status_next_attempt_at", table_name="sync_outbox")
    op.drop_index("ix_sync_outbox_institution_status", table_name="sync_outbox")


def downgrade() -> None:
    op.create_index("ix_sync_outbox_institution_status", "sync_outbox", ["institution", "status"])
    op.create_index("ix_sync_outbox_status_next_attempt_at", "sync_outbox", ["status", "next_attempt_at"])
    op.drop_index(NEW, table_name="sync_outbox")
