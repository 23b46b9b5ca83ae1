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
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import date
from pathlib import Path
from typing import Any, NoReturn, TextIO

import structlog

from sync import __version__, app, demo, demo_alliance, doctor, idcard, localtime, logs, report
from sync import settings as settings_mod
from sync.clock import current as his_clock_now
from sync.clock import utcnow
from sync.daemon import Daemon
from sync.errors import ConfigError, SyncError, TransientError
from sync.exits import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_PIPE,
    EXIT_TEMPFAIL,
    EXIT_UNEXPECTED,
    exit_code,
    exit_for,
)
from sync.files import write_private
from sync.outbox.engine import describe_error
from sync.outbox.model import Status
from sync.outbox.store import Store
from sync.settings import Settings, zone
from sync.settings_file import DeprecatedSettingWarning
from sync.upstream import simulator
from sync.views import failures
from sync.views.person import person_data, render_person
from sync.views.progress import progress_display, summary_line
from sync.views.status import render_status, status_data

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="配置文件 / settings file (default: $CROWD_SYNC_CONFIG, then ./settings.yaml)",
    )
    p = _Parser(
        prog="crowd-sync",
        parents=[common],
        description="重点人群“先诊疗后付费”诊疗记录上传 / key-population visit records to the Sichuan platform",
        epilog="退出码 exit codes: 0 完成 done; 3 有记录 failed/invalid/dead 待处理 records left failed/invalid/dead; "
        "2 配置错误 configuration error (settings, credentials, another instance running); "
        "75 暂时不可用，稍后再试 temporarily unavailable, try again later (HIS, outbox or platform unreachable); "
        "1 意外错误 unexpected error",
        add_help=False,
    )
    _help(p)
    p.add_argument("--version", action="version", version=f"crowd-sync {__version__}", help="版本 / show the version")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="命令 commands")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=text, description=text, add_help=False)
        _help(cmd)
        return cmd

    add("run", "服务：定时轮询、发送、夜间对账 / the daemon: scheduled poll, dispatch and nightly reconcile until SIGTERM/SIGINT")
    add("once", "轮询一次新结算，发送到期记录后退出 / one poll of new settlements, then dispatch everything due, then exit")
    rec = add("reconcile", "重读一段时间的 HIS，入队有变化的记录并发送 / re-read a window of the HIS, enqueue what changed, dispatch")
    rec.add_argument("--since", required=True, type=_date, metavar="YYYY-MM-DD",
                     help="从这天起（含）按 HIS 时钟 / first day to read, inclusive (the HIS's clock)")
    rec.add_argument("--until", type=_date, metavar="YYYY-MM-DD",
                     help="到这天止（含），默认到现在 / last day to read, inclusive (default: now)")
    st = add("status", "状态：各状态计数、服务是否运行、下次轮询与对账 / counts per status, whether the daemon runs, "
             "next poll and reconcile, pauses")
    st.add_argument("--json", action="store_true", help="机器可读输出 / machine-readable output")
    fl = add("failures", "未发送的记录及原因与处理办法 / what is not sent, with the reason and the fix")
    fl.add_argument("--status", action="append", choices=["invalid", "failed", "dead", "skipped"], metavar="STATUS",
                    help="只看这些状态（可重复）：invalid|failed|dead|skipped；默认 invalid、failed、dead / "
                    "only these statuses (repeatable); default invalid, failed and dead")
    fl.add_argument("--since", type=_date, metavar="YYYY-MM-DD",
                    help="只看这天（本地时间）以来有变化的 / only records changed since this day (schedule.timezone)")
    fl.add_argument("--json", action="store_true", help="机器可读输出 / machine-readable output")
    sh = add("show", "一次就诊的全过程：HIS 值、报文、每次尝试、平台应答 / one visit's whole story: HIS values, "
             "payload, each attempt, the platform's answers")
    sh.add_argument("lsh", metavar="LSH", help="就诊流水号 / the visit's serial number")
    sh.add_argument("--unmask", action="store_true", help="显示完整证件号 / show ID numbers in full (masked by default)")
    sh.add_argument("--json", action="store_true", help="机器可读输出 / machine-readable output")
    sh.add_argument("--institution", metavar="CODE",
                    help="医共体：该机构的就诊 / in an alliance: that institution's visit (default: the first found)")
    rt = add("retry", "立即重新排队 / requeue records now")
    grp = rt.add_mutually_exclusive_group(required=True)
    grp.add_argument("--lsh", nargs="+", metavar="LSH", help="这些流水号 / these visits")
    grp.add_argument("--status", choices=["failed", "invalid", "dead", "skipped"],
                     help="这个状态的全部记录 / every record in this status")
    ck = add("check", "体检：配置、HIS、outbox、时钟、平台（用共享令牌查询一次标签）/ doctor: settings, HIS, outbox, "
             "clocks, the platform (one label lookup with the shared token)")
    ck.add_argument("--offline", action="store_true", help="不检查平台 / skip the platform checks")
    ck.add_argument("--institution", metavar="CODE", help="只检查该机构的账号 / check this institution's key and "
                    "account only (default: each institution's)")
    lk = add("lookup", "查询一个身份证号的重点人群标签 / ask the label API about one resident ID number")
    lk.add_argument("id_number", metavar="ID_NUMBER", help="18 位居民身份证号 / an 18-character resident ID number")
    lk.add_argument("--json", action="store_true", help="机器可读输出 / machine-readable output")
    lk.add_argument("--institution", metavar="CODE", help="以该机构的账号查询 / ask with this institution's account "
                    "(institutions[].code; default: the only one)")
    add("migrate", "把 outbox 数据库升级到当前结构 / bring the outbox database to the current schema")
    rp = add("report", "按省平台口径统计某月已上传的重点人群就诊 / the month's uploaded key-population visits as the "
             "province counts them")
    rp.add_argument("--month", required=True, type=_month, metavar="YYYY-MM", help="结算月份 / settlement month")
    rp.add_argument("--csv", metavar="FILE",
                    help="另存为 CSV（UTF-8 带 BOM，Excel 可直接打开）/ also write the figures as CSV (opens in Excel)")
    demo = add("demo", "本机完整演示：演示 HIS、内置模拟器、几个周期、状态 / a complete local run: demo HIS, built-in "
               "simulator, a few cycles, status, failures")
    demo.add_argument("--dir", default="var/demo",
                      help="演示数据库目录 / where the demo writes its databases (default var/demo)")
    demo.add_argument(
        "--key-form", choices=["as_printed", "decoded"], default="as_printed",
        help="模拟平台签名所用的授权码读法 / which reading of the app key the simulated platform signs "
        "(the demo's settings keep auto)",
    )
    demo.add_argument("--institutions", type=int, default=1, metavar="N",
                      help="医共体演示：N 个机构共用一个 HIS / an alliance of N institutions sharing one HIS (default 1)")
    sim = add("simulator", "单独运行内置平台模拟器（默认仅本机）/ run the built-in platform simulator alone (loopback by default)")
    sim.add_argument("--port", type=int, default=18080, help="端口 / port to listen on (default 18080)")
    sim.add_argument("--host", default="127.0.0.1", help="监听地址 / address to listen on (default 127.0.0.1)")
    sim.add_argument("--env", choices=["test", "prod"], default="test",
                     help="模拟的环境：事件码与 ehrkey 头 / the environment it plays: event codes and the ehrkey header")
    sim.add_argument("--latency-ms", type=int, default=0, help="每个应答的延迟毫秒 / delay before each answer, ms")
    sim.add_argument("--people", metavar="FILE.json",
                     help="重点人群名单：证件号 -> 标签数据 / key population to serve: ID number -> label data (JSON)")
    sim.add_argument(
        "--key-form", choices=["as_printed", "decoded"], default="as_printed",
        help="平台签名所用的授权码读法 / which reading of the app key the platform signs: as printed (%%2B) or decoded (+)",
    )
    return p


def _help(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-h", "--help", action="help", default=argparse.SUPPRESS, help="显示帮助 / show this help")
    parser._optionals.title = "选项 options"
    parser._positionals.title = "参数 arguments"


class _Formatter(argparse.HelpFormatter):
    def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: str | None = None) -> None:
        super().add_usage(usage, actions, groups, prefix if prefix is not None else "用法 usage: ")


class _Parser(argparse.ArgumentParser):
    """argparse in both languages: its headings, and its errors (exit 2, as any configuration error)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: 参数错误 / usage error: {message}\n"
                  f"  帮助 help: {self.prog} --help\n")


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} 不是日期 / is not a date YYYY-MM-DD") from None


def _month(text: str) -> date:
    try:
        return report.parse_month(text)
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
            logs.configure(level="warning", fmt="console")
            if args.institutions > 1:
                return demo_alliance.main(args.dir, out=out, institutions=args.institutions)
            return demo.main(args.dir, out=out, key_form=args.key_form)
        offline = args.command in OFFLINE_COMMANDS or (args.command == "check" and args.offline)
        settings = _load_settings(getattr(args, "config", None), platform=not offline)
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


def _fail(exc: SyncError) -> int:
    _print_error(exc)
    return exit_code(exc)


def _outbox_error(exc: Exception, settings: Settings | None) -> SyncError | None:
    """A database error that escaped a command comes from the outbox (the HIS source turns its
    own into ConfigError or TransientError): say which database, what it means and the fix."""
    if settings is None or not type(exc).__module__.startswith("sqlalchemy"):
        return None
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
        warnings.simplefilter("always", DeprecatedSettingWarning)
        settings = settings_mod.load(path, platform=platform)
    localtime.configure(settings.schedule.tz)
    logs.configure(level=settings.log.level, fmt=settings.log.format, priority_prefix=settings.log.priority_prefix)
    app.register_secrets(settings)
    for w in caught:
        if issubclass(w.category, settings_mod.CountyCodeWarning):
            log.warning("unknown_county_code", detail=str(w.message))
        elif issubclass(w.category, DeprecatedSettingWarning):
            log.warning("deprecated_setting", detail=str(w.message))
        else:
            log.warning("secret_file_readable_by_others", detail=str(w.message))
    if not settings.upstream.verify_tls and settings.upstream.base_url.startswith("https"):
        log.warning("tls_verification_disabled", setting="upstream.verify_tls", fix="set upstream.verify_tls: true")
    return settings


def _exit_after_run(store: Store, settings: Settings) -> int:
    return exit_for(store.summary(now=utcnow(), institutions=codes(settings)))


def codes(settings: Settings) -> tuple[str, ...]:
    return tuple(m.code for m in settings.members)


# -- commands ---------------------------------------------------------------------


def cmd_migrate(_args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = app.open_store(settings)
    try:
        # Rows already there (an outbox of one institution) are the first institution's.
        before, after = store.migrate(institution=settings.members[0].code)
    finally:
        store.dispose()
    print(f"outbox {store.url_for_humans}: schema {before or '(empty)'} -> {after}", file=out)
    return EXIT_OK


def _one_shot(args: argparse.Namespace, settings: Settings, out: TextIO, kind: str) -> int:
    if kind == "reconcile" and args.until is not None and args.since > args.until:
        raise ConfigError(
            f"--since {args.since} 晚于 --until {args.until} / --since is after --until: the window is empty",
            hint="give the earlier day to --since, e.g. crowd-sync reconcile --since 2026-10-01 --until 2026-10-31",
        )
    store = app.open_store(settings)
    with ExitStack() as stack:
        stack.callback(store.dispose)
        store.ensure_schema()
        lock = stack.enter_context(store.instance_lock(command=kind))
        app.keep_timezone(settings, store)
        pipeline = app.make_pipeline(settings, store, sole_sender=True)
        pipeline.before_dispatch = lock.ensure
        stack.callback(pipeline.close)
        pipeline.his.check()
        with progress_display(pipeline.progress, every_s=settings.log.progress_every_s):
            stats = pipeline.reconcile(args.since, args.until) if kind == "reconcile" else pipeline.cycle("once")
        print(summary_line(stats), file=out)
        if stats.paused:
            _print_error(ConfigError(f"发送已暂停 / sending paused by a configuration error: {stats.paused}"))
        if stats.unreachable:
            what = "nothing was sent" if not stats.sent else f"{stats.sent} sent before it stopped answering"
            _print_error(
                TransientError(
                    f"平台不可达，发送已暂停 / the platform {settings.upstream.base_url} could not be reached, "
                    f"{what}: {stats.unreachable}",
                    hint="记录在等待，不计失败次数，平台恢复后自动发送 / the records wait, nothing is charged to them, "
                    "and they go out when the platform answers again; check the network, the firewall and "
                    "upstream.base_url, then run the command again later",
                )
            )
        return _exit_after_run(store, settings)
    return EXIT_UNEXPECTED  # pragma: no cover - ExitStack does not swallow


def cmd_once(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    return _one_shot(args, settings, out, "once")


def cmd_reconcile(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    return _one_shot(args, settings, out, "reconcile")


def cmd_run(_args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = app.open_store(settings)
    with ExitStack() as stack:
        stack.callback(store.dispose)
        store.ensure_schema()
        lock = stack.enter_context(store.instance_lock(command="run"))
        app.keep_timezone(settings, store)
        pipeline = app.make_pipeline(settings, store, sole_sender=True)
        pipeline.his.check()
        return Daemon(settings, pipeline, lock=lock).run()
    return EXIT_UNEXPECTED  # pragma: no cover


def cmd_status(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = app.open_store(settings, create=False)
    try:
        store.ensure_schema()
        now = utcnow()
        summary = store.summary(now=now, institutions=codes(settings))
        cursor = store.queue.get_cursor()
        his_clock = his_clock_now(store.state.get_his_clock(), cursor[0] if cursor else None, now_utc=now)
        service = store.service()
    finally:
        store.dispose()
    data = status_data(summary, now, outbox=store.url_for_humans, settings=settings, his_clock=his_clock, **service)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str), file=out)
        return EXIT_OK
    print(render_status(data), file=out)
    return EXIT_OK


def cmd_failures(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    tz = settings.schedule.tz
    statuses = list(dict.fromkeys(args.status or failures.DEFAULT_STATUSES))
    store = app.open_store(settings, create=False)
    try:
        store.ensure_schema()
        rows = store.problems(statuses, since=failures.day_start_utc(args.since, tz) if args.since else None)
    finally:
        store.dispose()
    items = failures.failure_items(rows, tz)
    if args.json:
        data = {"statuses": statuses, "since": args.since.isoformat() if args.since else None,
                "timezone": settings.schedule.timezone, "records": items}
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str), file=out)
        return EXIT_OK
    print(failures.render_failures(
        items, statuses=statuses, since=args.since, outbox=store.url_for_humans, zone=settings.schedule.timezone,
        offset=localtime.offset_text(tz), columns=_columns(), institutions=len(settings.members) > 1,
    ), file=out)
    return EXIT_OK


def cmd_show(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = app.open_store(settings, create=False)
    try:
        store.ensure_schema()
        row = store.visit(args.lsh, args.institution)
        if row is None:
            raise ConfigError(
                f"outbox 中没有流水号 / no visit with lsh {args.lsh!r} in the outbox {store.url_for_humans}",
                hint="check the lsh (it is case-sensitive); `crowd-sync failures --status skipped` lists the others "
                "not sent; a visit the HIS query never returned is not in the outbox",
            )
        # An alliance: equal lsh of two institutions are two visits, each with its own story.
        attempts = store.attempts(args.lsh, row["institution"] if len(settings.members) > 1 else None)
        labels = store.cached_labels(str(row["card_no"])) if row.get("card_no") else None
    finally:
        store.dispose()
    tz = settings.schedule.tz
    story = failures.story(row, attempts, labels=labels, tz=tz, his_tz=zone(settings.his_timezone), unmask=args.unmask)
    if args.json:
        print(json.dumps(story, ensure_ascii=False, indent=2, default=str), file=out)
        return EXIT_OK
    print(failures.render_story(
        story, zone=settings.schedule.timezone, offset=localtime.offset_text(tz),
        keep_days=settings.outbox.keep_attempts_days, columns=_columns(),
    ), file=out)
    return EXIT_OK


def _columns() -> int:
    return max(100, shutil.get_terminal_size((140, 40)).columns)


def cmd_retry(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = app.open_store(settings, create=False)
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
    id_number = lookup_id(args.id_number)
    store = app.open_store(settings)
    try:
        store.ensure_schema()
        # Through the outbox's shared token: a login of its own would push the daemon out (FAQ 4).
        member = settings.member(args.institution)
        client = app.make_client(settings, store, institution=member.code)
        try:
            result = client.lookup(id_number)
        finally:
            client.close()
    finally:
        store.dispose()
    data = person_data(result.person, id_number, member.institution)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2), file=out)
    else:
        print(render_person(data), file=out)
    return EXIT_OK


def lookup_id(text: str) -> str:
    """The ID number to ask the label API about, checked first (GB 11643: length, check digit,
    birth date): a mistyped number answers "not key population", which at the front desk
    could deny a patient the policy. ConfigError saying what is wrong otherwise."""
    number = text.strip().upper()
    example = "crowd-sync lookup 510100198506020036"
    if not number:
        raise ConfigError("身份证号为空 / ID_NUMBER is empty", hint=example)
    if not idcard.looks_resident(number):
        raise ConfigError(
            f"{logs.mask_id(number)} 不是居民身份证号，标签接口只能按居民身份证查询 / is not a resident ID number "
            "(18 characters: 17 digits and a digit or X; or 15 digits): the label API knows people by their "
            "resident ID only",
            hint="护照、军官证等证件的就诊按 HIS 的 key_crowd 列判定 / visits with a passport or another document are "
            "decided by the HIS's key_crowd column (key_crowd.source); " + example,
        )
    try:
        idcard.check(number)
    except ValueError as exc:
        raise ConfigError(
            f"{logs.mask_id(number)}: {str(exc).replace(': the number is mistyped in the HIS', '')}",
            hint="核对证件上的号码后重新输入，错号在平台上查不到标签 / check the number against the card and type it "
            "again: a mistyped number never matches anyone's labels",
        ) from None
    birth = idcard.birth_date(number)
    if birth is None or not date(1900, 1, 1) <= birth <= date.today():
        raise ConfigError(
            f"{logs.mask_id(number)}: 出生日期不是有效日期 / the birth date it holds (digits 7 to 14, yyyymmdd) is "
            "not a real date in the past",
            hint="核对证件上的号码 / check the number against the card",
        )
    return number


def cmd_report(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = app.open_store(settings, create=False)
    try:
        store.ensure_schema()
        figures = report.month_report(store, args.month)
        # An alliance: each member apart after the whole.
        apart = [report.month_report(store, args.month, m.code, m.label) for m in (settings.members if len(settings.members) > 1 else ())]
    finally:
        store.dispose()
    print(report.render_table(figures, outbox=store.url_for_humans), file=out)
    for member_figures in apart:
        print("\n" + report.render_table(member_figures), file=out)
    if args.csv:
        try:
            write_private(Path(args.csv), report.csv_bytes(figures))
        except OSError as exc:
            raise ConfigError(
                f"无法写入 CSV 文件 / cannot write the CSV file {args.csv}: {exc.strerror or exc}",
                hint="--csv 须指向已存在且可写的目录中的路径 / give --csv a path in a directory that exists and that you may write to",
            ) from None
        print(f"CSV: {args.csv}", file=out)
    return EXIT_OK


def cmd_check(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    found = doctor.run_checks(settings, out=out, offline=args.offline, institution=args.institution)
    if not found:
        return EXIT_OK
    # 75 only when every failure may pass by itself (something unreachable); one thing to fix makes it 2.
    return EXIT_TEMPFAIL if all(isinstance(f, TransientError) for f in found) else EXIT_CONFIG


def _simulator(args: argparse.Namespace) -> int:
    argv = [
        "--port", str(args.port), "--host", args.host, "--env", args.env, "--latency-ms", str(args.latency_ms),
        "--key-form", args.key_form,
    ]
    if args.people:
        argv += ["--people", args.people]
    return simulator.main(argv)


# Commands that never call the platform: they work without its credentials.
OFFLINE_COMMANDS = frozenset({"status", "retry", "migrate", "report", "failures", "show"})

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
    "failures": cmd_failures,
    "show": cmd_show,
}
