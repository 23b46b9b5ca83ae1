"""Test building blocks: a small HIS on any database, valid visits, settings files."""

from __future__ import annotations

import logging
import random
import textwrap
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import structlog
import yaml
from structlog.testing import LogCapture

from sync import idcard
from sync import settings as settings_mod
from sync.settings import Settings
from sync.upstream.simulator import TEST_APP_KEY, TEST_PASSWORD, TEST_USERNAME

his_meta = sa.MetaData()
# Column names differ from the canonical ones, as in a real HIS; the query aliases them.
his_visits = sa.Table(
    "his_settlement",
    his_meta,
    sa.Column("serial_no", sa.String(80), primary_key=True),
    sa.Column("visit_no", sa.String(60)),
    sa.Column("id_type", sa.String(4)),
    sa.Column("id_no", sa.String(40)),
    sa.Column("kind", sa.Integer),
    sa.Column("admitted", sa.DateTime),
    sa.Column("discharged", sa.DateTime, nullable=True),
    sa.Column("is_key", sa.String(1), nullable=True),
    sa.Column("diag_name", sa.String(300), nullable=True),
    sa.Column("diag_code", sa.String(120), nullable=True),
    sa.Column("total", sa.Numeric(12, 2)),
    sa.Column("insurance", sa.Numeric(12, 2)),
    sa.Column("deposit", sa.Numeric(12, 2)),
    sa.Column("owed", sa.Numeric(12, 2)),
    sa.Column("settled", sa.DateTime),
    sa.Column("changed", sa.DateTime, index=True),
)

HIS_QUERY = """\
SELECT serial_no AS lsh, visit_no AS code, id_type AS card_type, id_no AS card_no,
       kind AS visit_type, admitted AS enter_date, discharged AS leave_date, is_key AS key_crowd,
       diag_name AS icd_name, diag_code AS icd_code, total AS total_fee, insurance AS ins_fee,
       deposit AS total_prepayment, owed AS deficient_fee, settled AS settlement_date, changed AS changed_at
FROM his_settlement
WHERE changed >= :since AND changed < :until
"""


def id_number(rng: random.Random) -> str:
    born = date(1950, 1, 1) + timedelta(days=rng.randrange(0, 365 * 60))
    return idcard.make("510104", born, rng.randrange(0, 999))


def make_visit(n: int, *, changed: datetime, rng: random.Random | None = None, **over: Any) -> dict[str, Any]:
    """A valid settled visit as the HIS table holds it (not yet canonical)."""
    r = rng or random.Random(n)
    inpatient = n % 3 == 0
    admitted = (changed - timedelta(days=5 if inpatient else 0)).replace(microsecond=0)
    total = Decimal(r.randrange(5000, 900000)) / 100
    ins = (total * Decimal("0.6")).quantize(Decimal("0.01"))
    row: dict[str, Any] = {
        "serial_no": f"LSH{n:06d}",
        "visit_no": f"{'ZY' if inpatient else 'MZ'}{n:06d}",
        "id_type": "10",
        "id_no": id_number(r),
        "kind": 1 if inpatient else 2,
        "admitted": admitted,
        "discharged": admitted + timedelta(days=4) if inpatient else None,
        "is_key": "1",
        "diag_name": "原发性高血压",
        "diag_code": "I10.x00",
        "total": total,
        "insurance": ins,
        "deposit": Decimal("0.00") if n % 2 else Decimal("1000.00"),
        "owed": Decimal("0.00"),
        "settled": changed.replace(microsecond=0),
        "changed": changed.replace(microsecond=0),
    }
    row.update(over)
    return row


def expected_payload(v: Mapping[str, Any], *, key_crowd: str = "1") -> dict[str, Any]:
    """What the platform must hold for a HIS row, computed independently of sync.records."""
    p: dict[str, Any] = {
        "cardType": v["id_type"],
        "cardNo": v["id_no"],
        "type": str(v["kind"]),
        "lsh": v["serial_no"],
        "code": v["visit_no"],
        "enterDate": v["admitted"].strftime("%Y-%m-%d"),
        "keyCrowd": key_crowd,
        "totalFee": Decimal(v["total"]).quantize(Decimal("0.01")),
        "insFee": Decimal(v["insurance"]).quantize(Decimal("0.01")),
        "totalPrepayment": Decimal(v["deposit"]).quantize(Decimal("0.01")),
        "deficientFee": Decimal(v["owed"]).quantize(Decimal("0.01")),
        "settlementDate": v["settled"].strftime("%Y-%m-%d"),
    }
    if v.get("discharged") is not None:
        p["leaveDate"] = v["discharged"].strftime("%Y-%m-%d")
    if v.get("diag_name"):
        p["icdName"] = v["diag_name"]
    if v.get("diag_code"):
        p["icdCode"] = v["diag_code"]
    return p


# One HIS shared by the members of a county medical alliance: `org` names each visit's
# institution, and serial numbers are unique only within one (the document: 院内唯一).
his_alliance_visits = sa.Table(
    "his_alliance_settlement",
    his_meta,
    sa.Column("org", sa.String(40), primary_key=True),
    *(sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable) for c in his_visits.columns),
)
ALLIANCE_QUERY = HIS_QUERY.replace("FROM his_settlement", ", org AS institution\nFROM his_alliance_settlement")


def alliance_settings(
    path: Path, *, his_url: str, outbox_url: str, base_url: str, members: Sequence[Mapping[str, str]],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Settings of an alliance over ALLIANCE_QUERY: ``members`` are institutions: entries."""
    data: dict[str, Any] = {
        "institutions": [dict(m) for m in members],
        "upstream": {"env": "test", "base_url": base_url, "timeout_s": 5, "concurrency": 4, "rate_limit_per_s": 1000},
        "his": {"url": his_url, "query": ALLIANCE_QUERY, "settle_delay_s": 0, "lookback_s": 600},
        "key_crowd": {"source": "column"},
        "outbox": {"url": outbox_url},
        "retry": {"first_delay_s": 1, "max_delay_s": 60},
        "log": {"format": "json", "level": "info"},
    }
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return settings_mod.load(path)


class His:
    """A HIS database under test: create, insert, re-settle."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(url)
        his_meta.create_all(self.engine)

    def insert(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if rows:
            with self.engine.begin() as conn:
                conn.execute(his_visits.insert(), rows)

    def update(self, serial_no: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(his_visits.update().where(his_visits.c.serial_no == serial_no).values(**values))

    def insert_alliance(self, org: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Visits of one member of the alliance (``his_alliance_settlement``)."""
        rows = [{**r, "org": org} for r in rows]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(his_alliance_visits.insert(), rows)

    def now(self) -> datetime:
        from sync.his import HisSource
        from sync.settings import His as HisSettings

        src = HisSource(HisSettings(url=self.url, query=HIS_QUERY), need_key_crowd=False)  # type: ignore[arg-type]
        try:
            return src.now()
        finally:
            src.dispose()

    def dispose(self) -> None:
        self.engine.dispose()


def write_settings(
    path: Path,
    *,
    his_url: str,
    outbox_url: str,
    base_url: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    data: dict[str, Any] = {
        "institution": {"name": "测试医院", "county_code": "511425"},
        "upstream": {
            "env": "test",
            "base_url": base_url,
            "app_key": TEST_APP_KEY,
            "username": TEST_USERNAME,
            "password": TEST_PASSWORD,
            "timeout_s": 5,
            "concurrency": 4,
            "rate_limit_per_s": 1000,
        },
        "his": {"url": his_url, "query": HIS_QUERY, "settle_delay_s": 0, "lookback_s": 600},
        "key_crowd": {"source": "column"},
        "outbox": {"url": outbox_url},
        "retry": {"first_delay_s": 1, "max_delay_s": 60},
        "log": {"format": "json", "level": "info"},
    }
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return settings_mod.load(path)


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip()


@contextmanager
def capture_all_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every structlog event, whatever level an earlier ``logs.configure`` left behind."""
    saved = structlog.get_config()
    capture = LogCapture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**saved)


HIS_ZONE = ZoneInfo("Asia/Shanghai")  # schedule.timezone's default, hence the HIS's zone in these tests


def his_now() -> datetime:
    """Now as the test HIS writes its datetimes: China time, whatever the zone of this host or of
    the database server (crowd-sync reads the database's UTC clock in his.timezone)."""
    return datetime.now(HIS_ZONE).replace(tzinfo=None, microsecond=0)
