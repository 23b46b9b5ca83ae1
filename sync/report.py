"""The month's report: uploaded key-population visits as the province counts them.

The province builds its "treat first, pay later" statistics from the uploaded
records alone, and counts a visit as having enjoyed the policy when its
``totalPrepayment`` (inpatient deposit) is 0. So the figures here come from the
payloads as the platform accepted them (``sync_outbox.payload`` of sent rows),
never from the HIS, whose rows may have changed since. Beside them: what of the
month is not upstream yet, which the province's figures lack until it is sent.

The month is the settlement month (``sync_outbox.settlement_date``), filtered in
SQL so that the settlement_date index does the work on a large outbox.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

import structlog

from sync import display as _display
from sync.outbox.model import Status
from sync.outbox.store import Store
from sync.records import INPATIENT, OUTPATIENT

__all__ = [
    "MonthReport",
    "Uploaded",
    "csv_bytes",
    "month_bounds",
    "month_report",
    "parse_month",
    "render_table",
]

log = structlog.get_logger(__name__)

# Rows whose visit type is missing or not 1/2 (only invalid ones can be): kept
# apart so that inpatient + outpatient never silently absorbs them.
UNKNOWN = "?"
VISIT_TYPES = (INPATIENT, OUTPATIENT, UNKNOWN)
NOT_UPSTREAM = (Status.PENDING, Status.FAILED, Status.INVALID, Status.DEAD)
ZERO = Decimal("0.00")
_CENT = Decimal("0.01")
_MONTH = re.compile(r"(\d{4})-(\d{2})")


def parse_month(text: str) -> date:
    """``YYYY-MM`` -> the first day of that month; ValueError saying what is expected."""
    m = _MONTH.fullmatch(text.strip())
    if m is None or not 1 <= int(m.group(2)) <= 12 or int(m.group(1)) < 1900:
        raise ValueError(f"{text!r} is not a month YYYY-MM (for example 2026-10)")
    return date(int(m.group(1)), int(m.group(2)), 1)


def month_bounds(month: date) -> tuple[date, date]:
    """The first day of the month and the first day of the next (half-open range)."""
    first = month.replace(day=1)
    after = date(first.year + 1, 1, 1) if first.month == 12 else date(first.year, first.month + 1, 1)
    return first, after


@dataclass(frozen=True, kw_only=True)
class Uploaded:
    """Key-population visits the platform holds, and their money (yuan, Decimal)."""

    visits: int = 0
    zero_deposit: int = 0  # totalPrepayment = 0: the province counts the policy as enjoyed
    with_deposit: int = 0
    total_fee: Decimal = ZERO
    ins_fee: Decimal = ZERO
    deficient_fee: Decimal = ZERO

    def __add__(self, other: Uploaded) -> Uploaded:
        return Uploaded(
            visits=self.visits + other.visits,
            zero_deposit=self.zero_deposit + other.zero_deposit,
            with_deposit=self.with_deposit + other.with_deposit,
            total_fee=self.total_fee + other.total_fee,
            ins_fee=self.ins_fee + other.ins_fee,
            deficient_fee=self.deficient_fee + other.deficient_fee,
        )

    @classmethod
    def of(cls, payload: Mapping[str, Any]) -> Uploaded:
        """One visit's figures from its payload as sent."""
        zero = _money(payload.get("totalPrepayment")) == 0
        return cls(
            visits=1,
            zero_deposit=1 if zero else 0,
            with_deposit=0 if zero else 1,
            total_fee=_money(payload.get("totalFee")),
            ins_fee=_money(payload.get("insFee")),
            deficient_fee=_money(payload.get("deficientFee")),
        )


def _total(values: Iterable[Uploaded]) -> Uploaded:
    result = Uploaded()
    for value in values:
        result = result + value
    return result


@dataclass(frozen=True, kw_only=True)
class MonthReport:
    """One settlement month; every mapping is keyed by visit type ("1", "2", "?")."""

    month: date  # the first day
    uploaded: Mapping[str, Uploaded]
    not_upstream: Mapping[str, Mapping[str, int]]  # status -> visit type -> visits
    skipped: Mapping[str, int]  # not key population: not uploaded at all
    # Sent with keyCrowd "0" (upload_only_key_crowd: false): upstream, but outside
    # the province's key-population figures.
    sent_not_key_crowd: Mapping[str, int] = field(default_factory=dict)
    unreadable: int = 0  # sent rows whose payload is not JSON (never written by crowd-sync)
    institution: str | None = None  # one institution of an alliance ("code name"); None: all

    @property
    def label(self) -> str:
        return f"{self.month:%Y-%m}"

    def uploaded_total(self) -> Uploaded:
        return _total(self.uploaded.values())

    def waiting(self) -> int:
        """Visits of the month not upstream yet (pending, failed, invalid, dead)."""
        return sum(sum(by_type.values()) for by_type in self.not_upstream.values())


def _money(value: Any) -> Decimal:
    # Through str: an int or text amount becomes an exact Decimal; parse_float
    # already made the payload's numbers Decimal, never float.
    return ZERO if value is None or value == "" else Decimal(str(value))


def _visit_type(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    return text if text in (INPATIENT, OUTPATIENT) else UNKNOWN


def month_report(store: Store, month: date, institution: str | None = None, label: str | None = None) -> MonthReport:
    """Read the month's figures from the outbox (read-only, streamed); of one institution
    (``label``: how it is named) when ``institution`` is given."""
    first, after = month_bounds(month)
    uploaded: dict[str, Uploaded] = {t: Uploaded() for t in VISIT_TYPES}
    not_upstream: dict[str, dict[str, int]] = {s.value: dict.fromkeys(VISIT_TYPES, 0) for s in NOT_UPSTREAM}
    skipped = dict.fromkeys(VISIT_TYPES, 0)
    not_key = dict.fromkeys(VISIT_TYPES, 0)
    unreadable = 0
    # Counts of what is not upstream: the database aggregates, no payload travels.
    for status, visit_type, n in store.month_counts(first, after, institution):
        kind = _visit_type(visit_type)
        if status == Status.SKIPPED.value:
            skipped[kind] += n
        elif status in not_upstream:
            not_upstream[status][kind] += n
    for lsh, text in store.month_sent(first, after, institution):
        try:
            payload = json.loads(text, parse_float=Decimal)
        except (TypeError, ValueError):
            payload = None
        if not isinstance(payload, dict):
            log.warning("report_payload_unreadable", lsh=lsh)
            unreadable += 1
            continue
        kind = _visit_type(payload.get("type"))
        if str(payload.get("keyCrowd")) != "1":
            not_key[kind] += 1
            continue
        uploaded[kind] = uploaded[kind] + Uploaded.of(payload)
    return MonthReport(
        month=first, uploaded=uploaded, not_upstream=not_upstream, skipped=skipped,
        sent_not_key_crowd=not_key, unreadable=unreadable, institution=label if institution is not None else None,
    )


# -- presentation -----------------------------------------------------------------

_STATUS_LABELS = {
    Status.PENDING.value: ("待发送", "pending"),
    Status.FAILED.value: ("失败待重试", "failed"),
    Status.INVALID.value: ("数据不合规", "invalid"),
    Status.DEAD.value: ("已放弃", "dead"),
}
_COLUMNS = {
    INPATIENT: ("住院", "inpatient"),
    OUTPATIENT: ("门诊", "outpatient"),
    UNKNOWN: ("类型未知", "type unknown"),
}


@dataclass(frozen=True, kw_only=True)
class _Line:
    code: str  # stable machine name, the CSV's key column
    zh: str
    en: str
    values: Mapping[str, str]  # visit type -> text
    total: str
    indent: int = 0


def _cents(value: Decimal) -> str:
    return format(value.quantize(_CENT), "f")


def _lines(r: MonthReport) -> list[_Line]:
    def counts(code: str, zh: str, en: str, by_type: Mapping[str, int], indent: int = 0) -> _Line:
        return _Line(
            code=code, zh=zh, en=en, values={t: str(by_type.get(t, 0)) for t in VISIT_TYPES},
            total=str(sum(by_type.values())), indent=indent,
        )

    def uploaded(code: str, zh: str, en: str, attr: str, indent: int = 1) -> _Line:
        def text(u: Uploaded) -> str:
            value = getattr(u, attr)
            return _cents(value) if isinstance(value, Decimal) else str(value)

        return _Line(
            code=code, zh=zh, en=en, values={t: text(r.uploaded[t]) for t in VISIT_TYPES},
            total=text(r.uploaded_total()), indent=indent,
        )

    waiting = {t: sum(by_type[t] for by_type in r.not_upstream.values()) for t in VISIT_TYPES}
    lines = [
        uploaded("uploaded", "已上传重点人群就诊", "key-population visits uploaded", "visits", indent=0),
        uploaded("zero_deposit", "零预交金(享受政策)", "zero deposit (policy enjoyed)", "zero_deposit"),
        uploaded("with_deposit", "有预交金", "with a deposit", "with_deposit"),
        uploaded("total_fee", "总费用", "total fees", "total_fee"),
        uploaded("ins_fee", "医保支付", "paid by insurance", "ins_fee"),
        uploaded("deficient_fee", "欠费金额", "amounts owed", "deficient_fee"),
        counts("not_upstream", "尚未上传", "not upstream yet", waiting),
    ]
    for status, (zh, en) in _STATUS_LABELS.items():
        lines.append(counts(status, zh, en, r.not_upstream.get(status, {}), indent=1))
    lines.append(counts("skipped", "非重点人群(不上传)", "not key population, skipped", r.skipped))
    lines.append(
        counts("sent_not_key_crowd", "上传时非重点人群(不计入)", "sent with keyCrowd 0, not counted", r.sent_not_key_crowd)
    )
    return lines


def render_table(r: MonthReport, *, outbox: str | None = None) -> str:
    """The readable table for the terminal (Chinese labels with English)."""
    lines = _lines(r)
    # The unknown-type column only when some row has one: it is nearly always empty.
    types = [t for t in VISIT_TYPES if t != UNKNOWN or any(line.values[t] not in ("0", "0.00") for line in lines)]
    # Two header lines (Chinese over English) keep the number columns narrow.
    headers = ["项目", *(_COLUMNS[t][0] for t in types), "合计"]
    headers_en = ["item", *(_COLUMNS[t][1] for t in types), "total"]
    rows = [
        ["  " * line.indent + f"{line.zh} {line.en}"] + [line.values[t] for t in types] + [line.total]
        for line in lines
    ]
    widths = [max(_display.width(row[i]) for row in [headers, headers_en, *rows]) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        cells = [_display.ljust(row[0], widths[0])] + [_display.rjust(cell, widths[i]) for i, cell in enumerate(row[1:], start=1)]
        return "  ".join(cells).rstrip()

    out = [f"crowd-sync 月报 / monthly report {r.label} (按结算日期 by settlement date)"]
    if r.institution:
        out[0] += f" — 机构 institution {r.institution}"
    if outbox:
        out.append(f"outbox {outbox}")
    out += ["", fmt(headers), fmt(headers_en), "-" * _display.width(fmt(headers_en)), *(fmt(row) for row in rows), ""]
    out.append("金额单位：元 / amounts in yuan. 已上传的数字取自平台接受的报文 / from the payloads as the platform accepted them.")
    waiting = r.waiting()
    if waiting:
        out.append(
            f"注意 note: {waiting} 条本月就诊尚未上传，省平台统计暂不含这些 / {waiting} visit(s) of this month are not "
            "upstream yet and missing from the province's figures: see `crowd-sync status` and docs/dba.md."
        )
    if r.unreadable:
        out.append(f"注意 note: {r.unreadable} sent row(s) have a payload that is not JSON and are not counted.")
    return "\n".join(out)


def csv_bytes(r: MonthReport) -> bytes:
    """The same figures as CSV for spreadsheets: UTF-8 with a BOM, so Excel reads the Chinese."""
    buf = io.StringIO()
    writer = csv.writer(buf)  # \r\n line ends, as spreadsheets expect
    writer.writerow(
        ["月份 month", "代码 code", "项目 item"]
        + [f"{_COLUMNS[t][0]} {_COLUMNS[t][1]}" for t in VISIT_TYPES]
        + ["合计 total"]
    )
    # Amounts are yuan with two decimals, as text: a spreadsheet reads them as numbers.
    for line in _lines(r):
        writer.writerow([r.label, line.code, f"{line.zh} {line.en}", *(line.values[t] for t in VISIT_TYPES), line.total])
    return buf.getvalue().encode("utf-8-sig")
