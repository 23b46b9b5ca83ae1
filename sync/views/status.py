"""`crowd-sync status`: what the outbox says as data (``--json``) and as text for a
terminal, in both languages (the demo prints the same).

Every time is in schedule.timezone with its offset; the HIS's own times (the cursor) are
in his.timezone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sync import display, localtime
from sync.outbox.model import Summary
from sync.settings import Settings, zone
from sync.views.failures import STATUS_NAMES


def status_data(
    summary: Summary, now: datetime, *, outbox: str, settings: Settings, his_clock: dict[str, Any] | None,
    holder: dict[str, Any] | None = None, alive: bool | None = None, schedule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What `status --json` prints: the outbox summary (``Store.summary``), the HIS clock as
    ``sync.clock.current`` gives it, and the service (``Store.service``: the lock's holder,
    whether the lock is held, the published schedule). Times for people, with the offset."""
    tz = settings.schedule.tz
    data = summary_dict(summary, now, key_form_setting=settings.upstream.app_key_form, tz=tz)
    data["outbox"] = outbox
    data["his_clock"] = _his_clock_local(his_clock, tz)
    data["daemon"] = daemon(holder, alive, tz)
    data["schedule"] = next_jobs(settings, data["daemon"], schedule, now=now)
    if len(settings.members) > 1 or set(summary.institutions) - {m.code for m in settings.members}:
        names = {m.code: m.institution.name for m in settings.members}
        data["institutions"] = [
            {"code": code, "name": names.get(code, ""), "configured": apart.get("configured", False),
             "counts": apart["counts"], "config_error": _local(apart.get("config_error"), tz),
             "app_key_form": (apart.get("key_form") or {}).get("form")}
            for code, apart in summary.institutions.items()
        ]
    return data


def summary_dict(summary: Any, now: datetime, *, key_form_setting: str = "auto", tz: Any = None) -> dict[str, Any]:
    """The outbox summary with its times for people (schedule.timezone, with the offset)."""
    tz = tz or localtime.zone()
    oldest = summary.oldest_pending_at
    accepted = summary.key_form or {}
    return {
        "counts": dict(summary.counts),
        "oldest_pending_at": localtime.text(oldest, tz),
        "oldest_pending_age_s": int((now - oldest).total_seconds()) if oldest else None,
        "last_sent_at": localtime.text(summary.last_sent_at, tz),
        "last_run": _local(summary.last_run, tz),
        "last_successful_run": _local(summary.last_successful_run, tz),
        "config_error": _local(summary.config_error, tz),
        # The reading of the app key in signatures: the setting, and the one the platform accepted (auto).
        "app_key_form": {
            "setting": key_form_setting,
            "accepted": accepted.get("form") if key_form_setting == "auto" else None,
            "accepted_at": localtime.text(accepted.get("accepted_at"), tz) if key_form_setting == "auto" else None,
        },
        "platform_unreachable": _local(summary.platform_down, tz),
        "leased": summary.leased,
        "timezone": str(tz),
        "utc_offset": localtime.offset_text(tz, now.replace(tzinfo=UTC)),
    }


_TIME_KEYS = {
    "started_at", "finished_at", "since", "next_probe_at", "last_failure_at", "accepted_at", "at",
}


def _local(value: Any, tz: Any) -> Any:
    """A state row or run row with its UTC times for people."""
    if isinstance(value, dict):
        return {k: (localtime.text(v, tz) if k in _TIME_KEYS and v else _local(v, tz)) for k, v in value.items()}
    if isinstance(value, datetime):
        return localtime.text(value, tz)
    return value


def _his_clock_local(c: dict[str, Any] | None, tz: Any) -> dict[str, Any] | None:
    if not c:
        return None
    out = dict(c)
    out["read_at"] = localtime.text(c.get("read_at"), tz)
    his_zone = c.get("zone")
    try:
        his_tz = zone(str(his_zone)) if his_zone else tz
    except (ValueError, KeyError):
        his_tz = tz
    for key in ("his_now", "cursor_at"):
        parsed = localtime.parse(c.get(key))
        out[key] = localtime.wall(parsed, his_tz) if parsed is not None else None
    if c.get("cursor_rewound"):
        out["cursor_rewound"] = {**c["cursor_rewound"], "at": localtime.text(c["cursor_rewound"].get("at"), tz)}
    return out


def daemon(holder: dict[str, Any] | None, alive: bool | None, tz: Any) -> dict[str, Any]:
    """Whether a crowd-sync holds the outbox's instance lock: the lock itself is asked;
    the recorded holder (sync_state) says who."""
    who = {
        "host": holder.get("host"), "pid": holder.get("pid"), "command": holder.get("command"),
        "since": localtime.text(holder.get("started_at"), tz),
    } if holder else {"host": None, "pid": None, "command": None, "since": None}
    if alive is None:
        state = "unknown" if holder is None else "recorded"
    elif alive:
        state = "running"
    else:
        state = "stale" if holder else "stopped"
    return {"state": state, "running": alive if alive is not None else None, "verified": alive is not None, **who}


def next_reconcile(settings: Settings, now: datetime) -> datetime:
    """The next schedule.reconcile_at in schedule.timezone after ``now`` (UTC), as UTC."""
    tz = ZoneInfo(settings.schedule.timezone)
    local_now = localtime.local(now, tz)
    at = settings.schedule.reconcile_time
    candidate = datetime.combine(local_now.date(), at, tzinfo=tz)
    if candidate <= local_now:
        candidate = datetime.combine(local_now.date() + timedelta(days=1), at, tzinfo=tz)
    return candidate.astimezone(UTC).replace(tzinfo=None)


def next_jobs(
    settings: Settings, daemon_state: dict[str, Any], schedule: dict[str, Any] | None, *, now: datetime
) -> dict[str, Any]:
    """The service's next poll and next reconcile: as the running service published them,
    else what its schedule would give."""
    tz = settings.schedule.tz
    running = daemon_state["state"] in ("running", "recorded") and daemon_state.get("command") == "run"
    published = bool(
        running and schedule and schedule.get("pid") == daemon_state.get("pid")
        and schedule.get("host") == daemon_state.get("host")
    )
    next_poll = localtime.text(schedule.get("next_poll_at"), tz) if published and schedule else None
    reconcile = (
        localtime.text(schedule.get("next_reconcile_at"), tz)
        if published and schedule and schedule.get("next_reconcile_at")
        else localtime.text(next_reconcile(settings, now), tz)
    )
    return {
        "poll_every_s": settings.schedule.poll_every_s,
        "next_poll_at": next_poll,
        "next_reconcile_at": reconcile,
        "reconcile_at": settings.schedule.reconcile_at,
        "reconcile_days": settings.schedule.reconcile_days,
        "from_service": published,
    }


# -- rendering ------------------------------------------------------------------------------------


def render_status(d: dict[str, Any]) -> str:
    lines = [f"crowd-sync 状态 / status — outbox {d['outbox']} (时间 times {d.get('timezone')} {d.get('utc_offset')})"]
    names = [f"{zh} {name}" for name, zh in STATUS_NAMES.items()]
    wide = max(display.width(n) for n in names)
    for (name, _zh), label in zip(STATUS_NAMES.items(), names, strict=True):
        lines.append(f"  {display.ljust(label, wide)} {d['counts'].get(name, 0):>8}")
    lines.extend(_render_institutions(d.get("institutions") or []))
    lines.extend(_render_daemon(d.get("daemon"), d.get("schedule")))
    age = d["oldest_pending_age_s"]
    lines.append(
        "  最早待发送 oldest pending: "
        + (f"{d['oldest_pending_at']} ({human_age(age)} ago)" if age is not None else "none")
    )
    lines.append(f"  上次成功上传 last upload: {d['last_sent_at'] or '从未 never'}")
    run = d.get("last_run")
    if run:
        lines.append(
            f"  上次运行 last run: {run.get('kind')} {run.get('started_at')} — read {run.get('rows_read')}, "
            f"enqueued {run.get('enqueued')}, sent {run.get('sent')}, failed {run.get('failed')}, "
            f"invalid {run.get('invalid')}, skipped {run.get('skipped')}, dead {run.get('dead')}"
            + (f" — error: {run['error']}" if run.get("error") else "")
        )
    else:
        lines.append("  上次运行 last run: 从未 never")
    lines.append(f"  授权码读法 app key reading: {_key_form_text(d.get('app_key_form') or {})}")
    lines.extend(_render_his_clock(d.get("his_clock")))
    ce = d.get("config_error")
    if ce:
        lines.append(f"  !! 发送已暂停 sending paused since {ce.get('since')}: {ce.get('message')}")
        if ce.get("hint"):
            lines.append(f"     处理 fix: {ce.get('hint')}")
    else:
        lines.append("  配置错误 configuration error: 无 none")
    down = d.get("platform_unreachable")
    if down:
        lines.append(f"  !! 平台不可达 platform unreachable since {down.get('since')}: {down.get('reason')}")
        lines.append(
            f"     发送已暂停，未计入任何记录的失败次数；下次探测 next probe at {down.get('next_probe_at')} "
            f"(failed probes: {down.get('probes') or 0}) / sending paused, no record is charged"
        )
    return "\n".join(lines)


def _render_institutions(members: list[dict[str, Any]]) -> list[str]:
    """Each institution of an alliance apart: its counts, and its pause (its own key and account)."""
    if not members:
        return []
    lines = ["  各机构 by institution:"]
    for m in members:
        counts = m["counts"]
        text = ", ".join(f"{name} {counts.get(name, 0)}" for name in STATUS_NAMES if counts.get(name))
        label = f"{m['code']} {m['name']}".strip()
        if not m.get("configured"):
            label += " (不在配置中 not in the settings)"
        lines.append(f"    {label}: {text or '无记录 no records'}")
        ce = m.get("config_error")
        if ce:
            lines.append(f"      !! 该机构发送已暂停 paused since {ce.get('since')}: {ce.get('message')}")
    return lines


def _render_daemon(dm: dict[str, Any] | None, sch: dict[str, Any] | None) -> list[str]:
    if not dm:
        return []
    who = f"pid {dm.get('pid')} on {dm.get('host')} since {dm.get('since')} (command {dm.get('command')})"
    state = dm.get("state")
    if state == "running":
        text = f"运行中 running: {who}"
    elif state == "recorded":
        text = f"记录为运行中（无法核实锁）/ recorded as running, not verified (this outbox's lock cannot be inspected): {who}"
    elif state == "stale":
        text = f"未运行 not running (the recorded holder, {who}, is gone: it stopped without clearing its record)"
    elif state == "unknown":
        text = "未知 unknown (this outbox's lock cannot be inspected, and no process recorded itself)"
    else:
        text = "未运行 not running"
    lines = [f"  服务 service: {text}"]
    if sch:
        if sch.get("next_poll_at"):
            lines.append(f"  下次轮询 next poll: {sch['next_poll_at']} (every {sch.get('poll_every_s')} s)")
        elif state in ("running", "recorded") and dm.get("command") != "run":
            lines.append(f"  下次轮询 next poll: {dm.get('command')} is running now; no service schedules polls")
        else:
            lines.append(f"  下次轮询 next poll: 服务启动时 when the service starts (then every {sch.get('poll_every_s')} s)")
        source = "" if sch.get("from_service") else " (schedule.reconcile_at, once the service runs)"
        lines.append(
            f"  下次对账 next reconcile: {sch.get('next_reconcile_at')}{source}, last {sch.get('reconcile_days')} days"
        )
    return lines


def _key_form_text(kf: dict[str, Any]) -> str:
    from sync.upstream.signing import KEY_FORMS

    setting = kf.get("setting") or "auto"
    if setting != "auto":
        return f"{setting}, pinned by upstream.app_key_form (固定)"
    if kf.get("accepted"):
        return f"{kf['accepted']}, accepted by the platform since {kf.get('accepted_at')} (平台已接受; setting auto)"
    first, second = KEY_FORMS
    return f"none accepted yet (尚未确定): the next login tries {first}, then {second} (setting auto)"


def _render_his_clock(c: dict[str, Any] | None) -> list[str]:
    """The HIS clock as the last poll read it, and the cursor's lag behind it."""
    from sync.clock import human_offset

    if not c:
        return ["  HIS 时钟 HIS clock: 尚未读取 not read yet (no poll has run)"]
    read_at = localtime.parse(c.get("read_at"))
    age = f", read {human_age(int((datetime.now(UTC) - read_at).total_seconds()))} ago" if read_at else ""
    offset = c.get("offset_s")
    lines = [
        f"  HIS 时钟 HIS clock: {c['his_now']} ({c.get('zone')})"
        + (f", {human_offset(float(offset))} from this host" if offset is not None else "") + age
    ]
    lag = c.get("cursor_lag_s")
    if lag is None:
        lines.append("  读取进度 cursor: none yet (the first poll back-fills)")
    elif lag >= 0:
        lines.append(f"  读取进度 cursor: {c['cursor_at']}, {human_offset(lag)[1:]} behind the HIS clock")
    else:
        lines.append(
            f"  !! 读取进度超前 cursor: {c['cursor_at']} is {human_offset(-lag)[1:]} AHEAD of the HIS "
            "clock: the next poll rewinds it (see `crowd-sync check`)"
        )
    for p in c.get("problems") or []:
        lines.append(f"  !! HIS 时钟问题 clock problem: {p.get('message')}")
        lines.append(f"     处理 fix: {p.get('fix')}")
    rewound = c.get("cursor_rewound")
    if rewound:
        lines.append(
            f"  游标已回拨 cursor rewound at {rewound.get('at')}: it was {human_offset(float(rewound.get('ahead_s') or 0))[1:]} "
            f"ahead of the HIS clock; read again from {rewound.get('rewound_to') or 'his.start_from'}"
        )
    return lines


def human_age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"
