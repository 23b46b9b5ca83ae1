"""What a platform answer means, and what to do about it (document section 6).

Pure: no I/O. ``classify`` turns an HTTP status and body into an ``Answer``
whose outcome says what the caller does next, with the FAQ's fix in plain
words. The platform reports most business errors as HTTP 200 with a JSON
``message``, while its gateways answer with real HTTP statuses and sometimes
plain text or HTML, so the message text is read first, whatever the status.

Success is narrow: for an upload only ``data`` 新增成功 / 修改成功 (document 3.2),
for a login ``code`` 200 with a token, for a label lookup ``code`` 200 with
``data`` null or an object. Anything else is a failure, whatever its ``code``.
Failures are sorted by whose fault they are:

- the platform's (TRANSIENT): the network, timeouts, 5xx, HTML pages, cut-off or
  unreadable bodies, a bare ``{"code":500}`` that says nothing. Sending pauses;
  no record is charged.
- unexplained (GENERIC): the platform's application answered without accepting
  and without a reason the document lists (a bare 中间请求异常, a ``code`` 200
  without a success answer such as 保存失败, an unknown message). Retried with
  the record's own back-off, never given up on: nothing says the record is wrong.
- the record's (INVALID): 参数校验错误, the only answer that names the record's
  problem.
- the configuration's (CONFIG) and the token's (AUTH), as the FAQ says.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sync.errors import AuthError, ConfigError, InvalidRecord, PlatformUnavailable, SyncError, TransientError
from sync.logs import redact

# Raw bodies kept in an answer are cut here: an HTML error page says nothing more after that.
MAX_MESSAGE_CHARS = 500


class Outcome(StrEnum):
    OK = "ok"
    AUTH = "auth"  # the token was refused: log in again once, then retry
    TRANSIENT = "transient"  # the platform or the network is not working: pause sending, charge no record
    GENERIC = "generic"  # not accepted, no reason given (bare 中间请求异常, 200 without 新增成功): retry later
    CONFIG = "config"  # the same for every record: stop and tell the operator
    INVALID = "invalid"  # this record is wrong: park it with the platform's reasons


@dataclass(frozen=True, kw_only=True)
class FaqEntry:
    faq: int | None  # question number in the document's section 6, when it has one
    pattern: re.Pattern[str]  # searched in the platform's message text
    example: str  # the message as the platform returns it
    outcome: Outcome
    cause: str
    fix: str  # Chinese first, then English


def _entry(faq: int | None, pattern: str, example: str, outcome: Outcome, cause: str, fix: str) -> FaqEntry:
    return FaqEntry(
        faq=faq, pattern=re.compile(pattern, re.IGNORECASE), example=example, outcome=outcome, cause=cause, fix=fix
    )


_KEY_FIX = (
    "请检查 app_key：测试环境使用测试 app_key，正式环境使用医院下发的 app_key / "
    "check upstream.app_key: use the test app key in test and the hospital's own key in prod"
)
_WEB_LOGIN_URL = "https://ehr.scwjxx.cn/login.html"
_RELOGIN_FIX = (
    "accesstoken 未携带或已过期（正式环境有效期 12 小时），将自动重新登录一次 / "
    "the access token is missing or expired (12 hours in prod): crowd-sync logs in again once"
)

# Order matters: the first match wins, so specific texts come before the bare
# 中间请求异常 that prefixes some of them.
FAQ: tuple[FaqEntry, ...] = (
    _entry(
        1, r"没找到该appKey对应的权限记录", "没找到该appKey对应的权限记录,或是该权限记录已被停用", Outcome.CONFIG,
        "app key unknown or disabled in this environment", _KEY_FIX,
    ),
    _entry(
        2, r"路径【.*】\s*跟\s*eventCode【.*】\s*不匹配",
        "中间请求异常：路径【/adapter/http/ehrc/v1.0/api/ehr/rybq/510100198506020036】跟eventCode【12345678】不匹配",
        Outcome.CONFIG, "event code does not match the path",
        "请求路径与 event_code 不匹配：请核对 upstream.env，并删除错误的 upstream.event_codes / "
        "path and event code do not match: check upstream.env and remove wrong upstream.event_codes overrides",
    ),
    _entry(
        3, r"Missing API key", "Missing API key found in request", Outcome.CONFIG,
        "test environment request without the ehrkey header",
        "测试环境请求头须带 ehrkey：连接测试平台时请设置 upstream.env: test / "
        "the test platform requires the ehrkey header: set upstream.env: test when base_url is the test platform",
    ),
    _entry(
        4, r"在其他地方登录.*被挤出", "你的账号于[2024-07-18 09:29:07]，在其他地方登录，当前账号被挤出", Outcome.AUTH,
        "the token was replaced by a newer login of the same account",
        "同一账号在别处重新登录，旧 token 失效；请勿让多个程序各自登录同一账号 / "
        "the account logged in again elsewhere: do not let other programs log in with this hospital's account",
    ),
    _entry(
        5, r"用户不存在或密码错误", "用户不存在或密码错误", Outcome.CONFIG,
        "wrong username or password, or a password the interface login cannot take",
        "请检查 upstream.username 和 upstream.password；网站能登录而接口不能时，请把密码改为不含 * 等特殊字符的密码 / "
        "check upstream.username and upstream.password; if the web site accepts them, change the password "
        "to one without special characters such as *",
    ),
    # FAQ 11: the first production login must change the password on the web site. The
    # document gives no exact answer text, so these are the phrases such an answer would
    # use (assumed): 首次/第一次/初次登录, 修改(初始)密码, 初始/默认密码, 密码(已)过期.
    _entry(
        11, r"首次登录|第一次登录|初次登录|修改密码|修改初始密码|初始密码|默认密码|密码已?过期",
        "首次登录需要修改密码", Outcome.CONFIG,
        "the account must change its password on the web site before the interface accepts it (FAQ 11)",
        f"正式环境首次登录需要修改密码：请登录 {_WEB_LOGIN_URL} 修改密码（不要含 * 等特殊字符），"
        "再把新密码写入 upstream.password；如需重置请联系医院管理员 / "
        f"the first production login must change the password: log in at {_WEB_LOGIN_URL}, change it "
        "there (no special characters such as *), then put the new password in upstream.password",
    ),
    _entry(
        6, r"签名认证未通过", "集成平台适配器提示：签名认证未通过", Outcome.CONFIG,
        "5G private network reached on the wrong port",
        "5G 专网端口用 9091，不要使用 8081 / on the 5G private network use port 9091 (not 8081) in upstream.base_url",
    ),
    _entry(
        7, r"没有访问该接口的权限", "没有访问该接口的权限", Outcome.CONFIG,
        "test event code used in production (or the reverse)",
        "event_code 未替换为正式环境的：正式环境请设置 upstream.env: prod / "
        "the event codes belong to the other environment: set upstream.env to match upstream.base_url",
    ),
    _entry(8, r"请先登录", "请先登录", Outcome.AUTH, "request without an access token", _RELOGIN_FIX),
    _entry(8, r"登录过期或未登录", "登录过期或未登录", Outcome.AUTH, "access token expired or unknown", _RELOGIN_FIX),
    _entry(
        9, r"504\s*G[ae]te\s*way\s*Time-?\s*out", "504 Gateway Time-out", Outcome.TRANSIENT,
        "gateway timeout: the network or the platform is slow",
        "请检查网络是否稳定、是否有丢包；稍后自动重试 / the network is unstable or the platform slow: retried later; "
        "check the link for packet loss if it persists",
    ),
    _entry(
        10, r"加密验证未通过", "加密验证未通过", Outcome.CONFIG, "hie_secret (the MD5 signature) refused",
        "hie_secret 不正确：请确认 upstream.app_key 原样复制（可带 %2B 等编码，但不能编码两次） / "
        "the signature was refused: check upstream.app_key is copied exactly (percent-encoded or not, never twice)",
    ),
    _entry(
        12, r"\(401\)\s*未经授权", "(401) 未经授权", Outcome.CONFIG, "app key wrong, or time stamp not current",
        "请确认 app_key 与环境对应，并确认本机时钟准确（时间戳须为当前时间，请开启 NTP） / "
        "check the app key matches the environment and that this machine's clock is right (enable NTP)",
    ),
    _entry(
        13, r"Method Not Allowed", "Method Not Allowed", Outcome.CONFIG, "wrong HTTP method for this path",
        "请求方式不正确（GET/POST）：请确认 upstream.base_url 直接指向平台，没有代理改写请求 / "
        "wrong HTTP method: check upstream.base_url points at the platform and no proxy rewrites requests",
    ),
    _entry(
        14, r"AppKey与机构id不匹配", "AppKey与机构id不匹配，请核实。", Outcome.CONFIG,
        "app key and account belong to different institutions",
        "请确认 app_key 是本医院的，并且登录账号属于该医院 / "
        "use this hospital's own app key together with an account of this hospital",
    ),
    _entry(
        16, r"授权错误或授权到期", "授权错误或授权到期", Outcome.CONFIG, "app key wrong or expired",
        _KEY_FIX.replace(" / ", "；如已到期请联系卫健委续期 / ") + "; if it expired, ask the health commission to renew it",
    ),
    _entry(
        None, r"参数校验错误", "参数校验错误：诊疗类型不能为空！,证件类型不能为空！,", Outcome.INVALID,
        "the record breaks the document's rules",
        "记录不符合接口规则：请在 HIS 中更正，更正后会自动重新上传 / "
        "the record breaks the interface rules: correct it in the HIS and it is uploaded again",
    ),
    # Last: the bare catch-all, also the prefix of FAQ 2's message.
    _entry(
        17, r"中间请求异常", "中间请求异常", Outcome.GENERIC, "the platform's generic error",
        "集成平台统一返回的错误：已记录完整应答，按退避稍后重试；持续出现请把日志交给平台支持 / "
        "the platform's generic error: retried later with back-off; the whole answer is logged for the "
        "platform's support",
    ),
)

_GENERIC = FAQ[-1]


def faq(number: int) -> FaqEntry:
    """The FAQ row of the document's question ``number``."""
    return next(e for e in FAQ if e.faq == number)


def _faq_fix(number: int) -> str:
    return faq(number).fix


@dataclass(frozen=True, kw_only=True)
class Answer:
    outcome: Outcome
    http_status: int
    code: int | None  # the JSON body's business code, if any
    data: Any  # the JSON body's `data`
    message: str  # the platform's text ("" if none); for unknown answers the whole body, redacted and cut
    cause: str
    fix: str
    fields: tuple[str, ...] = ()  # INVALID: the platform's own messages, one per broken field
    faq: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True, kw_only=True)
class _Status:
    outcome: Outcome
    cause: str
    fix: str


_STATUS_401 = _Status(
    outcome=Outcome.CONFIG, cause="(401) 未经授权: app key wrong, or time stamp not current", fix=_faq_fix(12)
)
_STATUS_403 = _Status(
    outcome=Outcome.CONFIG, cause="HTTP 403 forbidden: this address may not call the platform",
    fix="测试接口只接受四川的 IP，正式接口须走 5G 专网或临时域名；请检查出口网络与防火墙 / "
    "the test platform only accepts Sichuan IP addresses and prod needs the 5G network: check the network path",
)
_STATUS_404 = _Status(
    outcome=Outcome.CONFIG, cause="HTTP 404: no such path on this server",
    fix="请检查 upstream.base_url（只写 http(s)://主机:端口，不带路径） / "
    "check upstream.base_url: scheme, host and port only, no path",
)
_STATUS_REDIRECT = _Status(
    outcome=Outcome.CONFIG, cause="the server redirects elsewhere (the signed request is not followed)",
    fix="upstream.base_url 已被重定向：请改为最终地址（如 http 改 https） / "
    "upstream.base_url is redirected: set it to the final address (e.g. https instead of http)",
)
_STATUS_405 = _Status(outcome=Outcome.CONFIG, cause="HTTP 405: wrong HTTP method", fix=_faq_fix(13))
_STATUS_TRANSIENT = _Status(
    outcome=Outcome.TRANSIENT, cause="the platform or its gateway is unavailable for now",
    fix="平台或网关暂时不可用，稍后自动重试 / the platform or its gateway is unavailable for now: retried later",
)
_STATUS_GENERIC = _Status(outcome=Outcome.GENERIC, cause="an answer the document does not describe", fix=_GENERIC.fix)
_UNREADABLE = _Status(
    outcome=Outcome.TRANSIENT,
    cause="an answer that is not the platform's JSON (an HTML page, a cut-off or empty body): "
    "the platform or a proxy in front of it is failing",
    fix=_STATUS_TRANSIENT.fix,
)
_SILENT = _Status(
    outcome=Outcome.TRANSIENT, cause="the platform failed without saying anything (no message, no data)",
    fix=_STATUS_TRANSIENT.fix,
)
_NOT_ACCEPTED = _Status(
    outcome=Outcome.GENERIC,
    cause="code 200 without the document's success answer (新增成功 / 修改成功): not accepted",
    fix="平台未确认保存，稍后重试；完整应答已记录 / the platform did not confirm it stored the record: "
    "retried later; the whole answer is logged",
)
_BAD_LOGIN_ANSWER = _Status(
    outcome=Outcome.GENERIC, cause="code 200 without a token: the login did not succeed",
    fix=_STATUS_TRANSIENT.fix,
)
_BAD_LABELS_ANSWER = _Status(
    outcome=Outcome.GENERIC, cause="code 200 whose data is neither null nor a person: not a label answer",
    fix=_GENERIC.fix,
)
# The document's success answers to an upload (3.2).
UPLOAD_SUCCESS = ("新增成功", "修改成功")


def _by_status(status: int) -> _Status | None:
    if status == 401:
        return _STATUS_401
    if status == 403:
        return _STATUS_403
    if status == 404:
        return _STATUS_404
    if status == 405:
        return _STATUS_405
    if status in (408, 429) or status >= 500:
        return _STATUS_TRANSIENT
    if status in (301, 302, 303, 307, 308):
        return _STATUS_REDIRECT
    if status >= 300:
        # Unexpected redirects and other 4xx: retried a few times, then the outbox gives up.
        return _STATUS_GENERIC
    return None


def match_faq(text: str) -> FaqEntry | None:
    """The first FAQ row whose pattern occurs in ``text``."""
    for entry in FAQ:
        if entry.pattern.search(text):
            return entry
    return None


_VALIDATION_PREFIX = re.compile(r"^.*?参数校验错误\s*[：:]\s*", re.DOTALL)


def split_violations(message: str) -> tuple[str, ...]:
    """``参数校验错误：a！,b！,`` -> ``("a！", "b！")``, the platform's own words."""
    rest = _VALIDATION_PREFIX.sub("", message, count=1).strip()
    # Each message ends with "！"; splitting there keeps a comma inside a message intact.
    parts = re.split(r"(?<=[！!])\s*[,，]\s*", rest) if re.search(r"[！!]", rest) else re.split(r"[,，]", rest)
    return tuple(p.strip().strip(",，").strip() for p in parts if p.strip().strip(",，").strip())


def _text(body: bytes | str | None) -> str:
    if body is None:
        return ""
    if isinstance(body, bytes):
        return body.decode("utf-8", errors="replace")
    return body


def _short(text: str) -> str:
    text = redact(text.strip())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "…"


def _parse_json(text: str, content_type: str | None) -> dict[str, Any] | None:
    stripped = text.lstrip()
    looks_json = stripped.startswith("{") or (content_type is not None and "json" in content_type.lower())
    if not looks_json:
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _success(endpoint: str | None, data: Any) -> _Status | None:
    """None when ``data`` is the endpoint's success answer, else why it is not."""
    if endpoint == "upload":
        return None if isinstance(data, str) and data.strip() in UPLOAD_SUCCESS else _NOT_ACCEPTED
    if endpoint == "login":
        token = data.get("token") if isinstance(data, dict) else None
        return None if isinstance(token, str) and token.strip() else _BAD_LOGIN_ANSWER
    if endpoint == "labels":
        return None if data is None or isinstance(data, dict) else _BAD_LABELS_ANSWER
    return None


def classify(
    http_status: int, body: bytes | str | None, content_type: str | None = None, *, endpoint: str | None = None
) -> Answer:
    """Classify one platform answer: message text first, then HTTP status, then the JSON code.

    ``endpoint`` ("login", "labels", "upload") makes OK mean that endpoint's success answer;
    without it any ``code`` 200 is OK.
    """
    text = _text(body)
    obj = _parse_json(text, content_type)
    code: int | None = None
    data: Any = None
    if obj is not None:
        code = _code(obj.get("code"))
        data = obj.get("data")
        # Gateways put their text in `message` (Kong) or `error` (Spring's default error page).
        said = [str(obj[k]) for k in ("message", "error", "detailMessage") if isinstance(obj.get(k), str) and obj[k]]
        platform_text = " ".join(said)
    else:
        platform_text = text.strip()

    def answer(outcome: Outcome, cause: str, fix: str, *, message: str | None = None,
               fields: tuple[str, ...] = (), faq: int | None = None) -> Answer:
        return Answer(
            outcome=outcome, http_status=http_status, code=code, data=data,
            message=_short(platform_text) if message is None else message, cause=cause, fix=fix,
            fields=fields, faq=faq,
        )

    entry = match_faq(platform_text) if platform_text else None
    if entry is not None and entry is not _GENERIC:
        fields = split_violations(platform_text) if entry.outcome is Outcome.INVALID else ()
        return answer(entry.outcome, entry.cause, entry.fix, fields=fields, faq=entry.faq)

    by_status = _by_status(http_status)
    # A wrong path answers 404 with the bare 中间请求异常: the status says more than the text.
    if by_status is not None and (entry is None or http_status in (401, 403, 404, 405)):
        return answer(by_status.outcome, by_status.cause, by_status.fix)

    # FAQ 17: the catch-all hides the real reason, so the whole answer is kept for the logs.
    whole = _short(text) or f"HTTP {http_status} with an empty body"
    if obj is None:
        if entry is _GENERIC:
            return answer(Outcome.GENERIC, _GENERIC.cause, _GENERIC.fix, message=whole, faq=_GENERIC.faq)
        # An HTML page, a cut-off JSON, an empty body: no application answered this.
        return answer(_UNREADABLE.outcome, _UNREADABLE.cause, _UNREADABLE.fix, message=whole)

    if code == 200 and 200 <= http_status < 300:
        refused = _success(endpoint, data)
        if refused is None:
            return answer(Outcome.OK, "accepted", "", message=_short(platform_text) if platform_text else "")
        return answer(refused.outcome, refused.cause, refused.fix, message=whole)

    if entry is _GENERIC:
        return answer(Outcome.GENERIC, _GENERIC.cause, _GENERIC.fix, message=whole, faq=_GENERIC.faq)
    if code == 401:
        # The platform's own "not logged in" code, with a wording the document does not list.
        return answer(Outcome.AUTH, "access token refused", _RELOGIN_FIX)
    if not platform_text and data is None:
        # A bare {"code":500}: the platform failed and said nothing about anything.
        return answer(_SILENT.outcome, _SILENT.cause, _SILENT.fix, message=whole)
    return answer(Outcome.GENERIC, _STATUS_GENERIC.cause, _STATUS_GENERIC.fix, message=whole)


# The gateway's refusals of the app key or of the hie_secret made from it (FAQ 1, 2, 10,
# 12, 16). Under ``upstream.app_key_form: auto`` these are tried once more in the other
# reading of the key: a key the platform knows in the other text is refused exactly so.
APP_KEY_REFUSALS = frozenset({1, 2, 10, 12, 16})


def refuses_app_key(answer: Answer) -> bool:
    """The platform refused the app key or the signature (a bare HTTP 401 counts as FAQ 12)."""
    if answer.outcome is not Outcome.CONFIG:
        return False
    return answer.faq in APP_KEY_REFUSALS or (answer.faq is None and answer.http_status == 401)


def passed_app_key(answer: Answer) -> bool:
    """The answer comes from behind the gateway's app key and signature checks: the
    platform took the key in the reading it was sent in."""
    return answer.outcome in (Outcome.OK, Outcome.AUTH, Outcome.INVALID) or answer.faq == 5


def to_error(answer: Answer, *, lsh: str | None = None) -> SyncError:
    """The exception that tells the caller what to do with this (non-OK) answer."""
    said = answer.message or "(no message)"
    message = f"platform: {answer.cause} (HTTP {answer.http_status}: {said})"
    common: dict[str, Any] = {
        "hint": answer.fix, "http_status": answer.http_status, "platform_message": answer.message or None,
    }
    if answer.outcome is Outcome.CONFIG:
        return ConfigError(message, **common)
    if answer.outcome is Outcome.AUTH:
        return AuthError(message, lsh=lsh, **common)
    if answer.outcome is Outcome.INVALID:
        return InvalidRecord(message, violations=list(answer.fields), lsh=lsh, **common)
    if answer.outcome is Outcome.TRANSIENT:
        return PlatformUnavailable(message, lsh=lsh, **common)
    if answer.outcome is Outcome.GENERIC:
        return TransientError(message, generic=True, lsh=lsh, **common)
    raise ValueError("an OK answer is not an error")
