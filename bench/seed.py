"""A synthetic HIS for the benchmark: one table with the canonical columns, seeded fast.

Rows are generated on the fly (never a whole list of a million dicts) and written
with the driver's executemany in chunks: SQLite through the stdlib module,
MariaDB through PyMySQL, whose executemany folds a chunk into multi-row INSERTs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from sync import idcard

_CHUNK = 5000
# The first settlement of a seeded HIS; rows follow one second apart.
HISTORY_START = datetime(2024, 1, 1)

HIS_QUERY = """\
SELECT lsh, code, card_type, card_no, visit_type, enter_date, leave_date, key_crowd,
       icd_name, icd_code, total_fee, ins_fee, total_prepayment, deficient_fee,
       settlement_date, changed_at
FROM his_visit
WHERE changed_at >= :since AND changed_at < :until
"""

_meta = sa.MetaData()
his_visit = sa.Table(
    "his_visit",
    _meta,
    sa.Column("lsh", sa.String(50), primary_key=True),
    sa.Column("code", sa.String(50)),
    sa.Column("card_type", sa.String(2)),
    sa.Column("card_no", sa.String(40)),
    sa.Column("visit_type", sa.Integer),
    sa.Column("enter_date", sa.DateTime),
    sa.Column("leave_date", sa.DateTime, nullable=True),
    sa.Column("key_crowd", sa.String(1), nullable=True),
    sa.Column("icd_name", sa.String(200), nullable=True),
    sa.Column("icd_code", sa.String(100), nullable=True),
    sa.Column("total_fee", sa.Numeric(10, 2)),
    sa.Column("ins_fee", sa.Numeric(10, 2)),
    sa.Column("total_prepayment", sa.Numeric(10, 2)),
    sa.Column("deficient_fee", sa.Numeric(10, 2)),
    sa.Column("settlement_date", sa.DateTime),
    sa.Column("changed_at", sa.DateTime),
    sa.Index("ix_his_visit_changed_at", "changed_at", "lsh"),
)
COLUMNS = [c.name for c in his_visit.columns]


def resident_id(n: int) -> str:
    """A valid 18-character resident ID number, distinct for every n below 10**7 * 365."""
    born = date(1950, 1, 1) + timedelta(days=n % 20000)
    return idcard.make("510104", born, (n // 20000) % 1000)


def visits(
    count: int, *, start: datetime, key_every: int = 1, patients: int | None = None, prefix: str = "B"
) -> Iterator[tuple[Any, ...]]:
    """``count`` settled visits, one second apart from ``start``; every ``key_every``-th
    is key population (key_crowd = 1); ``patients`` distinct cards (default: one per visit)."""
    ids: dict[int, str] = {}
    for n in range(count):
        changed = start + timedelta(seconds=n)
        inpatient = n % 3 == 0
        admitted = changed - timedelta(days=5) if inpatient else changed
        total = Decimal(5000 + (n * 7919) % 895000) / 100
        p = n % patients if patients else n
        card = ids.get(p)
        if card is None:
            card = resident_id(p)
            if patients and patients <= 200_000:
                ids[p] = card
        yield (
            f"{prefix}{n:08d}",
            f"{'ZY' if inpatient else 'MZ'}{n:08d}",
            "10",
            card,
            1 if inpatient else 2,
            admitted,
            admitted + timedelta(days=4) if inpatient else None,
            "1" if n % key_every == 0 else "0",
            "原发性高血压",
            "I10.x00",
            total,
            (total * Decimal("0.6")).quantize(Decimal("0.01")),
            Decimal("0.00") if n % 2 else Decimal("1000.00"),
            Decimal("0.00"),
            changed,
            changed,
        )


def create(url: str) -> None:
    """Create the HIS table (dropping an old one)."""
    engine = sa.create_engine(url)
    try:
        _meta.drop_all(engine)
        _meta.create_all(engine)
    finally:
        engine.dispose()


def fill(url: str, rows: Iterator[tuple[Any, ...]]) -> int:
    """Insert ``rows`` in chunks through the raw driver; returns how many."""
    engine = sa.create_engine(url)
    dialect = engine.dialect.name
    mark = "?" if dialect == "sqlite" else "%s"
    sql = f"INSERT INTO his_visit ({', '.join(COLUMNS)}) VALUES ({', '.join([mark] * len(COLUMNS))})"
    total = 0
    try:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            chunk: list[tuple[Any, ...]] = []
            for row in rows:
                if dialect == "sqlite":
                    # As a SQLAlchemy model would store them: ISO text for times, REAL for money.
                    row = tuple(_sqlite_value(v) for v in row)
                chunk.append(row)
                if len(chunk) >= _CHUNK:
                    cur.executemany(sql, chunk)
                    total += len(chunk)
                    chunk = []
            if chunk:
                cur.executemany(sql, chunk)
                total += len(chunk)
            raw.commit()
        finally:
            raw.close()
    finally:
        engine.dispose()
    return total


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, Decimal):
        return float(value)
    return value
