"""`crowd-sync status`: the outbox's summary as data (``--json``) and as text for a terminal."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sync.clock import human_offset, utcnow
from sync.outbox.model import Summary
from sync.upstream.signing import KEY_FORMS


def status_data(
    summary: Summary, now: datetime, *, outbox: str, key_form_setting: str = "auto",
    his_clock: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What `status --json` prints (times in UTC); ``his_clock`` as ``sync.clock.current`` gives it."""
    oldest = summary.oldest_pending_at
    accepted = summary.key_form or {}
    return {
        "counts": dict(summary.counts),
        "oldest_pending_at": _iso(oldest),
        "oldest_pending_age_s": int((now - oldest).total_seconds()) if oldest else None,
        "last_sent_at": _iso(summary.last_sent_at),
        "last_run": _jsonable(summary.last_run),
        "last_successful_run": _jsonable(summary.last_successful_run),
        "config_error": _jsonable(summary.config_error),
        # The reading of the app key in signatures: the setting, and the one the platform accepted (auto).
        "app_key_form": {
            "setting": key_form_setting,
            "accepted": accepted.get("form") if key_form_setting == "auto" else None,
            "accepted_at": accepted.get("accepted_at") if key_form_setting == "auto" else None,
        },
        "platform_unreachable": _jsonable(summary.platform_down),
        "leased": summary.leased,
        "times": "UTC",
        "outbox": outbox,
        "his_clock": his_clock,
    }


def _iso(value: datetime | None) -> str | None:
    return value.replace(tzinfo=UTC).isoformat() if value else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return _iso(value)
    return value


_STATUS_NAMES = {
    "pending": "待发送",
    "sent": "已发送",
    "failed": "失败待重试",
    "invalid": "数据不合规",
    "dead": "已放弃",
    "skipped": "非重点人群",
}


def render_status(d: dict[str, Any]) -> str:
    """``status_data`` for a terminal, Chinese with English."""
    lines = [f"crowd-sync 状态 / status — outbox {d['outbox']} (times UTC)"]
    for name, zh in _STATUS_NAMES.items():
        lines.append(f"  {zh:<6} {name:<8} {d['counts'].get(name, 0):>8}")
    age = d["oldest_pending_age_s"]
    lines.append(
        "  最早待发送 oldest pending: "
        + (f"{d['oldest_pending_at']} ({_human_age(age)} ago)" if age is not None else "none")
    )
    lines.append(f"  上次成功上传 last upload: {d['last_sent_at'] or 'never'}")
    run = d.get("last_run")
    if run:
        lines.append(
            f"  上次运行 last run: {run.get('kind')} {run.get('started_at')} — read {run.get('rows_read')}, "
            f"enqueued {run.get('enqueued')}, sent {run.get('sent')}, failed {run.get('failed')}, "
            f"invalid {run.get('invalid')}, skipped {run.get('skipped')}, dead {run.get('dead')}"
            + (f" — error: {run['error']}" if run.get("error") else "")
        )
    else:
        lines.append("  上次运行 last run: never")
    lines.append(f"  授权码读法 app key reading: {_key_form_text(d.get('app_key_form') or {})}")
    lines.extend(_render_his_clock(d.get("his_clock")))
    ce = d.get("config_error")
    if ce:
        lines.append(f"  !! 发送已暂停 sending paused since {ce.get('since')}: {ce.get('message')}")
        if ce.get("hint"):
            lines.append(f"     处理 fix: {ce.get('hint')}")
    else:
        lines.append("  配置错误 configuration error: none")
    down = d.get("platform_unreachable")
    if down:
        lines.append(
            f"  !! 平台不可达 platform unreachable since {down.get('since')}: {down.get('reason')}"
        )
        lines.append(
            f"     发送已暂停，未计入任何记录的失败次数；下次探测 next probe at {down.get('next_probe_at')} "
            f"(failed probes: {down.get('probes') or 0}) / sending paused, no record is charged"
        )
    return "\n".join(lines)


def _key_form_text(kf: dict[str, Any]) -> str:
    setting = kf.get("setting") or "auto"
    if setting != "auto":
        return f"{setting}, pinned by upstream.app_key_form (固定)"
    if kf.get("accepted"):
        return f"{kf['accepted']}, accepted by the platform since {kf.get('accepted_at')} (平台已接受; setting auto)"
    first, second = KEY_FORMS
    return f"none accepted yet (尚未确定): the next login tries {first}, then {second} (setting auto)"


def _render_his_clock(c: dict[str, Any] | None) -> list[str]:
    """The HIS clock as the last poll read it, and the cursor's lag behind it."""
    if not c:
        return ["  HIS 时钟 HIS clock: not read yet (no poll has run)"]
    read_at = datetime.fromisoformat(str(c["read_at"])) if c.get("read_at") else None
    age = f", read {_human_age(int((utcnow() - read_at).total_seconds()))} ago" if read_at else ""
    offset = c.get("offset_s")
    lines = [
        f"  HIS 时钟 HIS clock: {c['his_now'].replace('T', ' ')} {c.get('zone')}"
        + (f", {human_offset(float(offset))} from this host" if offset is not None else "") + age
    ]
    lag = c.get("cursor_lag_s")
    if lag is None:
        lines.append("  读取进度 cursor: none yet (the first poll back-fills)")
    elif lag >= 0:
        lines.append(f"  读取进度 cursor: {c['cursor_at'].replace('T', ' ')}, {human_offset(lag)[1:]} behind the HIS clock")
    else:
        lines.append(
            f"  !! 读取进度超前 cursor: {c['cursor_at'].replace('T', ' ')} is {human_offset(-lag)[1:]} AHEAD of the HIS "
            "clock: the next poll rewinds it (see `crowd-sync check`)"
        )
    for p in c.get("problems") or []:
        lines.append(f"  !! HIS 时钟问题 clock problem: {p.get('message')}")
        lines.append(f"     处理 fix: {p.get('fix')}")
    rewound = c.get("cursor_rewound")
    if rewound:
        lines.append(
            f"  游标已回拨 cursor rewound at {rewound.get('at')} UTC: it was {human_offset(float(rewound.get('ahead_s') or 0))[1:]} "
            f"ahead of the HIS clock; read again from {rewound.get('rewound_to') or 'his.start_from'}"
        )
    return lines


def _human_age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"
