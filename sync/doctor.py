"""`crowd-sync check`: every precondition of a working service, each line saying what it
really tested: OK, WARN (works, but look), FAIL (with the fix) or SKIP (not tested, and why).

The platform is tested for real, with the shared token the service uses: one harmless
authenticated request (a label lookup of the document's probe ID for the environment).
``check`` logs in only when there is no valid shared token: a new login pushes the running
service's session out (FAQ 4). While a valid token exists the password is not tested, and
the line says when it will be (the token's renewal).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from sync import app, localtime
from sync import clock as his_clocks
from sync.dberrors import DB_ERRORS
from sync.errors import SyncError, TransientError, platform_said
from sync.his import HisSource
from sync.logs import mask_id
from sync.outbox.engine import describe_error
from sync.outbox.migrate import head_revision
from sync.outbox.store import Store
from sync.settings import Member, Settings
from sync.upstream.client import Client
from sync.upstream.keyform import FORM_NAMES
from sync.upstream.tokens import Token, TokenStore, utcnow

# Document section 3.1: ID numbers that answer with labels in each environment.
PROBE_IDS = {"test": "510100198506020036", "prod": "110104198506020037"}
MAX_SKEW_S = 300
_TAGS = {"OK": "[ OK ]", "WARN": "[WARN]", "SKIP": "[SKIP]", "FAIL": "[FAIL]"}


@dataclass(frozen=True)
class Line:
    """What one check found: ``level`` is OK, WARN or SKIP (a FAIL is raised as SyncError)."""

    level: str
    detail: str


def ok(detail: str) -> Line:
    return Line("OK", detail)


def warn(detail: str) -> Line:
    return Line("WARN", detail)


def skip(detail: str) -> Line:
    return Line("SKIP", detail)


class TokenRefused(TransientError):
    """The platform refused the shared token, and check may not log in again to replace it."""


class NoNewLogin:
    """The shared token store, except that a token still valid is never replaced by a login
    of check's own: the refusal is reported instead (FAQ 4: a login pushes the service out)."""

    def __init__(self, store: TokenStore, *, may_login: bool) -> None:
        self._store = store
        self._may_login = may_login

    def current(self) -> Token | None:
        return self._store.current()

    def renew(self, stale: str | None, login: Callable[[], Token]) -> Token:
        if not self._may_login:
            raise TokenRefused(
                "平台拒绝了共享令牌 / the platform refused the shared login token (pushed out by another login with "
                "this account, or expired early)",
                hint="check does not log in again while the service may be using it (FAQ 4): the service logs in "
                "anew at its next request; run `crowd-sync check` again after that. If another program logs in "
                "with upstream.username, stop it or give it an account of its own",
            )
        return self._store.renew(stale, login)

    def discard(self, value: str) -> None:
        self._store.discard(value)


def run_checks(
    settings: Settings, *, out: TextIO, offline: bool = False, institution: str | None = None
) -> list[SyncError]:
    """Run every check, print one line each; return what failed (empty when nothing did).
    The platform is checked with each institution's key and account (``institution``: one)."""
    checkup = _Checkup(settings, out)
    try:
        members = [settings.member(institution)] if institution is not None else list(settings.members)
        checkup.run(offline=offline, members=members)
    finally:
        checkup.close()
    if checkup.failures:
        n = len(checkup.failures)
        print(f"{n} 项失败 / {n} check(s) failed", file=out)
    else:
        extra = ", ".join(f"{n} {word}" for word, n in (("warning(s)", checkup.seen["WARN"]),
                                                        ("skipped", checkup.seen["SKIP"])) if n)
        print("全部通过 / all checks passed" + (f" ({extra})" if extra else ""), file=out)
    return checkup.failures


class _Checkup:
    """One `check`: what it opened (closed at the end), what failed, what was skipped."""

    def __init__(self, settings: Settings, out: TextIO) -> None:
        self.settings = settings
        self.out = out
        self.failures: list[SyncError] = []
        self.seen = {"WARN": 0, "SKIP": 0}
        self.store: Store | None = None
        self.his: HisSource | None = None
        self.client: Client | None = None
        self.held: Token | None = None  # the shared token, when still valid
        self.member = settings.members[0]

    def run(self, *, offline: bool, members: list[Member]) -> None:
        """Every check in order."""
        self.say("OK", "settings", f"{self.settings.source_path} 已读取并校验 / read, every setting known and valid")
        outbox_ok = self.report("outbox", self.outbox)
        if self.report("HIS database and query", self.his_query):
            self.report("HIS clock", self.his_clock)
        else:
            self.say("SKIP", "HIS clock", "未测试：HIS 无法使用 / not tested: the HIS check failed")
        if offline:
            self.say("SKIP", "platform", "--offline：未测试登录、标签查询、授权码读法与平台时钟 / not tested: login, "
                     "label lookup, app key reading and the platform's clock")
            return
        if not outbox_ok or self.store is None:
            self.say("SKIP", "platform", "未测试：需要 outbox（共享登录令牌存在其中）/ not tested: it needs the "
                     "outbox (it keeps the shared login token)")
            return
        for member in members:
            self.platform(member, named=len(self.settings.members) > 1)

    def platform(self, member: Member, *, named: bool) -> None:
        """The platform checks with one institution's key, account and shared token."""
        assert self.store is not None
        if self.client is not None:
            self.client.close()
        self.member = member
        of = f" [{member.label}]" if named else ""
        shared = self.store.token_store(member.code)
        tok = shared.current()
        self.held = tok if tok is not None and tok.valid_at(utcnow()) else None
        # Never a login of check's own while the service's token is valid (FAQ 4).
        self.client = app.make_client(
            self.settings, self.store, tokens=NoNewLogin(shared, may_login=self.held is None), institution=member.code
        )
        logged_in = self.report("platform login" + of, self.login) or self.held is not None
        answered = False
        if logged_in:
            answered = self.report("label lookup" + of, self.lookup)
        else:
            self.say("SKIP", "label lookup" + of, "未测试：没有可用的登录令牌 / not tested: no login token to ask with")
        self.report("app key reading" + of, self.key_form)
        if answered:
            self.report("clock" + of, self.clock)
        else:
            self.say("SKIP", "clock" + of, "未测试：平台没有应答 / not tested: no answer from the platform to compare with")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.his is not None:
            self.his.dispose()
        if self.store is not None:
            self.store.dispose()

    def say(self, level: str, name: str, detail: str) -> None:
        print(f"{_TAGS[level]} {name}: {detail}" if detail else f"{_TAGS[level]} {name}", file=self.out)
        if level in self.seen:
            self.seen[level] += 1

    def report(self, name: str, check: Callable[[], Line]) -> bool:
        """One line for ``check``; a FAIL with what the platform said and the fix. False unless
        it was tested and passed (OK or WARN)."""
        try:
            line = check()
        except SyncError as exc:
            self.failures.append(exc)
            self.say("FAIL", name, exc.message)
            said = platform_said(exc)
            if said:
                print(f"       平台返回 platform said: {said}", file=self.out)
            if exc.hint:
                print(f"       处理 fix: {exc.hint}", file=self.out)
            return False
        self.say(line.level, name, line.detail)
        return line.level != "SKIP"

    # -- the checks -------------------------------------------------------------------------

    def outbox(self) -> Line:
        self.store = store = app.open_store(self.settings)
        try:
            store.ensure_schema()
        except DB_ERRORS as exc:
            # Unreachable, refused or unusable: a FAIL line with the fix, and the other checks go on.
            described = describe_error(exc, self.settings.outbox.url.get_secret_value())
            if described is None:
                raise
            raise described from None
        return ok(f"{store.url_for_humans}: 已连接，结构为最新 / connected, schema at {head_revision()} (current)")

    def his_query(self) -> Line:
        self.his = app.make_his(self.settings)
        columns = self.his.check()
        return ok(
            f"{self.his.display_url}: 已连接并以空时间窗执行查询 / connected, ran his.query over an empty window: "
            f"it returns the {len(columns)} expected columns"
        )

    def his_clock(self) -> Line:
        assert self.his is not None
        zone = self.settings.schedule.timezone
        reading = self.his.clock()
        found = his_clocks.findings(reading, self.his.probe(reading), host_zone=zone)
        if found:
            raise SyncError("; ".join(f.message for f in found), hint=" — ".join(f.fix for f in found))
        return ok(his_clocks.note(reading, host_zone=zone))

    def _client(self) -> Client:
        assert self.client is not None
        return self.client

    def login(self) -> Line:
        if self.held is not None:
            renewal = localtime.text(self.held.expires_at)
            return skip(
                f"未测试密码：共享令牌有效至 {renewal}，重新登录会把正在运行的服务挤下线（FAQ 4）/ password not "
                f"tested now: the shared token is valid until {renewal}, and a new login would push out the "
                f"running service's session (FAQ 4); it is tested when the token is renewed, at {renewal}"
            )
        assert self.store is not None
        tok = self.store.token_store(self.member.code).renew(None, self._client().login)
        user = self.member.upstream.username
        return ok(
            f"已以 {user} 登录，密码有效 / logged in as {user}: the password works; the token is shared with the "
            f"service until {localtime.text(tok.expires_at)}"
        )

    def lookup(self) -> Line:
        up = self.settings.upstream
        probe = PROBE_IDS[up.env]
        started = time.monotonic()
        result = self._client().lookup(probe)
        took = time.monotonic() - started
        zh, en = ("共享令牌", "the shared token") if self.held is not None else ("新令牌", "the new token")
        where = f"{up.base_url} ({up.env})"
        if result.person is None:
            return warn(
                f"{where} 已应答（{zh}），但文档的探测身份证号没有标签 / answered with {en} in {took:.2f} s, "
                f"but with no labels for the document's probe ID {mask_id(probe)}: the platform works; check "
                "that upstream.env matches the platform (test and prod have different probe IDs)"
            )
        return ok(
            f"{where} 用{zh}查询标签已应答 / a label lookup of the document's probe ID {mask_id(probe)} "
            f"answered with {en} in {took:.2f} s: {len(result.person.labels)} label(s)"
        )

    def key_form(self) -> Line:
        state = self._client().key_form()
        if state.setting != "auto":
            taken = "accepted by the platform" if state.confirmed else "not accepted by the platform yet"
            return ok(f"{FORM_NAMES[state.form]}, pinned by upstream.app_key_form ({taken})")
        if state.confirmed:
            return ok(f"the platform accepts {FORM_NAMES[state.form]}; remembered in the outbox for every process")
        return warn(f"尚未确定 / none accepted yet (upstream.app_key_form: auto tries {FORM_NAMES[state.form]} first)")

    def clock(self) -> Line:
        skew = self._client().clock_skew_s()
        if skew is None:
            return warn(
                "平台应答没有 Date 头，无法比较时钟 / the platform sent no Date header: this host's clock could not be "
                "compared with it; keep it synchronised (chrony/ntp): the platform refuses time stamps that are not "
                "current with (401) 未经授权"
            )
        if abs(skew) > MAX_SKEW_S:
            raise SyncError(
                f"本机时钟与平台相差 / this host's clock differs from the platform's by {skew:+.0f} s",
                hint="the platform answers (401) 未经授权 when hie_time_stamp is not current: "
                "synchronise the clock (chrony/ntp)",
            )
        return ok(f"与平台相差 {abs(skew):.0f} 秒 / within {abs(skew):.0f} s of the platform's Date header")
