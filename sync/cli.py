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
from datetime import date
from pathlib import Path
from typing import TextIO

import structlog

from sync import __version__, app, demo, doctor, logs, report
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
from sync.settings import Settings
from sync.upstream import simulator
from sync.views.person import person_data, render_person
from sync.views.status import render_status, status_data

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
        settings = settings_mod.load(path, platform=platform)
    logs.configure(level=settings.log.level, fmt=settings.log.format, priority_prefix=settings.log.priority_prefix)
    app.register_secrets(settings)
    for w in caught:
        if issubclass(w.category, settings_mod.CountyCodeWarning):
            log.warning("unknown_county_code", detail=str(w.message))
        else:
            log.warning("secret_file_readable_by_others", detail=str(w.message))
    if not settings.upstream.verify_tls and settings.upstream.base_url.startswith("https"):
        log.warning("tls_verification_disabled", setting="upstream.verify_tls", fix="set upstream.verify_tls: true")
    return settings


def _exit_after_run(store: Store) -> int:
    return exit_for(store.summary(now=utcnow()))


# -- commands ---------------------------------------------------------------------


def cmd_migrate(_args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = app.open_store(settings)
    try:
        before, after = store.migrate()
    finally:
        store.dispose()
    print(f"outbox {store.url_for_humans}: schema {before or '(empty)'} -> {after}", file=out)
    return EXIT_OK


def _one_shot(args: argparse.Namespace, settings: Settings, out: TextIO, kind: str) -> int:
    store = app.open_store(settings)
    with ExitStack() as stack:
        stack.callback(store.dispose)
        store.ensure_schema()
        lock = stack.enter_context(store.instance_lock(command=kind))
        pipeline = app.make_pipeline(settings, store, sole_sender=True)
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
        return _exit_after_run(store)
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
        pipeline = app.make_pipeline(settings, store, sole_sender=True)
        pipeline.his.check()
        return Daemon(settings, pipeline, lock=lock).run()
    return EXIT_UNEXPECTED  # pragma: no cover


def cmd_status(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = app.open_store(settings, create=False)
    try:
        store.ensure_schema()
        summary = store.summary(now=utcnow())
        cursor = store.queue.get_cursor()
        his_clock = his_clock_now(store.state.get_his_clock(), cursor[0] if cursor else None, now_utc=utcnow())
    finally:
        store.dispose()
    data = status_data(
        summary, utcnow(), outbox=store.url_for_humans, key_form_setting=settings.upstream.app_key_form,
        his_clock=his_clock,
    )
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str), file=out)
        return EXIT_OK
    print(render_status(data), file=out)
    return EXIT_OK


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
    id_number = args.id_number.strip().upper()
    if not id_number:
        raise ConfigError("ID_NUMBER is empty", hint="crowd-sync lookup 510100198506020036")
    store = app.open_store(settings)
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
    data = person_data(result.person, id_number, settings.institution)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2), file=out)
    else:
        print(render_person(data), file=out)
    return EXIT_OK


def cmd_report(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = app.open_store(settings, create=False)
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
    failures = doctor.run_checks(settings, out=out)
    if not failures:
        return EXIT_OK
    # 75 only when every failure may pass by itself (something unreachable); one thing to fix makes it 2.
    return EXIT_TEMPFAIL if all(isinstance(f, TransientError) for f in failures) else EXIT_CONFIG


def _simulator(args: argparse.Namespace) -> int:
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
