"""What is not sent, and one visit's whole story, as people read them (`failures`, `show`).

Built from outbox rows (``Store.problems``, ``Store.visit``, ``Store.attempts``) into
plain dicts (what ``--json`` prints) and then text: Chinese and English side by side,
columns aligned by terminal width, every time in schedule.timezone with its offset.
ID numbers are masked unless the caller unmasks them (`show --unmask`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal
from typing import Any

from sync import display, intake, localtime, records
from sync.logs import mask_id, redact

# The statuses people see, in the order `status` lists them.
STATUS_NAMES: dict[str, str] = {
    "pending": "待发送",
    "sent": "已发送",
    "failed": "失败待重试",
    "invalid": "数据不合规",
    "dead": "已放弃",
    "skipped": "非重点人群",
}
DEFAULT_STATUSES = ("invalid", "failed", "dead")
KINDS = {"upload": "上传 upload", "check": "本地校验 check", "decision": "判定 decision", "crash": "崩溃 crash"}
VISIT_TYPES = {"1": "住院 inpatient", "2": "门诊 outpatient"}


def split_reason(last_error: str | None, lsh: str) -> tuple[str, str | None]:
    """``last_error`` as (reason, fix): crowd-sync writes ``what — fix``. ID numbers masked,
    the ``record lsh=…:`` prefix dropped (the lsh has a column of its own)."""
    text = redact(last_error or "").strip()
    reason, sep, fix = text.partition(" — ")
    prefix = f"record lsh={lsh}: "
    if reason.startswith(prefix):
        reason = reason[len(prefix):]
    return reason or "-", (fix.strip() or None) if sep else None


def default_fix(status: str, lsh: str, next_attempt_at: datetime | None, tz: tzinfo) -> str:
    """What to do about a record in ``status`` when its error names no fix."""
    if status == "failed":
        at = localtime.text(next_attempt_at, tz) if next_attempt_at else "the next cycle"
        return f"自动重试，下次 / retried automatically at {at}; nothing to do unless it keeps failing"
    if status == "dead":
        return f"确认原因后重发 / once the cause is gone: crowd-sync retry --lsh {lsh}"
    if status == "skipped":
        return (
            "上次判定时不是重点人群；对账期内每晚重新判定。如应为重点人群，请区县卫健局导入其标签 / not in the key "
            "population when last checked; re-checked nightly within schedule.reconcile_days; if the person should "
            "be, the county health bureau must import their labels (FAQ 15)"
        )
    return (
        f"改正 HIS 数据，该行变化后自动重新校验 / correct the visit in the HIS: it is validated again when its row "
        f"changes (or: crowd-sync retry --lsh {lsh})"
    )


def failure_items(rows: Iterable[Mapping[str, Any]], tz: tzinfo) -> list[dict[str, Any]]:
    """``Store.problems`` rows as `failures --json` gives them."""
    items = []
    for row in rows:
        lsh, status = str(row["lsh"]), str(row["status"])
        reason, fix = split_reason(row.get("last_error"), lsh)
        items.append({
            "institution": row.get("institution"),
            "lsh": lsh,
            "status": status,
            "status_zh": STATUS_NAMES.get(status, status),
            "attempts": row.get("attempts"),
            "http_status": row.get("last_http_status"),
            "platform_answer": row.get("last_answer"),
            "reason": reason,
            "fix": fix or default_fix(status, lsh, row.get("next_attempt_at"), tz),
            "visit_type": row.get("visit_type"),
            "settlement_date": _day(row.get("settlement_date")),
            "updated_at": localtime.text(row.get("updated_at"), tz),
            "next_attempt_at": localtime.text(row.get("next_attempt_at"), tz),
            "first_failed_at": localtime.text(row.get("first_failed_at"), tz),
        })
    return items


def render_failures(
    items: Sequence[Mapping[str, Any]], *, statuses: Sequence[str], since: date | None, outbox: str, zone: str,
    offset: str, columns: int = 120, institutions: bool = False,
) -> str:
    """The table of `crowd-sync failures`; ``institutions``: the settings list several (each row
    names its own: lsh is unique only within one)."""
    counts = {s: sum(1 for i in items if i["status"] == s) for s in statuses}
    head = ", ".join(f"{STATUS_NAMES.get(s, s)} {s} {n}" for s, n in counts.items())
    lines = [
        f"crowd-sync 未发送的记录 / records not sent — {head}"
        + (f", 自 since {since.isoformat()}" if since else ""),
        f"outbox {outbox}; 时间 times {zone} ({offset})",
        "",
    ]
    if not items:
        lines.append("没有 / none")
        return "\n".join(lines)
    headers = ["流水号 lsh", "状态 status", "次数 tries", f"更新 updated ({offset})", "原因与处理 reason and fix"]
    several = institutions or len({i.get("institution") for i in items}) > 1
    if several:
        headers[0] = "机构/流水号 institution/lsh"
    fixed = [
        [f"{i['institution']}/{i['lsh']}" if several else str(i["lsh"]), f"{i['status_zh']} {i['status']}",
         str(i["attempts"] or 0), _short(i["updated_at"])]
        for i in items
    ]
    widths = [max(display.width(h), *(display.width(r[k]) for r in fixed)) for k, h in enumerate(headers[:4])]
    room = max(30, columns - sum(widths) - 2 * len(widths))
    rows = []
    for item, cells in zip(items, fixed, strict=True):
        text = display.wrap(f"原因 reason: {item['reason']}", room)
        if item.get("platform_answer") and item["platform_answer"] not in item["reason"]:
            text += display.wrap(f"平台 platform: {item['platform_answer']}", room)
        text += display.wrap(f"处理 fix: {item['fix']}", room)
        rows.append([*cells, "\n".join(text)])
    lines += display.table(headers, rows, right=(2,))
    lines += [
        "",
        "一条记录的详情 / one visit's story: crowd-sync show LSH",
        "改正后立即重发 / resend now after a fix: crowd-sync retry --lsh LSH ...  (or --status invalid)",
    ]
    return "\n".join(lines)


def day_start_utc(day: date, tz: tzinfo) -> datetime:
    """Midnight of ``day`` in ``tz``, as naive UTC (for `failures --since`)."""
    return datetime.combine(day, datetime.min.time(), tzinfo=tz).astimezone(UTC).replace(tzinfo=None)


def _short(text: Any) -> str:
    """``2026-11-05 14:02:03+08:00`` -> ``2026-11-05 14:02:03`` (the offset is in the header)."""
    return str(text)[:19] if text else "-"


def _day(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return None if value is None else str(value)[:10]


# -- one visit's story -------------------------------------------------------------------------------


def his_values(payload_json: str) -> tuple[dict[str, Any], str]:
    """The HIS values behind a stored payload, by the contract's column names, and how
    exact they are: a row parked invalid keeps the HIS row exactly as read; a built payload
    holds the same values as crowd-sync validated them (dates as days, amounts to the cent)."""
    raw = intake.parse_raw_json(payload_json)
    if raw is not None:
        return {k: _plain(v) for k, v in raw[0].items()}, "exact"
    try:
        payload = json.loads(payload_json, parse_float=Decimal)
    except ValueError:
        return {}, "unreadable"
    if not isinstance(payload, dict):
        return {}, "unreadable"
    if "cardType" not in payload:
        return {str(k): _plain(v) for k, v in payload.items()}, "exact"
    values = {
        records.FIELD_COLUMNS[f]: _plain(payload[f]) for f in records.FIELDS if f in payload and f != "keyCrowd"
    }
    return values, "validated"


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat(" ") if isinstance(value, datetime) else value.isoformat()
    if isinstance(value, Decimal):
        return str(value)  # money as written, 0.00 not 0.0
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _masked(values: Mapping[str, Any], keys: Sequence[str], unmask: bool) -> dict[str, Any]:
    out = dict(values)
    if not unmask:
        for key in keys:
            if isinstance(out.get(key), str):
                out[key] = mask_id(out[key])
    return out


def story(
    row: Mapping[str, Any], attempts: Sequence[Mapping[str, Any]], *, labels: Mapping[str, Any] | None, tz: tzinfo,
    his_tz: tzinfo, unmask: bool,
) -> dict[str, Any]:
    """One visit's story as `show --json` gives it."""
    lsh, status = str(row["lsh"]), str(row["status"])
    values, exactness = his_values(str(row.get("payload") or ""))
    values = _masked(values, ("card_no", "cardNo"), unmask)
    if row.get("source_changed_at") is not None:
        values.setdefault("changed_at", localtime.wall(row["source_changed_at"], his_tz))
    payload: Any = None
    if exactness == "validated":
        payload = _masked(
            {k: _plain(v) for k, v in json.loads(str(row["payload"]), parse_float=Decimal).items()}, ("cardNo",), unmask
        )
    reason, fix = split_reason(row.get("last_error"), lsh) if row.get("last_error") else (None, None)
    if not unmask and reason is not None:
        reason = redact(reason)
    card = row.get("card_no")
    return {
        "lsh": lsh,
        "status": status,
        "status_zh": STATUS_NAMES.get(status, status),
        "visit_type": row.get("visit_type"),
        "card_type": row.get("card_type"),
        "card_no": (card if unmask else mask_id(str(card))) if card else None,
        "settlement_date": _day(row.get("settlement_date")),
        "key_crowd": row.get("key_crowd"),
        "times": {
            "source_changed_at": localtime.wall(row.get("source_changed_at"), his_tz),
            "first_seen_at": localtime.text(row.get("first_seen_at"), tz),
            "updated_at": localtime.text(row.get("updated_at"), tz),
            "sent_at": localtime.text(row.get("sent_at"), tz),
            "first_failed_at": localtime.text(row.get("first_failed_at"), tz),
            "next_attempt_at": localtime.text(row.get("next_attempt_at"), tz),
        },
        "his_values": values,
        "his_values_are": exactness,
        "payload": payload,
        "payload_sent": status == "sent",
        "attempts_made": row.get("attempts"),
        "last_http_status": row.get("last_http_status"),
        "platform_answer": row.get("last_answer"),
        "reason": reason,
        "fix": fix or (default_fix(status, lsh, row.get("next_attempt_at"), tz) if status != "sent" and status != "pending" else None),
        "label_cache": None if labels is None else {
            "labels": labels.get("labels"), "key_crowd": labels.get("key_crowd"),
            "fetched_at": localtime.text(labels.get("fetched_at"), tz),
        },
        "attempts": [
            {
                "at": localtime.text(a.get("at"), tz), "kind": a.get("kind"), "outcome": a.get("outcome"),
                "http_status": a.get("http_status"), "answer": a.get("answer"),
                # The reason alone: the fix is said once, above the table.
                "error": split_reason(str(a["error"]), lsh)[0] if a.get("error") else None,
            }
            for a in attempts
        ],
    }


def render_story(d: Mapping[str, Any], *, zone: str, offset: str, keep_days: int, columns: int = 120) -> str:
    """The text of `crowd-sync show LSH`."""
    t = d["times"]
    room = max(40, columns - 6)
    lines = [
        f"就诊 visit {d['lsh']} — {d['status_zh']} {d['status']}  (时间 times {zone} {offset}; HIS 时间为 HIS 时钟 "
        "HIS times are the HIS's clock)",
        f"  类型 type: {VISIT_TYPES.get(str(d.get('visit_type')), d.get('visit_type') or '-')}; 证件 card: "
        f"{d.get('card_type') or '-'} {d.get('card_no') or '-'}; 结算日 settled: {d.get('settlement_date') or '-'}",
        f"  HIS 结算变更 settled in the HIS: {t['source_changed_at'] or '-'}",
        f"  首次读取 first read: {t['first_seen_at'] or '-'};  最近变化 last change: {t['updated_at'] or '-'}",
    ]
    if t.get("sent_at"):
        lines.append(f"  上传成功 sent at: {t['sent_at']}")
    if d["status"] in ("pending", "failed") and t.get("next_attempt_at"):
        lines.append(f"  下次尝试 next attempt: {t['next_attempt_at']}")
    kc = {"1": "是 yes", "0": "否 no"}.get(str(d.get("key_crowd")), "未定 not decided yet")
    lines.append(f"  重点人群 key population: {kc}")
    cache = d.get("label_cache")
    if cache:
        lines.append(
            f"  标签缓存 label cache: key_crowd {cache.get('key_crowd')}, labels {cache.get('labels') or 'none (平台无此人)'}, "
            f"fetched {cache.get('fetched_at')}"
        )
    if d.get("reason"):
        lines.append("")
        lines += ["  " + x for x in display.wrap(f"原因 reason: {d['reason']}", room)]
    if d.get("fix"):
        lines += ["  " + x for x in display.wrap(f"处理 fix: {d['fix']}", room)]

    exact = {
        "exact": "as the HIS returned them (the row was parked before a payload could be built)",
        "validated": "as crowd-sync validated them (dates as days, amounts to the cent): the payload is built from exactly these",
        "unreadable": "the stored payload is not JSON",
    }[d["his_values_are"]]
    lines += ["", f"HIS 读取的值 / HIS values as read — {exact}"]
    values = d["his_values"]
    if values:
        width = max(display.width(k) for k in values)
        lines += [f"  {display.ljust(k, width)}  {'NULL' if v is None else v}" for k, v in values.items()]
    if d.get("payload") is not None:
        head = "已上传的报文 / payload sent" if d["payload_sent"] else "待上传的报文 / payload to send (keyCrowd decided at dispatch)"
        lines += ["", head]
        lines += ["  {"] + [
            f"    {json.dumps(k, ensure_ascii=False)}: {v if k in records.MONEY_FIELDS else json.dumps(v, ensure_ascii=False)}"
            + ("," if i < len(d["payload"]) - 1 else "")
            for i, (k, v) in enumerate(d["payload"].items())
        ] + ["  }"]
    lines += [
        "",
        f"尝试记录 / attempts (保留 kept {keep_days} days; 当前报文失败计数 failures counted on the current payload: "
        f"{d.get('attempts_made') or 0})",
    ]
    if not d["attempts"]:
        lines.append("  无 / none kept")
    else:
        rows = []
        for a in d["attempts"]:
            said = a.get("answer") or a.get("error") or ""
            rows.append([
                _short(a["at"]), KINDS.get(str(a["kind"]), str(a["kind"])),
                f"{STATUS_NAMES.get(str(a['outcome']), '')} {a['outcome']}".strip(), str(a.get("http_status") or "-"),
                "\n".join(display.wrap(said, max(30, columns - 70))) or "-",
            ])
        lines += ["  " + x for x in display.table(
            [f"时间 at ({offset})", "类型 kind", "结果 outcome", "HTTP", "平台应答或错误 answer or error"], rows
        )]
    if d.get("platform_answer"):
        lines += ["", f"平台最近应答 / the platform's last answer: {d['platform_answer']} (HTTP {d.get('last_http_status')})"]
    return "\n".join(lines)
