"""sync_label_cache keeps label codes only: no names, no ID numbers, no counties.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

The key-population decision needs to know whether the platform knows the person and
which labels they carry; the cache used to keep the label API's whole ``data``
object (name, full ID number, household county, label names). The ``data`` column
is replaced by ``labels``: the label codes per list, as JSON, e.g.
``{"rkxBq":[],"jjxBq":["J01.02"],"jkBq":[],"glztBq":[]}``; NULL when the platform
returned no data. What was cached is deleted (it is only a cache: the next cycle
asks the label API again).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LABELS_COMMENT = (
    'label codes per list as JSON, e.g. {"jjxBq":["J01.02"]}; NULL = the platform returned no data '
    "(not in the key population) / 标签代码"
)


def upgrade() -> None:
    op.execute("DELETE FROM sync_label_cache")
    with op.batch_alter_table("sync_label_cache") as batch:
        batch.drop_column("data")
        batch.add_column(sa.Column("labels", sa.Text, nullable=True, comment=LABELS_COMMENT))


def downgrade() -> None:
    op.execute("DELETE FROM sync_label_cache")
    with op.batch_alter_table("sync_label_cache") as batch:
        batch.drop_column("labels")
        batch.add_column(
            sa.Column("data", sa.UnicodeText, nullable=True,
                      comment="the label API's data JSON; NULL = not in the key population / 人员标签数据")
        )
