"""A vendor-style HIS in MariaDB: five tables named as Chinese HIS vendors name them, the
settlement query a hospital would write for crowd-sync, and a fast seeder.

    gy_brxx   病人信息 patient master: brid, brxm, xb, csrq, zjlx (证件类型), zjhm (证件号码),
              lxdh, jtdz, zdrqbz (重点人群标志), jdrq
    jz_jzjl   就诊登记 visits: jzid, jzlsh (就诊流水号), jzlx (1 住院 / 2 门诊), jzhm (住院号/门诊号),
              brid, ksdm, ysgh, jzrq (入院/就诊时间), cyrq (出院时间), zddm (主诊断), jzzt
    sf_jsd    结算单 settlement headers: jsid, jzid, jslx, jsrq (结算时间), zfbz (0 有效 / 1 作废), czygh, fphm
    sf_jsfy   结算费用汇总 fee summary per settlement: jsid, zje, ybzf, grzf, yjj, qfje
    zd_icd    ICD-10 诊断字典: icddm, icdmc, pydm, yxbz

Visits settle ``ROWS_PER_DAY`` a day from ``START`` (one every 8.64 s), so a window of whole
days holds a known number of them. A quarter are inpatients; about 2.5 visits per
patient; 2 % of patients carry a passport; every visit of a flagged patient (10 % of the
visits) is key population; 2 % of visits were settled once before, and that settlement
voided; 2 % have no main diagnosis.

The seeded database (``crowd_sync_bench_vendor_<visits>``) is kept between runs and used
again while its ``bench_seed`` row matches ``SCHEMA_VERSION`` and the row count: seeding a
million visits takes minutes, reading them is what is measured.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql

from bench.databases import PREFIX, mariadb_url
from bench.seed import resident_id

# Bump when the tables or the generator change: a kept database is then seeded again.
SCHEMA_VERSION = "vendor-1"
START = datetime(2024, 1, 1)
ROWS_PER_DAY = 10_000
_SECONDS_PER_ROW_X100 = 86_400 * 100 // ROWS_PER_DAY  # 864: 8.64 s apart

# The hospital's query, as it would stand in settings.yaml (his.query). STRAIGHT_JOIN keeps
# MariaDB joining from the settlements outward, by primary keys, in settlement order. Left to
# itself, for a window of the whole history the optimizer starts from the smaller patient table
# and reaches the visits and settlements through secondary indexes in random order; with
# this machine's 128 MB buffer pool and O_DIRECT that is a disk-bound read (1,000,000 rows
# in 130 s at 12 s of client CPU), which would measure the disk, not the read.
QUERY = """\
SELECT
    jz.jzlsh                    AS lsh,
    jz.jzhm                     AS code,
    CASE br.zjlx WHEN '01' THEN '10' WHEN '02' THEN '30' WHEN '06' THEN '43'
                 WHEN '05' THEN '44' WHEN '03' THEN '50' ELSE '60' END AS card_type,
    br.zjhm                     AS card_no,
    jz.jzlx                     AS visit_type,
    jz.jzrq                     AS enter_date,
    jz.cyrq                     AS leave_date,
    br.zdrqbz                   AS key_crowd,
    icd.icdmc                   AS icd_name,
    jz.zddm                     AS icd_code,
    fy.zje                      AS total_fee,
    fy.ybzf                     AS ins_fee,
    COALESCE(fy.yjj, 0)         AS total_prepayment,
    COALESCE(fy.qfje, 0)        AS deficient_fee,
    js.jsrq                     AS settlement_date,
    js.jsrq                     AS changed_at
FROM sf_jsd js
STRAIGHT_JOIN jz_jzjl jz ON jz.jzid = js.jzid
STRAIGHT_JOIN gy_brxx br ON br.brid = jz.brid
STRAIGHT_JOIN sf_jsfy fy ON fy.jsid = js.jsid
LEFT JOIN zd_icd icd ON icd.icddm = jz.zddm
WHERE js.zfbz = '0'
  AND js.jsrq >= :since AND js.jsrq < :until
"""

# Primary keys only: the secondary indexes are built after the load (faster than row by row).
_TABLES = {
    "gy_brxx": """
        brid BIGINT NOT NULL COMMENT '病人ID',
        brxm VARCHAR(50) NOT NULL COMMENT '姓名',
        xb CHAR(1) NOT NULL COMMENT '性别 1男 2女',
        csrq DATE NULL COMMENT '出生日期',
        zjlx CHAR(2) NOT NULL COMMENT '证件类型 01身份证 03护照',
        zjhm VARCHAR(40) NOT NULL COMMENT '证件号码',
        lxdh VARCHAR(20) NULL COMMENT '联系电话',
        jtdz VARCHAR(200) NULL COMMENT '家庭地址',
        zdrqbz CHAR(1) NOT NULL DEFAULT '0' COMMENT '重点人群标志',
        jdrq DATETIME NOT NULL COMMENT '建档日期',
        PRIMARY KEY (brid)""",
    "jz_jzjl": """
        jzid BIGINT NOT NULL COMMENT '就诊ID',
        jzlsh VARCHAR(32) NOT NULL COMMENT '就诊流水号',
        jzlx CHAR(1) NOT NULL COMMENT '就诊类型 1住院 2门诊',
        jzhm VARCHAR(20) NOT NULL COMMENT '住院号/门诊号',
        brid BIGINT NOT NULL COMMENT '病人ID',
        ksdm VARCHAR(10) NOT NULL COMMENT '科室代码',
        ysgh VARCHAR(10) NOT NULL COMMENT '医生工号',
        jzrq DATETIME NOT NULL COMMENT '入院/就诊时间',
        cyrq DATETIME NULL COMMENT '出院时间',
        zddm VARCHAR(20) NULL COMMENT '主诊断ICD编码',
        jzzt CHAR(1) NOT NULL COMMENT '就诊状态',
        PRIMARY KEY (jzid)""",
    "sf_jsd": """
        jsid BIGINT NOT NULL COMMENT '结算ID',
        jzid BIGINT NOT NULL COMMENT '就诊ID',
        jslx CHAR(1) NOT NULL COMMENT '结算类型',
        jsrq DATETIME NOT NULL COMMENT '结算时间',
        zfbz CHAR(1) NOT NULL DEFAULT '0' COMMENT '作废标志 0有效 1作废',
        czygh VARCHAR(10) NOT NULL COMMENT '操作员工号',
        fphm VARCHAR(20) NULL COMMENT '发票号码',
        PRIMARY KEY (jsid)""",
    "sf_jsfy": """
        jsid BIGINT NOT NULL COMMENT '结算ID',
        zje DECIMAL(12,2) NOT NULL COMMENT '总金额',
        ybzf DECIMAL(12,2) NOT NULL COMMENT '医保支付',
        grzf DECIMAL(12,2) NOT NULL COMMENT '个人支付',
        yjj DECIMAL(12,2) NULL COMMENT '预交金',
        qfje DECIMAL(12,2) NULL COMMENT '欠费金额',
        PRIMARY KEY (jsid)""",
    "zd_icd": """
        icddm VARCHAR(20) NOT NULL COMMENT 'ICD编码',
        icdmc VARCHAR(200) NOT NULL COMMENT '诊断名称',
        pydm VARCHAR(50) NULL COMMENT '拼音码',
        yxbz CHAR(1) NOT NULL DEFAULT '1' COMMENT '有效标志',
        PRIMARY KEY (icddm)""",
}
_COLUMNS = {
    "gy_brxx": "brid, brxm, xb, csrq, zjlx, zjhm, lxdh, jtdz, zdrqbz, jdrq",
    "jz_jzjl": "jzid, jzlsh, jzlx, jzhm, brid, ksdm, ysgh, jzrq, cyrq, zddm, jzzt",
    "sf_jsd": "jsid, jzid, jslx, jsrq, zfbz, czygh, fphm",
    "sf_jsfy": "jsid, zje, ybzf, grzf, yjj, qfje",
    "zd_icd": "icddm, icdmc, pydm, yxbz",
}
# The indexes a HIS has for its own screens and for this query.
_INDEXES = (
    "ALTER TABLE gy_brxx ADD INDEX idx_gy_brxx_zjhm (zjhm)",
    "ALTER TABLE jz_jzjl ADD UNIQUE INDEX uk_jz_jzjl_jzlsh (jzlsh), ADD INDEX idx_jz_jzjl_brid (brid), "
    "ADD INDEX idx_jz_jzjl_jzrq (jzrq)",
    "ALTER TABLE sf_jsd ADD INDEX idx_sf_jsd_jsrq (jsrq), ADD INDEX idx_sf_jsd_jzid (jzid, zfbz)",
    "ALTER TABLE zd_icd ADD INDEX idx_zd_icd_pydm (pydm)",
)

_ICD = (
    ("I10.x00", "原发性高血压", "YFXGXY"), ("E11.900", "2型糖尿病", "2XTNB"), ("J06.900", "急性上呼吸道感染", "JXSHXDGR"),
    ("K29.700", "胃炎", "WY"), ("J18.900", "肺炎", "FY"), ("I25.103", "冠状动脉粥样硬化性心脏病", "GZDMZYYHXXZB"),
    ("I63.900", "脑梗死", "NGS"), ("N18.900", "慢性肾脏病", "MXSZB"), ("M54.500", "腰痛", "YT"),
    ("J44.900", "慢性阻塞性肺疾病", "MXZSXFJB"), ("K80.200", "胆囊结石", "DNJS"), ("O80.000", "单胎顺产", "DTSC"),
    ("J20.900", "急性支气管炎", "JXZQGY"), ("E78.500", "高脂血症", "GZXZ"), ("I48.x01", "心房颤动", "XFCD"),
    ("K35.800", "急性阑尾炎", "JXLWY"), ("S72.000", "股骨颈骨折", "GGJGZ"), ("C34.900", "肺恶性肿瘤", "FEXZL"),
    ("N39.000", "泌尿道感染", "MNDGR"), ("M17.900", "膝关节病", "XGJB"),
)
_ICD_CODES = 2000  # the common ones above, then the rest of a dictionary
_DEPTS = ("0101", "0102", "0201", "0301", "0401", "0502", "0601", "0703", "0801", "0902")
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
_GIVEN = ("伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明", "超", "秀兰", "霞")
_ROADS = ("光华大道", "凤凰大道", "柳城大道", "江安路", "杨柳东路", "南熏大道", "万春路", "德通桥路")


@dataclass(frozen=True, kw_only=True)
class Seeded:
    url: str
    database: str
    visits: int
    patients: int
    settlements: int
    reused: bool
    generate_s: float
    load_s: float
    index_s: float

    @property
    def seed_s(self) -> float:
        return self.generate_s + self.load_s + self.index_s


def database_name(visits: int) -> str:
    return f"{PREFIX}vendor_{visits}"


def window(days: int) -> tuple[datetime, datetime]:
    """``[since, until)`` of the first ``days`` days: ``days * ROWS_PER_DAY`` visits."""
    return START, START + timedelta(days=days)


def days_for(visits: int) -> int:
    return -(-visits // ROWS_PER_DAY)


def patients_for(visits: int) -> int:
    # A multiple of ten, so that exactly one visit in ten is of a flagged patient (see _visit).
    return max(10, visits * 2 // 5 // 10 * 10)


def ensure(visits: int, *, reseed: bool = False, say: Callable[[str], None] = print) -> Seeded:
    """The vendor HIS with ``visits`` settled visits: the kept one when it matches, else seeded now."""
    db = database_name(visits)
    conn = _connect(None)
    try:
        with conn.cursor() as cur:
            found = None if reseed else _marker(cur, db)
            if found is not None and found["version"] == SCHEMA_VERSION and found["visits"] == visits:
                cur.execute(f"SELECT COUNT(*) FROM {db}.sf_jsd")
                if cur.fetchone()[0] == found["settlements"]:
                    return Seeded(
                        url=mariadb_url(db), database=db, visits=visits, patients=found["patients"],
                        settlements=found["settlements"], reused=True, generate_s=found["generate_s"],
                        load_s=found["load_s"], index_s=found["index_s"],
                    )
            say(f"  seeding {db}: {visits:,} visits (kept for later runs)")
            cur.execute(f"DROP DATABASE IF EXISTS {db}")
            cur.execute(f"CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    finally:
        conn.close()
    return _seed(db, visits)


def drop(visits: int) -> None:
    conn = _connect(None)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {database_name(visits)}")
    finally:
        conn.close()


def _connect(database: str | None) -> Any:
    return pymysql.connect(
        host="127.0.0.1", port=3306, user="root", password="", database=database, charset="utf8mb4",
        local_infile=True, autocommit=True,
    )


def _marker(cur: Any, db: str) -> dict[str, Any] | None:
    cur.execute(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = 'bench_seed'", (db,)
    )
    if not cur.fetchone()[0]:
        return None
    cur.execute(f"SELECT version, visits, patients, settlements, generate_s, load_s, index_s FROM {db}.bench_seed")
    row = cur.fetchone()
    if row is None:
        return None
    keys = ("version", "visits", "patients", "settlements", "generate_s", "load_s", "index_s")
    return dict(zip(keys, row, strict=True))


def _seed(db: str, visits: int) -> Seeded:
    patients = patients_for(visits)
    conn = _connect(db)
    try:
        with tempfile.TemporaryDirectory(prefix="crowd-sync-vendor-") as tmp, conn.cursor() as cur:
            # Session-only: the server is shared, its global settings stay as they are.
            cur.execute("SET SESSION unique_checks = 0, foreign_key_checks = 0")
            for table, columns in _TABLES.items():
                cur.execute(f"CREATE TABLE {table} ({columns}\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4")
            started = time.perf_counter()
            files = _write_files(Path(tmp), visits, patients)
            generate_s = time.perf_counter() - started
            started = time.perf_counter()
            for table, (path, _count) in files.items():
                cur.execute(
                    f"LOAD DATA LOCAL INFILE %s INTO TABLE {table} CHARACTER SET utf8mb4 "
                    f"FIELDS TERMINATED BY '\\t' LINES TERMINATED BY '\\n' ({_COLUMNS[table]})",
                    (str(path),),
                )
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            for statement in _INDEXES:
                cur.execute(statement)
            cur.execute(f"ANALYZE TABLE {', '.join(_TABLES)}")
            cur.fetchall()
            index_s = time.perf_counter() - started
            settlements = files["sf_jsd"][1]
            # Written last: a seed cut short has no marker and is seeded again next time.
            cur.execute(
                "CREATE TABLE bench_seed (version VARCHAR(20), visits INT, patients INT, settlements INT, "
                "generate_s DOUBLE, load_s DOUBLE, index_s DOUBLE, seeded_at DATETIME)"
            )
            cur.execute(
                "INSERT INTO bench_seed VALUES (%s, %s, %s, %s, %s, %s, %s, NOW())",
                (SCHEMA_VERSION, visits, patients, settlements, generate_s, load_s, index_s),
            )
    finally:
        conn.close()
    return Seeded(
        url=mariadb_url(db), database=db, visits=visits, patients=patients, settlements=settlements, reused=False,
        generate_s=generate_s, load_s=load_s, index_s=index_s,
    )


# -- the generator -------------------------------------------------------------------------


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _icd_rows() -> Iterator[str]:
    for code, name, py in _ICD:
        yield f"{code}\t{name}\t{py}\t1\n"
    for n in range(len(_ICD), _ICD_CODES):
        letter = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[n % 26]
        yield f"{letter}{n % 100:02d}.{n:03d}\t其他疾病{n}\tQTJB{n}\t1\n"


def icd_code(n: int) -> str:
    """The dictionary's ``n``-th code."""
    if n < len(_ICD):
        return _ICD[n][0]
    return f"{'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[n % 26]}{n % 100:02d}.{n:03d}"


def _patient_rows(patients: int) -> Iterator[str]:
    born0 = date(1950, 1, 1)
    for p in range(patients):
        passport = p % 50 == 1
        number = f"E{p:08d}" if passport else resident_id(p)
        born = born0 + timedelta(days=p % 20000)  # as resident_id() encodes it
        name = _SURNAMES[p % len(_SURNAMES)] + _GIVEN[(p // len(_SURNAMES)) % len(_GIVEN)]
        yield (
            f"{p + 1}\t{name}\t{1 + p % 2}\t{born}\t{'03' if passport else '01'}\t{number}\t"
            f"13{(p * 7919) % 10**9:09d}\t四川省成都市温江区{_ROADS[p % len(_ROADS)]}{p % 300 + 1}号\t"
            f"{'1' if p % 10 == 3 else '0'}\t{START - timedelta(days=1 + p % 3000, seconds=p % 86400)}\n"
        )


def _write_files(tmp: Path, visits: int, patients: int) -> dict[str, tuple[Path, int]]:
    paths = {table: tmp / f"{table}.tsv" for table in _TABLES}
    counts = dict.fromkeys(_TABLES, 0)
    with paths["zd_icd"].open("w", encoding="utf-8") as f:
        for line in _icd_rows():
            f.write(line)
            counts["zd_icd"] += 1
    with paths["gy_brxx"].open("w", encoding="utf-8") as f:
        for line in _patient_rows(patients):
            f.write(line)
            counts["gy_brxx"] += 1
    icd = [icd_code(n) for n in range(_ICD_CODES)]
    jsid = 0
    with (
        paths["jz_jzjl"].open("w", encoding="utf-8") as fj,
        paths["sf_jsd"].open("w", encoding="utf-8") as fs,
        paths["sf_jsfy"].open("w", encoding="utf-8") as ff,
    ):
        for i in range(visits):
            jzid = i + 1
            inpatient = i % 4 == 0
            settled = START + timedelta(seconds=i * _SECONDS_PER_ROW_X100 // 100)
            if inpatient:
                entered = settled - timedelta(days=3 + i % 9, hours=i % 11)
                left = str(settled - timedelta(minutes=30 + i % 90))
                total = 200_000 + (i * 104_729) % 4_800_000
                deposit = _money((total // 100_000 + 1) * 100_000)
            else:
                entered = settled - timedelta(seconds=600 + (i * 37) % 7200)
                left = "\\N"
                total = 1_500 + (i * 7919) % 150_000
                deposit = "\\N"
            insured = total * 6 // 10
            owed = "10.00" if i % 97 == 0 else ("0.00" if inpatient else "\\N")
            diagnosis = "\\N" if i % 50 == 13 else icd[(i * 31) % _ICD_CODES]
            fj.write(
                f"{jzid}\t{'ZY' if inpatient else 'MZ'}{jzid:010d}\t{'1' if inpatient else '2'}\t"
                f"{'Z' if inpatient else 'M'}{jzid:09d}\t{(i * 7919) % patients + 1}\t{_DEPTS[i % len(_DEPTS)]}\t"
                f"{1000 + i % 300}\t{entered}\t{left}\t{diagnosis}\t{'3' if inpatient else '2'}\n"
            )
            fees = f"\t{_money(total)}\t{_money(insured)}\t{_money(total - insured)}\t{deposit}\t{owed}\n"
            if i % 50 == 11:
                # Settled once, voided (反结算), settled again: only the second one is valid.
                jsid += 1
                fs.write(f"{jsid}\t{jzid}\t{'1' if inpatient else '2'}\t{settled - timedelta(hours=1)}\t1\t{200 + i % 40}\t\\N\n")
                ff.write(f"{jsid}{fees}")
            jsid += 1
            fs.write(f"{jsid}\t{jzid}\t{'1' if inpatient else '2'}\t{settled}\t0\t{200 + i % 40}\tFP{jsid:012d}\n")
            ff.write(f"{jsid}{fees}")
    counts["jz_jzjl"] = visits
    counts["sf_jsd"] = counts["sf_jsfy"] = jsid
    return {table: (paths[table], counts[table]) for table in _TABLES}
