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
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from datetime import date, datetime
from typing import Any, NoReturn, TextIO

import structlog

from sync import __version__, localtime, logs
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
    rt = add("retry", "立即重新排队 / requeue records now")
    grp = rt.add_mutually_exclusive_group(required=True)
    grp.add_argument("--lsh", nargs="+", metavar="LSH", help="这些流水号 / these visits")
    grp.add_argument("--status", choices=["failed", "invalid", "dead", "skipped"],
                     help="这个状态的全部记录 / every record in this status")
    ck = add("check", "体检：配置、HIS、outbox、时钟、平台（用共享令牌查询一次标签）/ doctor: settings, HIS, outbox, "
             "clocks, the platform (one label lookup with the shared token)")
    ck.add_argument("--offline", action="store_true", help="不检查平台 / skip the platform checks")
    lk = add("lookup", "查询一个身份证号的重点人群标签 / ask the label API about one resident ID number")
    lk.add_argument("id_number", metavar="ID_NUMBER", help="18 位居民身份证号 / an 18-character resident ID number")
    lk.add_argument("--json", action="store_true", help="机器可读输出 / machine-readable output")
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
    from sync.outbox.store import describe_error

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
        warnings.simplefilter("always", settings_mod.DeprecatedSettingWarning)
        settings = settings_mod.load(path, platform=platform)
    localtime.configure(settings.schedule.tz)
    logs.configure(level=settings.log.level, fmt=settings.log.format, priority_prefix=settings.log.priority_prefix)
    _register_secrets(settings)
    for w in caught:
        if issubclass(w.category, settings_mod.CountyCodeWarning):
            log.warning("unknown_county_code", detail=str(w.message))
        elif issubclass(w.category, settings_mod.DeprecatedSettingWarning):
            log.warning("deprecated_setting", detail=str(w.message))
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
    """The outbox. ``create=False`` for commands that only read it or need what it holds:
    they never create or migrate one (a wrong outbox.url must not look like an empty outbox)."""
    from sync.outbox.store import Store

    store = Store(settings.outbox.url.get_secret_value(), lease_s=settings.outbox.lease_s, create=create)
    return store


def _pipeline(settings: Settings, store: Any) -> Any:
    """The pipeline of a command holding the instance lock: the only process sending."""
    from sync.pipeline import Pipeline
    from sync.upstream.client import Client

    client = Client(settings.upstream, store.token_store(), key_forms=store.key_form_memory())
    return Pipeline(settings, store=store, client=client, sole_sender=True)


def _exit_for(store: Any) -> int:
    from sync.pipeline import utcnow

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
    if kind == "reconcile" and args.until is not None and args.since > args.until:
        raise ConfigError(
            f"--since {args.since} 晚于 --until {args.until} / --since is after --until: the window is empty",
            hint="give the earlier day to --since, e.g. crowd-sync reconcile --since 2026-10-01 --until 2026-10-31",
        )
    store = _store(settings)
    with ExitStack() as stack:
        stack.callback(store.dispose)
        store.ensure_schema()
        lock = stack.enter_context(store.instance_lock(command=kind))
        _keep_timezone(store, settings)
        pipeline = _pipeline(settings, store)
        pipeline.before_dispatch = lock.ensure
        stack.callback(pipeline.close)
        pipeline.his.check()
        with _progress_display(pipeline.progress, settings):
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
        return _exit_for(store)
    return EXIT_UNEXPECTED  # pragma: no cover - ExitStack does not swallow


def summary_line(stats: Any) -> str:
    """The one-line summary of once and reconcile, in both languages."""
    return (
        f"读取 {stats.rows_read}，入队 {stats.enqueued}，已发送 {stats.sent}（新增 {stats.created}，修改 {stats.updated}），"
        f"失败 {stats.failed}，不合规 {stats.invalid}，非重点人群 {stats.skipped}，放弃 {stats.dead} / "
        f"read {stats.rows_read}, enqueued {stats.enqueued}, sent {stats.sent} "
        f"(created {stats.created}, updated {stats.updated}), failed {stats.failed}, "
        f"invalid {stats.invalid}, skipped {stats.skipped}, dead {stats.dead}, {stats.duration_s:.1f}s"
    )


def _progress_display(progress: Any, settings: Settings) -> Any:
    """The live display on a terminal (stderr), else a progress log line every few seconds."""
    from contextlib import contextmanager

    from sync.progress import LiveDisplay, Ticker

    @contextmanager
    def shown() -> Iterator[None]:
        if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
            with LiveDisplay(progress, sys.stderr):
                yield
            return
        ticker = Ticker(progress, every_s=settings.log.progress_every_s).start()
        try:
            yield
        finally:
            ticker.stop()

    return shown()


def _keep_timezone(store: Any, settings: Settings) -> None:
    """The DBA views count days in schedule.timezone: keep its offset in the outbox."""
    from sync.pipeline import utcnow

    tz = settings.schedule.tz
    try:
        store.put_timezone(settings.schedule.timezone, offset_minutes=localtime.offset_minutes(tz), now=utcnow())
    except Exception as exc:  # noqa: BLE001 - the views' day boundary must never stop the work
        log.warning("timezone_not_saved", error=f"{type(exc).__name__}: {exc}")


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
        _keep_timezone(store, settings)
        pipeline = _pipeline(settings, store)
        pipeline.his.check()
        return Daemon(settings, pipeline, lock=lock).run()
    return EXIT_UNEXPECTED  # pragma: no cover


def cmd_status(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from sync import status

    store = _store(settings, create=False)
    try:
        store.ensure_schema()
        data = status.gather(store, settings)
    finally:
        store.dispose()
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str), file=out)
        return EXIT_OK
    print(status.render(data), file=out)
    return EXIT_OK


def cmd_failures(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    import shutil

    from sync import failures, status

    tz = settings.schedule.tz
    statuses = list(dict.fromkeys(args.status or failures.DEFAULT_STATUSES))
    since = status.day_start_utc(args.since, tz) if args.since else None
    store = _store(settings, create=False)
    try:
        store.ensure_schema()
        rows = store.problems(statuses, since=since)
    finally:
        store.dispose()
    items = failures.failure_items(rows, tz)
    if args.json:
        print(json.dumps(
            {"statuses": statuses, "since": args.since.isoformat() if args.since else None,
             "timezone": settings.schedule.timezone, "records": items},
            ensure_ascii=False, indent=2, default=str,
        ), file=out)
        return EXIT_OK
    print(failures.render_failures(
        items, statuses=statuses, since=args.since, outbox=store.url_for_humans, zone=settings.schedule.timezone,
        offset=_offset_text(tz), columns=max(100, shutil.get_terminal_size((140, 40)).columns),
    ), file=out)
    return EXIT_OK


def cmd_show(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    import shutil

    from sync import failures
    from sync.settings import zone

    store = _store(settings, create=False)
    try:
        store.ensure_schema()
        row = store.visit(args.lsh)
        if row is None:
            raise ConfigError(
                f"outbox 中没有流水号 / no visit with lsh {args.lsh!r} in the outbox {store.url_for_humans}",
                hint="check the lsh (it is case-sensitive); `crowd-sync failures --status skipped` lists the others "
                "not sent; a visit the HIS query never returned is not in the outbox",
            )
        attempts = store.attempts(args.lsh)
        labels = store.cached_labels(str(row["card_no"])) if row.get("card_no") else None
    finally:
        store.dispose()
    tz = settings.schedule.tz
    story = failures.story(
        row, attempts, labels=labels, tz=tz, his_tz=zone(settings.his_timezone), unmask=args.unmask
    )
    if args.json:
        print(json.dumps(story, ensure_ascii=False, indent=2, default=str), file=out)
        return EXIT_OK
    print(failures.render_story(
        story, zone=settings.schedule.timezone, offset=_offset_text(tz), keep_days=settings.outbox.keep_attempts_days,
        columns=max(100, shutil.get_terminal_size((140, 40)).columns),
    ), file=out)
    return EXIT_OK


def _offset_text(tz: Any) -> str:
    offset = datetime.now(tz).strftime("%z")
    return f"{offset[:3]}:{offset[3:]}"


def cmd_retry(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from sync.outbox.store import Status
    from sync.pipeline import utcnow

    store = _store(settings, create=False)
    try:
        store.ensure_schema()
        if args.lsh:
            n = store.requeue(now=utcnow(), lshs=list(args.lsh))
        else:
            n = store.requeue(now=utcnow(), statuses=[Status(args.status)])
    finally:
        store.dispose()
    print(f"requeued {n} record(s): they are sent at the next cycle (or run `crowd-sync once`)", file=out)
    return EXIT_OK


def cmd_lookup(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from sync.upstream.client import Client

    id_number = lookup_id(args.id_number)
    store = _store(settings)
    try:
        store.ensure_schema()
        # Through the outbox's shared token: a login of its own would push the daemon out (FAQ 4).
        client = Client(settings.upstream, store.token_store(), key_forms=store.key_form_memory())
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


def lookup_id(text: str) -> str:
    """The ID number to ask the label API about, checked first (GB 11643: length, check digit,
    birth date): a mistyped number answers "not key population", which at the front desk
    could deny a patient the policy. ConfigError saying what is wrong otherwise."""
    import re

    from sync.records import check_resident_id

    number = text.strip().upper()
    example = "crowd-sync lookup 510100198506020036"
    if not number:
        raise ConfigError("身份证号为空 / ID_NUMBER is empty", hint=example)
    if not re.fullmatch(r"\d{17}[\dX]|\d{15}", number):
        raise ConfigError(
            f"{logs.mask_id(number)} 不是居民身份证号，标签接口只能按居民身份证查询 / is not a resident ID number "
            "(18 characters: 17 digits and a digit or X; or 15 digits): the label API knows people by their "
            "resident ID only",
            hint="护照、军官证等证件的就诊按 HIS 的 key_crowd 列判定 / visits with a passport or another document are "
            "decided by the HIS's key_crowd column (key_crowd.source); " + example,
        )
    try:
        check_resident_id(number)
    except ValueError as exc:
        raise ConfigError(
            f"{logs.mask_id(number)}: {str(exc).replace(': the number is mistyped in the HIS', '')}",
            hint="核对证件上的号码后重新输入，错号在平台上查不到标签 / check the number against the card and type it "
            "again: a mistyped number never matches anyone's labels",
        ) from None
    born = number[6:14] if len(number) == 18 else "19" + number[6:12]
    try:
        birth = date(int(born[:4]), int(born[4:6]), int(born[6:]))
    except ValueError:
        birth = None
    if birth is None or not date(1900, 1, 1) <= birth <= date.today():
        raise ConfigError(
            f"{logs.mask_id(number)}: 出生日期 {born} 不是有效日期 / the birth date it holds ({born}) is not a real "
            "date in the past",
            hint="核对证件上的号码 / check the number against the card: digits 7 to 14 are the birth date yyyymmdd",
        )
    return number


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


def cmd_check(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from sync.doctor import run_checks

    failures = run_checks(settings, out=out, offline=args.offline)
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
