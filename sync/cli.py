"""The `crowd-sync` command: the only place that prints for people, and the exit codes.

Exit codes (product contract): 0 all due work done; 3 finished but records are left
failed, invalid or dead; 2 configuration error (bad settings, rejected credentials,
another instance running): fix something, retrying will not help; 75 temporarily
unavailable (HIS, outbox or platform unreachable: EX_TEMPFAIL, try again later);
1 unexpected error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, date, datetime
from typing import Any, TextIO

import structlog

from sync import __version__, app, logs
from sync import settings as settings_mod
from sync.errors import ConfigError, SyncError, TransientError
from sync.settings import Settings

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_LEFT_OVER = 3
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL (sysexits.h): the unit's Restart= retries it, cron may run again later
EXIT_PIPE = 141  # 128 + SIGPIPE, as any command whose reader went away (`crowd-sync status | head -1`)

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="settings file (default: $CROWD_SYNC_CONFIG, then ./settings.yaml)",
    )
    p = argparse.ArgumentParser(
        prog="crowd-sync",
        parents=[common],
        description="重点人群“先诊疗后付费”诊疗记录上传 / key-population visit records to the Sichuan platform",
        epilog="退出码 exit codes: 0 完成 done; 3 有记录 failed/invalid/dead 待处理 records left failed/invalid/dead; "
        "2 配置错误 configuration error (settings, credentials, another instance running); "
        "75 暂时不可用，稍后再试 temporarily unavailable, try again later (HIS, outbox or platform unreachable); "
        "1 意外错误 unexpected error",
    )
    p.add_argument("--version", action="version", version=f"crowd-sync {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=text, description=text)

    add("run", "the daemon: scheduled poll, dispatch and nightly reconcile until SIGTERM/SIGINT")
    add("once", "one poll of new settlements, then dispatch everything due, then exit")
    rec = add("reconcile", "re-read a window of the HIS, enqueue what changed, dispatch")
    rec.add_argument("--since", required=True, type=_date, metavar="YYYY-MM-DD")
    rec.add_argument("--until", type=_date, metavar="YYYY-MM-DD", help="inclusive (default: now)")
    st = add("status", "counts per status, oldest pending, last upload, last run, configuration error")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    rt = add("retry", "requeue records now")
    grp = rt.add_mutually_exclusive_group(required=True)
    grp.add_argument("--lsh", nargs="+", metavar="LSH")
    grp.add_argument("--status", choices=["failed", "invalid", "dead", "skipped"])
    add("check", "doctor: settings, HIS query, outbox schema, clock, login, one label lookup")
    lk = add("lookup", "ask the label API about one ID number and print the labels")
    lk.add_argument("id_number", metavar="ID_NUMBER")
    lk.add_argument("--json", action="store_true")
    add("migrate", "bring the outbox database to the current schema")
    rp = add("report", "the month's uploaded key-population visits as the province counts them")
    rp.add_argument("--month", required=True, type=_month, metavar="YYYY-MM", help="settlement month")
    rp.add_argument("--csv", metavar="FILE", help="also write the figures as CSV (UTF-8 with BOM, opens in Excel)")
    demo = add("demo", "a complete local run: demo HIS, built-in simulator, a few cycles, status")
    demo.add_argument("--dir", default="var/demo", help="where the demo writes its databases (default var/demo)")
    demo.add_argument(
        "--key-form", choices=["as_printed", "decoded"], default="as_printed",
        help="which reading of the app key the simulated platform signs (the demo's settings keep auto)",
    )
    sim = add("simulator", "run the built-in platform simulator alone (loopback by default)")
    sim.add_argument("--port", type=int, default=18080)
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--env", choices=["test", "prod"], default="test")
    sim.add_argument("--latency-ms", type=int, default=0)
    sim.add_argument("--people", metavar="FILE.json")
    sim.add_argument(
        "--key-form", choices=["as_printed", "decoded"], default="as_printed",
        help="which reading of the app key the platform signs: as printed (%%2B) or decoded (+)",
    )
    return p


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def _month(text: str) -> date:
    from sync.report import parse_month

    try:
        return parse_month(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # Here, where a reader that went away (`crowd-sync status | head -1`) can still be
            # caught: at interpreter exit the flush would print a BrokenPipeError traceback.
            sys.stdout.flush()
    except BrokenPipeError:
        # Whatever is still buffered has nowhere to go: point stdout at /dev/null for the exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().print_help()
        return EXIT_CONFIG
    out = sys.stdout
    settings: Settings | None = None
    try:
        if args.command == "simulator":
            return _simulator(args)
        if args.command == "demo":
            from sync import demo

            logs.configure(level="warning", fmt="console")
            return demo.main(args.dir, out=out, key_form=args.key_form)
        settings = _load_settings(getattr(args, "config", None), platform=args.command not in OFFLINE_COMMANDS)
        handler: Callable[[argparse.Namespace, Settings, TextIO], int] = COMMANDS[args.command]
        return handler(args, settings, out)
    except SyncError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:
        described = _outbox_error(exc, settings)
        if described is not None:
            return _fail(described)
        log.error("unexpected_error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        print(
            logs.for_stderr(logs.redact(f"crowd-sync: unexpected error: {type(exc).__name__}: {exc}"), "error"),
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED


def exit_code(exc: SyncError) -> int:
    """The exit code an error ends a command with: what the caller (systemd, cron, a person) should do."""
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG  # fix the settings or the environment: retrying will not help
    if isinstance(exc, TransientError):
        return EXIT_TEMPFAIL  # a database or the platform cannot be reached now: try again later
    return EXIT_UNEXPECTED


def _fail(exc: SyncError) -> int:
    _print_error(exc)
    return exit_code(exc)


def _outbox_error(exc: Exception, settings: Settings | None) -> SyncError | None:
    """A database error that escaped a command comes from the outbox (the HIS source turns its
    own into ConfigError or TransientError): say which database, what it means and the fix."""
    if settings is None or not type(exc).__module__.startswith("sqlalchemy"):
        return None
    from sync.outbox.engine import describe_error

    return describe_error(exc, settings.outbox.url.get_secret_value())


_KIND = {
    EXIT_CONFIG: "配置错误 / configuration error",
    EXIT_TEMPFAIL: "暂时不可用，请稍后再试 / temporarily unavailable, try again later",
}


def _print_error(exc: SyncError) -> None:
    kind = _KIND.get(exit_code(exc))
    text = f"crowd-sync: {kind}: {exc}" if kind else f"crowd-sync: {exc}"
    print(logs.for_stderr(logs.redact(text), "error"), file=sys.stderr)


def _load_settings(path: str | None, *, platform: bool = True) -> Settings:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", settings_mod.SecretFileWarning)
        warnings.simplefilter("always", settings_mod.CountyCodeWarning)
        settings = settings_mod.load(path, platform=platform)
    logs.configure(level=settings.log.level, fmt=settings.log.format, priority_prefix=settings.log.priority_prefix)
    _register_secrets(settings)
    for w in caught:
        if issubclass(w.category, settings_mod.CountyCodeWarning):
            log.warning("unknown_county_code", detail=str(w.message))
        else:
            log.warning("secret_file_readable_by_others", detail=str(w.message))
    if not settings.upstream.verify_tls and settings.upstream.base_url.startswith("https"):
        log.warning("tls_verification_disabled", setting="upstream.verify_tls", fix="set upstream.verify_tls: true")
    return settings


def _register_secrets(settings: Settings) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from sync.upstream.signing import app_key_texts

    key = settings.upstream.app_key.get_secret_value()
    if key != settings_mod.NOT_LOADED:
        logs.register_secret(*app_key_texts(key))
    if settings.upstream.password.get_secret_value() != settings_mod.NOT_LOADED:
        logs.register_secret(settings.upstream.password.get_secret_value())
    for url in (settings.his.url.get_secret_value(), settings.outbox.url.get_secret_value()):
        try:
            pw = make_url(url).password
        except ArgumentError:
            continue
        if pw:
            logs.register_secret(str(pw))


# -- building blocks ------------------------------------------------------------


def _store(settings: Settings, *, create: bool = True) -> Any:
    return app.open_store(settings, create=create)


def _pipeline(settings: Settings, store: Any) -> Any:
    """The pipeline of a command holding the instance lock: the only process sending."""
    return app.make_pipeline(settings, store, sole_sender=True)


def _exit_for(store: Any) -> int:
    from sync.clock import utcnow

    summary = store.summary(now=utcnow())
    left = sum(summary.counts.get(s, 0) for s in ("failed", "invalid", "dead"))
    config_error = summary.config_error
    if config_error:
        return EXIT_CONFIG
    if summary.platform_down:
        return EXIT_TEMPFAIL
    return EXIT_LEFT_OVER if left else EXIT_OK


# -- commands ---------------------------------------------------------------------


def cmd_migrate(_args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = _store(settings)
    try:
        before, after = store.migrate()
    finally:
        store.dispose()
    print(f"outbox {store.url_for_humans}: schema {before or '(empty)'} -> {after}", file=out)
    return EXIT_OK


def _one_shot(args: argparse.Namespace, settings: Settings, out: TextIO, kind: str) -> int:
    store = _store(settings)
    with ExitStack() as stack:
        stack.callback(store.dispose)
        store.ensure_schema()
        lock = stack.enter_context(store.instance_lock(command=kind))
        pipeline = _pipeline(settings, store)
        pipeline.before_dispatch = lock.ensure
        stack.callback(pipeline.close)
        pipeline.his.check()
        stats = pipeline.reconcile(args.since, args.until) if kind == "reconcile" else pipeline.cycle("once")
        print(
            f"read {stats.rows_read}, enqueued {stats.enqueued}, sent {stats.sent} "
            f"(created {stats.created}, updated {stats.updated}), failed {stats.failed}, "
            f"invalid {stats.invalid}, skipped {stats.skipped}, dead {stats.dead}, {stats.duration_s:.1f}s",
            file=out,
        )
        if stats.paused:
            _print_error(ConfigError(f"发送已暂停 / sending paused by a configuration error: {stats.paused}"))
        if stats.unreachable:
            what = "nothing was sent" if not stats.sent else f"{stats.sent} sent before it stopped answering"
            _print_error(
                TransientError(
                    f"平台不可达，发送已暂停 / the platform {settings.upstream.base_url} could not be reached, "
                    f"{what}: {stats.unreachable}",
                    hint="the records wait, nothing is charged to them, and they go out when the platform answers "
                    "again; check the network, the firewall and upstream.base_url, then run the command again later",
                )
            )
        return _exit_for(store)
    return EXIT_UNEXPECTED  # pragma: no cover - ExitStack does not swallow


def cmd_once(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    return _one_shot(args, settings, out, "once")


def cmd_reconcile(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    return _one_shot(args, settings, out, "reconcile")


def cmd_run(_args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from sync.daemon import Daemon

    store = _store(settings)
    with ExitStack() as stack:
        stack.callback(store.dispose)
        store.ensure_schema()
        lock = stack.enter_context(store.instance_lock(command="run"))
        pipeline = _pipeline(settings, store)
        pipeline.his.check()
        return Daemon(settings, pipeline, lock=lock).run()
    return EXIT_UNEXPECTED  # pragma: no cover


def cmd_status(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from sync import clock
    from sync.clock import utcnow

    store = _store(settings, create=False)
    try:
        store.ensure_schema()
        summary = store.summary(now=utcnow())
        cursor = store.queue.get_cursor()
        his_clock = clock.current(store.state.get_his_clock(), cursor[0] if cursor else None, now_utc=utcnow())
    finally:
        store.dispose()
    data = _summary_dict(summary, utcnow(), key_form_setting=settings.upstream.app_key_form)
    data["outbox"] = store.url_for_humans
    data["his_clock"] = his_clock
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str), file=out)
        return EXIT_OK
    print(_render_status(data), file=out)
    return EXIT_OK


def _summary_dict(summary: Any, now: datetime, *, key_form_setting: str = "auto") -> dict[str, Any]:
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


def _render_status(d: dict[str, Any]) -> str:
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
        return ["  HIS 时钟 HIS clock: not read yet (no poll has run)"]
    read_at = datetime.fromisoformat(str(c["read_at"])) if c.get("read_at") else None
    age = f", read {_human_age(int((_utcnow() - read_at).total_seconds()))} ago" if read_at else ""
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


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _human_age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def cmd_retry(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from sync.clock import utcnow
    from sync.outbox.model import Status

    store = _store(settings, create=False)
    try:
        store.ensure_schema()
        if args.lsh:
            n = store.queue.requeue(now=utcnow(), lshs=list(args.lsh))
        else:
            n = store.queue.requeue(now=utcnow(), statuses=[Status(args.status)])
    finally:
        store.dispose()
    print(f"requeued {n} record(s): they are sent at the next cycle (or run `crowd-sync once`)", file=out)
    return EXIT_OK


def cmd_lookup(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    id_number = args.id_number.strip().upper()
    if not id_number:
        raise ConfigError("ID_NUMBER is empty", hint="crowd-sync lookup 510100198506020036")
    store = _store(settings)
    try:
        store.ensure_schema()
        # Through the outbox's shared token: a login of its own would push the daemon out (FAQ 4).
        client = app.make_client(settings, store)
        try:
            result = client.lookup(id_number)
        finally:
            client.close()
    finally:
        store.dispose()
    data = _person_dict(result.person, id_number, settings)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2), file=out)
    else:
        print(_render_person(data), file=out)
    return EXIT_OK


_LABEL_LISTS = (
    ("rkxBq", "demographic"),
    ("jjxBq", "socio_economic"),
    ("jkBq", "health"),
    ("glztBq", "management"),
)


def _person_dict(person: Any, id_number: str, settings: Settings) -> dict[str, Any]:
    """The `lookup --json` answer: the same keys whether the person is found or not
    (the HIS parses them; the READMEs list them). The ID number is masked."""
    from sync import counties, labels

    own = settings.institution.platform_county_code
    household = person.household_county if person is not None else None
    items: list[dict[str, Any]] = []
    if person is not None:
        for list_key, attr in _LABEL_LISTS:
            for lbl in getattr(person, attr):
                family = labels.family_of(lbl.code) if lbl.code else None
                items.append(
                    {
                        "code": lbl.code or None,
                        "name": lbl.name or labels.label_name(lbl.code) or None,
                        "family": family,
                        "family_name": labels.family_name(family) if family else None,
                        "list": list_key,
                        "remark": lbl.remark,
                        "credit_constrained": lbl.attr1 == "1",
                    }
                )
    return {
        "id_number": logs.mask_id(id_number),
        "found": person is not None,
        "key_population": bool(person is not None and person.is_key_population),
        "name": person.name if person is not None else None,
        "credit_constrained": bool(person is not None and person.credit_constrained),
        "insured": person.insured if person is not None else None,
        "household_county": household,
        "household_county_name": person.household_county_name if person is not None else None,
        "household_county_table_name": counties.name(household),
        "own_county": own,
        "own_county_name": counties.name(own),
        "in_own_county": _in_own_county(household, own),
        "labels": items,
    }


def _in_own_county(household: str | None, own: str | None) -> bool | None:
    """None when it cannot be told: the front desk must not read "no" into a gap, nor
    into a hospital code that is not the platform's (a HIS code missing from county_map)."""
    from sync import counties

    if not household or not own:
        return None
    if household == own:
        return True
    return False if counties.known(own) else None


def _yes_no(value: bool) -> str:
    return "是 / yes" if value else "否 / no"


def _render_person(d: dict[str, Any]) -> str:
    if not d["found"]:
        return (
            f"{d['id_number']}: 平台无此人数据，不是重点人群 / not in the key population (the platform returned no data)\n"
            "  如应为重点人群，请区县卫健局导入其标签 / if the person should be, the county health bureau must "
            "import them with labels (FAQ 15)"
        )
    head = "重点人群 / key population" if d["key_population"] else "无标签，不按重点人群处理 / no labels: not key population (FAQ 15)"
    lines = [
        f"{d['id_number']} {d['name'] or ''} — {head}",
        f"  信用约束 credit-constraint list: {_yes_no(d['credit_constrained'])}",
        f"  户籍地 household county: {_county_text(d)}",
    ]
    own = d["own_county"]
    if not own:
        own_text = "未知 / unknown — institution.county_code is not set"
    elif d["in_own_county"] is None and not d["household_county"]:
        own_text = "未知 / unknown — the platform gave no household county"
    elif d["in_own_county"] is None:
        own_text = (
            f"未知 / unknown — {own} is not a platform county code (document section 5): "
            "check institution.county_code and institution.county_map"
        )
    else:
        own_text = _yes_no(d["in_own_county"])
    where = f" ({own} {d['own_county_name'] or ''})".replace(" )", ")") if own else ""
    lines.append(f"  本县户籍 registered in the hospital's county{where}: {own_text}")
    if d["labels"]:
        lines.append("  标签 labels:")
        family: object = object()
        for lbl in d["labels"]:
            if lbl["family"] != family:
                family = lbl["family"]
                lines.append(f"    {family or '-'} {lbl['family_name'] or ''}".rstrip())
            flag = " — 信用约束 / credit-constrained" if lbl["credit_constrained"] else ""
            lines.append(f"      {lbl['code'] or '-'} {lbl['name'] or ''}{flag}")
    return "\n".join(lines)


def _county_text(d: dict[str, Any]) -> str:
    code, answered, listed = d["household_county"], d["household_county_name"], d["household_county_table_name"]
    if not code:
        return "- (平台未返回 / not in the answer)"
    text = f"{code} {answered or listed or ''}".rstrip()
    if listed is None:
        return f"{text} (不在区划表中 / not in the county table, document section 5)"
    if answered and answered != listed:
        return f"{text} (区划表 county table: {listed})"
    return text


def cmd_report(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from pathlib import Path

    from sync import report
    from sync.files import write_private

    store = _store(settings, create=False)
    try:
        store.ensure_schema()
        figures = report.month_report(store, args.month)
    finally:
        store.dispose()
    print(report.render_table(figures, outbox=store.url_for_humans), file=out)
    if args.csv:
        try:
            write_private(Path(args.csv), report.csv_bytes(figures))
        except OSError as exc:
            raise ConfigError(
                f"cannot write the CSV file {args.csv}: {exc.strerror or exc}",
                hint="give --csv a path in a directory that exists and that you may write to",
            ) from None
        print(f"CSV: {args.csv}", file=out)
    return EXIT_OK


def cmd_check(_args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from sync.doctor import run_checks

    failures = run_checks(settings, out=out)
    if not failures:
        return EXIT_OK
    # 75 only when every failure may pass by itself (something unreachable); one thing to fix makes it 2.
    return EXIT_TEMPFAIL if all(isinstance(f, TransientError) for f in failures) else EXIT_CONFIG


def _simulator(args: argparse.Namespace) -> int:
    from sync.upstream import simulator

    argv = [
        "--port", str(args.port), "--host", args.host, "--env", args.env, "--latency-ms", str(args.latency_ms),
        "--key-form", args.key_form,
    ]
    if args.people:
        argv += ["--people", args.people]
    return simulator.main(argv)


# Commands that never call the platform: they work without its credentials.
OFFLINE_COMMANDS = frozenset({"status", "retry", "migrate", "report"})

COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, TextIO], int]] = {
    "migrate": cmd_migrate,
    "once": cmd_once,
    "reconcile": cmd_reconcile,
    "run": cmd_run,
    "status": cmd_status,
    "retry": cmd_retry,
    "lookup": cmd_lookup,
    "check": cmd_check,
    "report": cmd_report,
}
