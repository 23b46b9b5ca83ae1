"""A faithful stand-in for the Sichuan key-population platform (先诊疗后付费 interface).

It answers the three endpoints of the province's interface document exactly as
the platform does (gateway checks, signature, login and tokens, labels, upload
validation with the platform's own Chinese messages), in either reading of the
app key the document leaves open (``SimConfig.key_form``), and can inject the faults
seen in the field (504 from nginx, dropped connections, a commit whose answer is
lost, a slow trickle, the platform down, a revoked app key), per endpoint if
wanted, and answers that only look like success (``{"code":200,"data":"保存失败"}``,
a cut-off JSON, a bare ``{"code":500}``), refusals of chosen lsh values or ID
numbers, and an account that must change its password first (FAQ 11).

It plays one institution by default (the document's test key and account), and as
many more as wanted, each with its own app key and accounts, as a county medical
alliance sharing one HIS needs: uploads are stored per institution (``lsh`` is
unique only inside one), a key and an account of different institutions are
refused as FAQ 14 says, and a key may be revoked for one institution only.

It deliberately imports only the standard library and re-derives the signature
and every rule from the document itself: sharing code with the client would let
a bug in the client hide behind the same bug here.

Used by tests on an ephemeral loopback port, by the demo, and by
``crowd-sync simulator`` / ``python -m sync.upstream.simulator``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import datetime as dt
import hashlib
import json
import logging
import random
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final

log = logging.getLogger(__name__)

# --- constants from the interface document -------------------------------------------------

# The document prints the test key percent-encoded; TEST_APP_KEY is its decoded base64 text.
TEST_APP_KEY_ENCODED: Final = (
    "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMQnkRMriK2hsKxFZnu5O5152ITG7EiafzU8Sxj%2BT6Irh8IdwcV3AS7Qt2M7aIXHrnprb"
    "%2BpsxlkaMGdTeN7%2F8WkCAwEAAQ%3D%3D"
)
TEST_APP_KEY: Final = urllib.parse.unquote(TEST_APP_KEY_ENCODED)
TEST_USERNAME: Final = "ceshi-rybq"
TEST_PASSWORD: Final = "Ehr123456@"  # noqa: S105 - published in the document for the test environment
TEST_IDS: Final = ("510100198506020036", "510100198506020132", "510100198506020028")
# The document's production test ID number; labelled here too so a prod-mode simulator answers it.
PROD_TEST_ID: Final = "110104198506020037"
# The institution of the document's login example (orgId, orgName, areaId, areaName): the test account's here.
TEST_ORG_ID: Final = "510115"
TEST_ORG_NAME: Final = "温江区卫健局"
TEST_COUNTY_CODE: Final = "510115"
TEST_COUNTY_NAME: Final = "温江区"
EHRKEY: Final = "ehr#health@check"
SIGN_SALT: Final = "HIE_ADAPTER_382d8d3b4e6bc62de8b984ac84acf492"

LOGIN_PATH: Final = "/adapter/http/ehrc/login/integration"
RYBQ_PREFIX: Final = "/adapter/http/ehrc/v1.0/api/ehr/rybq/"
UPLOAD_PATH: Final = "/adapter/http/ehrc/v1.0/api/crowd/medical/record/insertOrUpdate"

# endpoint -> env -> event code. Login uses the same code in both environments.
EVENT_CODES: Final[dict[str, dict[str, str]]] = {
    "login": {"test": "177cf201a6997f4ca0b8da298e31e3f1", "prod": "177cf201a6997f4ca0b8da298e31e3f1"},
    "rybq": {"test": "2af82deac11d4670977580bcc01aaa94", "prod": "8f6fa17d4dbf4b95bf1dfb01b0837345"},
    "upload": {"test": "a7a87688f52e4100ab33a2514ec1971f", "prod": "b60eb517bdcd4525958aebadeef76d63"},
}

# The platform's own messages (document section 6 and its examples).
MSG_APP_KEY: Final = "没找到该appKey对应的权限记录,或是该权限记录已被停用"
MSG_NO_PERMISSION: Final = "没有访问该接口的权限"
MSG_BAD_SIGNATURE: Final = "加密验证未通过"
MSG_BAD_LOGIN: Final = "用户不存在或密码错误"
MSG_LOGIN_FIRST: Final = "请先登录"
MSG_LOGIN_EXPIRED: Final = "登录过期或未登录"
MSG_KICKED: Final = "你的账号于[{when}]，在其他地方登录，当前账号被挤出"
MSG_MIDDLE: Final = "中间请求异常"
MSG_PATH_MISMATCH: Final = "中间请求异常：路径【{path}】跟eventCode【{code}】不匹配"
MSG_MISSING_API_KEY: Final = "Missing API key found in request"
MSG_UNAUTHORISED: Final = "(401) 未经授权"
MSG_KEY_ORG_MISMATCH: Final = "AppKey与机构id不匹配，请核实。"  # FAQ 14
MSG_VALIDATION_PREFIX: Final = "参数校验错误："
# FAQ 11: the document gives no text for it; this one is assumed (the client matches its key phrases).
MSG_FIRST_LOGIN: Final = "首次登录请修改密码：请登录网站修改初始密码后再调用接口"
MSG_SAVE_FAILED: Final = "保存失败"

HTML_504: Final = (
    "<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway Time-out</h1></center>"
    "<hr><center>nginx</center></body></html>\r\n"
)
HTML_502: Final = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center>"
    "<hr><center>nginx</center></body></html>\r\n"
)
HTML_503: Final = (
    "<html><head><title>503 Service Temporarily Unavailable</title></head><body><center>"
    "<h1>503 Service Temporarily Unavailable</h1></center><hr><center>nginx</center></body></html>\r\n"
)

# The platform runs in China; times it prints (the kick-out message) are Beijing time.
BEIJING: Final = dt.timezone(dt.timedelta(hours=8))
MONEY_MAX: Final = Decimal("999999.99")
CARD_TYPES: Final = frozenset({"10", "30", "43", "44", "50", "60"})
DATE_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


# Which text of the app key the platform knows, compares and signs; the document does not say.
#   as_printed: the key exactly as the document prints it (%2B %2F %3D), as the one public
#               client of the platform configures and signs it;
#   decoded:    its base64 text (+ / =).
# Either way the gateway decodes the query once and compares what it reads with that text.
KEY_FORMS: Final = ("as_printed", "decoded")


def printed(app_key: str) -> str:
    """The key as the document prints it: the base64 text percent-encoded once."""
    return urllib.parse.quote(app_key, safe="")


def sign(event_code: str, app_key: str, time_stamp: str) -> str:
    """hie_secret as the document defines it: md5 of the plain concatenation, 32 lower-case hex digits."""
    return hashlib.md5((event_code + app_key + time_stamp + SIGN_SALT).encode("utf-8")).hexdigest()


def base64_key(app_key: str) -> str:
    """The base64 text of a key given either way (base64 never holds ``%``, so decoding is harmless)."""
    return urllib.parse.unquote(app_key)


def generated_app_key(seed: str) -> str:
    """A key shaped like the document's (a 512-bit RSA public key, base64 text), derived from ``seed``.

    Same seed, same key: a demo's settings and a simulator started apart agree. The
    shape matters because the two readings of a key differ only in its ``+ / =``.
    """
    der = bytearray(base64.b64decode(TEST_APP_KEY))
    modulus = bytearray(hashlib.sha512(f"crowd-sync simulator app key {seed}".encode()).digest())
    modulus[0] |= 0x80  # a 512-bit modulus, after the DER 0x00 sign byte as in the document's key
    der[25:89] = modulus  # SubjectPublicKeyInfo: 25 header bytes, 64 modulus bytes, the exponent
    return base64.b64encode(bytes(der)).decode("ascii")


# --- default people --------------------------------------------------------------------------


def _label(code: str, name: str, attr1: str = "1") -> dict[str, Any]:
    return {"code": code, "name": name, "remark": None, "attr1": attr1, "attr2": None}


def _person(id_number: str, **kw: Any) -> dict[str, Any]:
    """A rybq ``data`` object with every key the platform sends; ``kw`` overrides the defaults."""
    data: dict[str, Any] = {
        "xm": "测试人员",
        "zjhm": id_number,
        "hjdQh": "510115",
        "hjdQhName": "温江区",
        "xjdQh": None,
        "xjdQhName": None,
        "ylbx": "1",
        "rkxBq": [],
        "jjxBq": [],
        "jkBq": [],
        "glztBq": [],
    }
    data.update(kw)
    return data


def default_people() -> dict[str, dict[str, Any] | None]:
    """The test environment's labelled ID numbers, the first exactly as in the document's example."""
    return {
        TEST_IDS[0]: _person(
            TEST_IDS[0],
            xm="李四",
            hjdQh="511425",
            hjdQhName="青神县",
            jjxBq=[_label("J01.01", "特困人员"), _label("J01.02", "农村低保对象")],
        ),
        TEST_IDS[1]: _person(
            TEST_IDS[1],
            xm="王芳",
            hjdQh="510115",
            hjdQhName="温江区",
            xjdQh="510104",
            xjdQhName="锦江区",
            jjxBq=[_label("J01.03", "孤儿")],
            jkBq=[_label("H01.01", "高血压", "0")],
        ),
        TEST_IDS[2]: _person(
            TEST_IDS[2],
            xm="赵敏",
            hjdQh="513431",
            hjdQhName="昭觉县",
            ylbx="0",
            jjxBq=[_label("J01.05", "边缘易致贫户", "0")],
        ),
        PROD_TEST_ID: _person(PROD_TEST_ID, xm="张三", jjxBq=[_label("J01.07", "一般脱贫户", "0")]),
    }


# --- configuration and faults ----------------------------------------------------------------


@dataclass(kw_only=True)
class Institution:
    """One institution the platform knows: its organisation id, its own app key, its own accounts.

    The document ties both to the institution: "每个对接机构都有自己的hie_app_key", and an
    account belongs to one institution (FAQ 14). ``code`` is the platform's organisation id
    (``orgId`` in the login answer). Mutable: tests may change a key or an account while the
    server runs.
    """

    code: str
    name: str
    county_code: str  # the platform's county code (document section 5): areaId in the login answer
    county_name: str = ""
    app_key: str  # base64 text (the printed, percent-encoded text is accepted too)
    accounts: dict[str, str]  # username -> password


@dataclass(kw_only=True)
class SimConfig:
    """How the simulated platform behaves. Mutable: tests may change it while the server runs.

    ``app_key``, ``accounts`` and the ``institution_*``/``county_*`` fields describe the
    home institution, always played (the document's test institution by default);
    ``other_institutions`` adds more, each with its own key and accounts.
    """

    env: str = "test"
    app_key: str = TEST_APP_KEY  # the base64 text
    key_form: str = "as_printed"  # which text of every app key the platform knows (KEY_FORMS)
    accounts: dict[str, str] = field(default_factory=lambda: {TEST_USERNAME: TEST_PASSWORD})
    institution_code: str = TEST_ORG_ID
    institution_name: str = TEST_ORG_NAME
    county_code: str = TEST_COUNTY_CODE
    county_name: str = TEST_COUNTY_NAME
    other_institutions: list[Institution] = field(default_factory=list)
    token_ttl_s: float = 12 * 3600
    max_clock_skew_s: float = 300
    people: dict[str, dict[str, Any] | None] = field(default_factory=default_people)
    clock: Callable[[], float] = time.time
    # Accounts whose first login must change the password on the web site (FAQ 11).
    password_change: set[str] = field(default_factory=set)

    def home(self) -> Institution:
        """The home institution as an Institution (a snapshot, but ``accounts`` is the live dict)."""
        return Institution(
            code=self.institution_code,
            name=self.institution_name,
            county_code=self.county_code,
            county_name=self.county_name,
            app_key=self.app_key,
            accounts=self.accounts,
        )

    def institutions(self) -> list[Institution]:
        """Every institution played, the home one first."""
        return [self.home(), *self.other_institutions]


# The generated members of `--institutions N`: the alliance of the document's test institution's county.
_DEMO_MEMBER_NAMES: Final = ("温江区人民医院", "温江区万春镇卫生院", "温江区寿安镇卫生院", "温江区和盛镇卫生院")


def demo_member(n: int) -> Institution:
    """The n-th institution of a demo alliance (n >= 2; the first is the document's test institution).

    Deterministic: the same n always has the same code, key, account and password, so
    a demo's settings.yaml and a simulator started apart with ``--institutions`` agree.
    """
    if n < 2:
        raise ValueError(f"demo members are numbered from 2 (1 is the document's test institution), not {n}")
    code = f"{TEST_COUNTY_CODE}{n:03d}"
    name = _DEMO_MEMBER_NAMES[n - 2] if n - 2 < len(_DEMO_MEMBER_NAMES) else f"{TEST_COUNTY_NAME}第{n}卫生院"
    # No `*` in the password: the interface login refuses some special characters (FAQ 5).
    password = f"Demo{n}@" + hashlib.sha256(f"crowd-sync demo password {code}".encode()).hexdigest()[:8]
    return Institution(
        code=code,
        name=name,
        county_code=TEST_COUNTY_CODE,
        county_name=TEST_COUNTY_NAME,
        app_key=generated_app_key(code),
        accounts={f"demo-{code}": password},
    )


def check_institutions(institutions: list[Institution]) -> None:
    """Each institution its own code, its own key and its own usernames, as the document wants; else ValueError."""
    codes: set[str] = set()
    keys: set[str] = set()
    usernames: set[str] = set()
    for inst in institutions:
        key = base64_key(inst.app_key)
        if inst.code in codes:
            raise ValueError(f"two institutions have the code {inst.code!r}")
        if key in keys:
            raise ValueError(f"institution {inst.code!r} shares its app key with another: each has its own")
        shared = usernames & set(inst.accounts)
        if shared:
            raise ValueError(f"institution {inst.code!r} shares accounts {sorted(shared)} with another")
        codes.add(inst.code)
        keys.add(key)
        usernames |= set(inst.accounts)


@dataclass(kw_only=True)
class Faults:
    """Injected faults; every field may be changed at any time while the server runs.

    The ``next_*`` counters are deterministic: the next N requests (for
    ``next_commit_then_reset``: the next N accepted uploads) get that fault.
    The ``p_*`` probabilities draw from a generator seeded with ``seed``.
    ``endpoints`` limits the ``p_*``/``next_*`` faults to some endpoints ("login",
    "labels", "upload"); ``down`` hits every request, login included.

    ``fake``: what a fake answer is, drawn for each ``p_fake``/``next_fake`` hit:
    "save_failed" ``{"code":200,"data":"保存失败"}``, "bare500" ``{"code":500}``,
    "middle" a bare 中间请求异常, "html200" an HTML page with status 200 (nothing
    stored for these), "truncated" the real answer cut in half (an upload is stored).
    """

    latency_s: float = 0.0
    p_504: float = 0.0
    p_reset: float = 0.0
    p_commit_then_reset: float = 0.0
    p_fake: float = 0.0
    trickle_s: float = 0.0
    down: bool = False
    down_with: str = "503"  # what `down` answers: "503" or "502" (nginx's HTML pages), "reset"
    no_date: bool = False  # answers carry no Date header, as some gateways strip it
    app_key_revoked: bool = False  # every app key answers FAQ 1
    # Institution codes whose app key is revoked: only their requests answer FAQ 1.
    app_key_revoked_for: set[str] = field(default_factory=set)
    next_504: int = 0
    next_reset: int = 0
    next_commit_then_reset: int = 0
    next_fake: int = 0
    fake: tuple[str, ...] = ("save_failed",)
    endpoints: frozenset[str] = frozenset({"login", "labels", "upload"})
    # lsh -> "invalid" (参数校验错误) or "middle" (中间请求异常): that record is never stored,
    # whichever institution uploads it.
    reject_lsh: dict[str, str] = field(default_factory=dict)
    # ID number -> "504", "reset", "middle" or "save_failed": its label lookup fails so.
    labels_fail: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # Assigning a seed restarts the sequence, so a test sees the same faults on every run.
        if name == "seed" and "_rng" in self.__dict__:
            with self._lock:
                self._rng.seed(value)

    def clear(self) -> None:
        """Remove every fault (the seed is kept)."""
        with self._lock:
            self.latency_s = self.p_504 = self.p_reset = self.p_commit_then_reset = self.p_fake = 0.0
            self.trickle_s = 0.0
            self.down = self.app_key_revoked = False
            self.app_key_revoked_for = set()
            self.next_504 = self.next_reset = self.next_commit_then_reset = self.next_fake = 0
            self.endpoints = frozenset({"login", "labels", "upload"})
            self.reject_lsh = {}
            self.labels_fail = {}

    def hits(self, endpoint: str | None) -> bool:
        """Whether the p_*/next_* faults apply to ``endpoint`` (an unknown path: always)."""
        return endpoint is None or {"rybq": "labels"}.get(endpoint, endpoint) in self.endpoints

    def fake_kind(self) -> str:
        with self._lock:
            return self._rng.choice(self.fake) if self.fake else "save_failed"

    def take(self, kind: str) -> bool:
        """Whether this request gets fault ``kind`` ("504", "reset", "commit_then_reset", "fake"); consumes a next_* count."""
        with self._lock:
            name = f"next_{kind}"
            pending: int = getattr(self, name)
            if pending > 0:
                setattr(self, name, pending - 1)
                return True
            p: float = getattr(self, f"p_{kind}")
            return p > 0 and self._rng.random() < p


@dataclass(frozen=True, kw_only=True)
class RequestSeen:
    """One request as it arrived: path and query exactly as on the wire, header names lower-case."""

    method: str
    path: str
    raw_query: str
    headers: dict[str, str]
    body: bytes


@dataclass(kw_only=True)
class _Session:
    username: str
    institution: str  # code of the account's institution
    issued_at: float
    kicked_at: str | None = None  # Beijing time of the login that replaced this token


class _Drop(Exception):
    """Close the connection without answering (reset or commit-then-reset)."""


@dataclass(frozen=True, kw_only=True)
class _Answer:
    status: int
    body: bytes
    content_type: str


def _json_answer(obj: Any, status: int = 200) -> _Answer:
    text = json.dumps(obj, ensure_ascii=False, default=str)
    return _Answer(status=status, body=text.encode("utf-8"), content_type="application/json;charset=UTF-8")


def _text_answer(text: str, status: int, content_type: str = "text/plain;charset=UTF-8") -> _Answer:
    return _Answer(status=status, body=text.encode("utf-8"), content_type=content_type)


def _business_error(code: int, message: str) -> _Answer:
    # Business errors travel as HTTP 200, as in the document's failure example.
    return _json_answer({"code": code, "data": None, "message": message, "success": False})


# --- upload validation -----------------------------------------------------------------------

# (field, Chinese name from the document's table, max length or None for dictionary fields, required)
_STRING_FIELDS: Final = (
    ("type", "诊疗类型", None, True),
    ("cardType", "证件类型", None, True),
    ("lsh", "业务流水号", 50, True),
    ("cardNo", "证件号码", 40, True),
    ("code", "业务编号", 50, True),
    ("keyCrowd", "是否重点人群", None, True),
    ("icdName", "主诊断", 200, False),
    ("icdCode", "主诊断编码", 100, False),
)
_DICTIONARIES: Final[dict[str, frozenset[str]]] = {
    "type": frozenset({"1", "2"}),
    "cardType": CARD_TYPES,
    "keyCrowd": frozenset({"1", "0"}),
}
_DATE_FIELDS: Final = (("enterDate", "诊疗时间"), ("leaveDate", "出院时间"), ("settlementDate", "结算日期"))
_MONEY_FIELDS: Final = (
    ("totalFee", "总费用"),
    ("insFee", "医保已报销金额"),
    ("totalPrepayment", "住院预交金"),
    ("deficientFee", "欠费金额"),
)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _parse_date(value: Any) -> dt.date | None:
    if not isinstance(value, str) or not DATE_RE.fullmatch(value):
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:  # 2024-02-30 has the right shape but is no date
        return None


def validate_upload(body: dict[str, Any]) -> list[str]:
    """Every rule of the document's upload table; returns all violations in the platform's words."""
    errors: list[str] = []
    for name, label, max_len, required in _STRING_FIELDS:
        value = body.get(name)
        if _blank(value):
            if required:
                errors.append(f"{label}不能为空！")
            continue
        if not isinstance(value, str):
            # The document says 字符型; a number here is a client bug even if a lenient server coerced it.
            errors.append(f"{label}格式不正确！")
        elif name in _DICTIONARIES and value not in _DICTIONARIES[name]:
            errors.append(f"{label}不正确！")
        elif max_len is not None and len(value) > max_len:
            errors.append(f"{label}长度不能超过{max_len}！")

    dates: dict[str, dt.date] = {}
    for name, label in _DATE_FIELDS:
        value = body.get(name)
        if _blank(value):
            # leaveDate is required for inpatients only (type 1).
            if name != "leaveDate" or body.get("type") == "1":
                errors.append(f"{label}不能为空！")
            continue
        parsed = _parse_date(value)
        if parsed is None:
            errors.append(f"{label}格式不正确！")
        else:
            dates[name] = parsed

    money: dict[str, Decimal] = {}
    for name, label in _MONEY_FIELDS:
        value = body.get(name)
        if value is None:
            errors.append(f"{label}不能为空！")
            continue
        # bool is an int in Python but true/false is no amount; a JSON string is not 数字型.
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            errors.append(f"{label}格式不正确！")
            continue
        amount = Decimal(value)
        exponent = amount.as_tuple().exponent
        if not amount.is_finite() or (isinstance(exponent, int) and exponent < -2):
            errors.append(f"{label}格式不正确！")
        elif amount < 0:
            errors.append(f"{label}不能为负数！")
        elif amount > MONEY_MAX:
            errors.append(f"{label}超出范围！")
        else:
            money[name] = amount

    if "totalFee" in money and "deficientFee" in money and money["totalFee"] < money["deficientFee"]:
        errors.append("总费用不能小于欠费金额！")
    if "enterDate" in dates:
        if "leaveDate" in dates and dates["leaveDate"] < dates["enterDate"]:
            errors.append("出院时间不能小于诊疗时间！")
        if "settlementDate" in dates and dates["settlementDate"] < dates["enterDate"]:
            errors.append("结算日期不能小于诊疗时间！")
    return errors


# --- the server ------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that died or hung up mid-request (killed daemon, timeout) is normal
        # traffic for a server, not a traceback on stderr; anything else still prints.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx"
    sys_version = ""
    # Like nginx's keepalive_timeout: idle keep-alive connections do not hold a thread forever.
    timeout = 75
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.sim._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sim._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("simulator_http %s", format % args)

    def date_time_string(self, timestamp: float | None = None) -> str:
        return formatdate(self.server.sim.config.clock() if timestamp is None else timestamp, usegmt=True)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _read_body(self) -> bytes | None:
        """The request body; None if the client hung up before sending all of it."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                line = self.rfile.readline()
                if not line:
                    return None
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    return None
                chunks.append(chunk)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        return body if len(body) == length else None

    def _serve(self, method: str) -> None:
        sim = self.server.sim
        body = self._read_body()
        if body is None:
            # A client that dies between its headers and its body (urllib3 sends them
            # apart) never had its request handled: a real server drops it unanswered.
            self.close_connection = True
            return
        split = urllib.parse.urlsplit(self.path)
        seen = RequestSeen(
            method=method,
            path=split.path,
            raw_query=split.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        try:
            answer = sim._answer(seen)
        except _Drop:
            self._drop()
            return
        self._write(answer)

    def _drop(self) -> None:
        # SO_LINGER 0 makes the close an RST: the client sees "connection reset", not a clean end.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _write(self, answer: _Answer) -> None:
        sim = self.server.sim
        reason = self.responses.get(answer.status, ("",))[0]
        head = [
            f"{self.protocol_version} {answer.status} {reason}",
            f"Server: {self.server_version}",
            *([] if sim.faults.no_date else [f"Date: {self.date_time_string()}"]),
            f"Content-Type: {answer.content_type}",
            f"Content-Length: {len(answer.body)}",
            f"Connection: {'close' if self.close_connection else 'keep-alive'}",
        ]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + answer.body
        trickle = sim.faults.trickle_s
        try:
            if trickle > 0:
                for i in range(len(raw)):
                    if sim._stopping.is_set():
                        self.close_connection = True
                        return
                    self.wfile.write(raw[i : i + 1])
                    self.wfile.flush()
                    sim._stopping.wait(trickle)
            else:
                self.wfile.write(raw)
        except OSError:
            # The client gave up (timeout) or the server is stopping: nothing left to say.
            self.close_connection = True


class Simulator:
    """The provincial platform on a local port. Use as a context manager or call start()/stop()."""

    def __init__(self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SimConfig()
        check_institutions(self.config.institutions())
        self.faults = Faults()
        # The home institution's records, by lsh; records_of() gives any institution's.
        self.records: dict[str, dict[str, Any]] = {}
        self._other_records: dict[str, dict[str, dict[str, Any]]] = {}  # code -> lsh -> record
        # requests: every request seen; logins: successful logins; lookups: rybq answered;
        # uploads: uploads past the gateway and token checks; creates/updates: uploads stored;
        # rejections: uploads refused by validation; auth_failures: bad logins and refused tokens;
        # key_mismatches: FAQ 14 answers (app key and account of different institutions);
        # gateway_rejections: refused by steps 2-7 (path, ehrkey, app key, time stamp, event code, secret);
        # faults: injected faults.
        self.counters: Counter[str] = Counter()
        # The same per institution (counters_of), for requests whose app key the gateway read as its own.
        self._org_counters: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.requests_log: list[RequestSeen] = []
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}  # token -> session
        self._current: dict[str, str] = {}  # username -> its current token
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the simulator is not started; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Simulator:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self._host, self._port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="platform-simulator", daemon=True
        )
        self._thread.start()
        log.info("simulator_started url=%s env=%s", self.url, self.config.env)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        # Keep-alive handlers sit in readline() until their client speaks; shutting their sockets wakes them.
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def known_app_key(self, code: str | None = None) -> str:
        """An institution's app key (the home one's by default) as this platform reads it in
        hie_app_key and signs it (``key_form``)."""
        return self._reading(self.config.app_key if code is None else self.institution(code).app_key)

    def _reading(self, app_key: str) -> str:
        if self.config.key_form not in KEY_FORMS:
            raise ValueError(f"key_form must be one of {KEY_FORMS}, not {self.config.key_form!r}")
        key = base64_key(app_key)
        return printed(key) if self.config.key_form == "as_printed" else key

    # --- institutions ---

    def institutions(self) -> list[Institution]:
        """Every institution played, the home one first (SimConfig.institutions())."""
        return self.config.institutions()

    def institution(self, code: str) -> Institution:
        """The institution with organisation id ``code``; KeyError if the platform has none."""
        for inst in self.config.institutions():
            if inst.code == code:
                return inst
        raise KeyError(f"the simulator plays no institution {code!r}")

    def add_institution(
        self,
        code: str,
        *,
        name: str | None = None,
        county_code: str = TEST_COUNTY_CODE,
        county_name: str = TEST_COUNTY_NAME,
        app_key: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> Institution:
        """Play one more institution with one account; what is not given is generated from ``code``.

        The generated key is shaped like the document's and the same for the same code;
        the account is ``org-{code}`` with a password without special characters.
        ValueError if the code, the key or the username is another institution's already.
        """
        if username is None:
            username = f"org-{code}"
        if password is None:
            # No `*`: the interface login refuses some special characters (FAQ 5).
            password = "Org@" + hashlib.sha256(f"crowd-sync simulator password {code}".encode()).hexdigest()[:10]
        inst = Institution(
            code=code,
            name=name if name is not None else f"测试机构{code}",
            county_code=county_code,
            county_name=county_name,
            app_key=base64_key(app_key) if app_key is not None else generated_app_key(code),
            accounts={username: password},
        )
        with self._lock:
            check_institutions([*self.config.institutions(), inst])
            self.config.other_institutions.append(inst)
        return inst

    def records_of(self, code: str) -> dict[str, dict[str, Any]]:
        """One institution's stored records, by lsh (the live dict; ``records`` for the home one)."""
        if code == self.config.institution_code:
            return self.records
        self.institution(code)  # KeyError for a code the platform does not know
        with self._lock:
            return self._other_records.setdefault(code, {})

    def all_records(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every stored record of every institution, by (institution code, lsh)."""
        return {
            (inst.code, lsh): record
            for inst in self.config.institutions()
            for lsh, record in list(self.records_of(inst.code).items())
        }

    def counters_of(self, code: str) -> Counter[str]:
        """One institution's counters (the live Counter), for the requests whose app key the gateway
        read as this institution's: requests, gateway_rejections (from the revoked-key check on),
        logins, auth_failures, key_mismatches, lookups, uploads, creates, updates, rejections."""
        self.institution(code)
        with self._lock:
            return self._org_counters[code]

    # --- control from tests and the demo ---

    def revoke_tokens(self, code: str | None = None) -> None:
        """Every issued token (of institution ``code`` only, if given) becomes invalid (answers 登录过期或未登录)."""
        with self._lock:
            for token, session in list(self._sessions.items()):
                if code is None or session.institution == code:
                    del self._sessions[token]
                    if self._current.get(session.username) == token:
                        del self._current[session.username]

    def kick(self, username: str = TEST_USERNAME) -> None:
        """As if ``username`` logged in elsewhere: its current token answers the kick-out message."""
        with self._lock:
            token = self._current.pop(username, None)
            if token is not None and token in self._sessions:
                self._sessions[token].kicked_at = self._beijing_now()

    def add_person(self, id_number: str, data: dict[str, Any] | None = None, **kw: Any) -> None:
        """Label ``id_number``. ``data=None`` without keywords: not key population (rybq answers data null).

        Keywords build or amend a full rybq object, e.g. ``add_person(id, xm="王五", jjxBq=[...])``.
        """
        if data is None and not kw:
            person: dict[str, Any] | None = None
        else:
            person = _person(id_number, **(data or {}))
            person.update(kw)
        with self._lock:
            self.config.people[id_number] = person

    def reset_counters(self) -> None:
        """Zero every counter (records, tokens and the request log are kept)."""
        with self._lock:
            self.counters.clear()
            for counters in self._org_counters.values():
                counters.clear()

    def issued_tokens(self, code: str | None = None) -> int:
        """How many tokens are currently valid (not kicked), of institution ``code`` only if given;
        shared-token clients keep this at one per account."""
        with self._lock:
            return sum(
                1
                for s in self._sessions.values()
                if s.kicked_at is None and (code is None or s.institution == code)
            )

    # --- the platform ---

    def _count(self, *keys: str, org: str | None = None) -> None:
        with self._lock:
            for key in keys:
                self.counters[key] += 1
                if org is not None:
                    self._org_counters[org][key] += 1

    def _beijing_now(self) -> str:
        return dt.datetime.fromtimestamp(self.config.clock(), BEIJING).strftime("%Y-%m-%d %H:%M:%S")

    def _answer(self, req: RequestSeen) -> _Answer:
        """The platform's answer, in the order its gateway and application check things."""
        with self._lock:
            self.requests_log.append(req)
            self.counters["requests"] += 1

        endpoint, method = self._route(req.path)
        if endpoint is not None:
            self._count(f"requests_{endpoint}")

        # 1. faults
        faults = self.faults
        if faults.latency_s > 0:
            self._stopping.wait(faults.latency_s)
        if faults.down:
            self._count("faults")
            if faults.down_with == "reset":
                raise _Drop
            if faults.down_with == "502":
                return _text_answer(HTML_502, 502, "text/html")
            return _text_answer(HTML_503, 503, "text/html")
        if faults.hits(endpoint):
            if faults.take("504"):
                self._count("faults")
                return _text_answer(HTML_504, 504, "text/html")
            if faults.take("reset"):
                self._count("faults")
                raise _Drop
            if faults.take("fake"):
                self._count("faults")
                kind = faults.fake_kind()
                if kind != "truncated":
                    return self._fake(kind)
                # The real answer (an upload is stored), cut off half-way.
                real = self._checked(req, endpoint, method)
                return _Answer(status=real.status, body=real.body[: len(real.body) // 2], content_type=real.content_type)
        return self._checked(req, endpoint, method)

    def _checked(self, req: RequestSeen, endpoint: str | None, method: str) -> _Answer:
        # 2. routing
        if endpoint is None:
            self._count("gateway_rejections")
            return _json_answer({"code": 404, "message": MSG_MIDDLE}, 404)
        if req.method != method:
            self._count("gateway_rejections")
            return _text_answer("Method Not Allowed", 405)

        refused, inst = self._gateway(req, endpoint)
        if refused is not None or inst is None:
            self._count("gateway_rejections", org=inst.code if inst is not None else None)
            return refused or _business_error(500, MSG_APP_KEY)

        return self._serve_endpoint(req, endpoint, inst)

    def _serve_endpoint(self, req: RequestSeen, endpoint: str, inst: Institution) -> _Answer:
        """``inst``: the institution whose app key the gateway read."""
        if endpoint == "login":
            return self._login(req, inst)
        token_error, session = self._check_token(req.headers.get("accesstoken"))
        if token_error is not None or session is None:
            self._count("auth_failures", org=inst.code)
            return _business_error(401, token_error or MSG_LOGIN_EXPIRED)
        # FAQ 14 on a business call: only a valid token says which account (so which
        # institution) is calling, hence after the token checks.
        if session.institution != inst.code:
            self._count("key_mismatches", org=inst.code)
            return _business_error(500, MSG_KEY_ORG_MISMATCH)
        if endpoint == "rybq":
            return self._rybq(req.path[len(RYBQ_PREFIX) :], inst)
        return self._upload(req.body, inst)

    @staticmethod
    def _fake(kind: str) -> _Answer:
        """An answer that looks like success, or says nothing; nothing was done."""
        if kind == "bare500":
            return _json_answer({"code": 500})
        if kind == "middle":
            return _business_error(500, MSG_MIDDLE)
        if kind == "html200":
            return _text_answer("<html><body><h1>系统维护中</h1></body></html>", 200, "text/html")
        return _json_answer({"code": 200, "data": MSG_SAVE_FAILED, "message": None})

    @staticmethod
    def _route(path: str) -> tuple[str | None, str]:
        if path == LOGIN_PATH:
            return "login", "POST"
        if path == UPLOAD_PATH:
            return "upload", "POST"
        if path.startswith(RYBQ_PREFIX) and path[len(RYBQ_PREFIX) :] and "/" not in path[len(RYBQ_PREFIX) :]:
            return "rybq", "GET"
        return None, ""

    def _gateway(self, req: RequestSeen, endpoint: str) -> tuple[_Answer | None, Institution | None]:
        """Steps 3-7: ehrkey header, app key, time stamp, event code, signature.

        Returns the refusal (None if the request passes) and the institution whose key
        the request carries (None if no institution has it).
        """
        cfg = self.config
        if cfg.env == "test" and req.headers.get("ehrkey") != EHRKEY:
            return _json_answer({"message": MSG_MISSING_API_KEY}, 401), None

        # parse_qsl decodes exactly once: the platform must then read the key in the text it knows.
        # Decoded, a key sent as printed (%252B on the wire) is unknown; as printed, a key sent
        # encoded only once (%2B on the wire, read as +) is unknown.
        params = dict(urllib.parse.parse_qsl(req.raw_query, keep_blank_values=True))
        names = ("hie_event_code", "hie_app_key", "hie_time_stamp", "hie_secret")
        if any(not params.get(n) for n in names):
            return _business_error(500, MSG_APP_KEY), None
        # The gateway's permission record is looked up by the key alone: a key no institution
        # has is FAQ 1 whatever the account, long before anyone asks who is logging in.
        inst = self._institution_by_key(params["hie_app_key"])
        if inst is None:
            return _business_error(500, MSG_APP_KEY), None
        with self._lock:
            self._org_counters[inst.code]["requests"] += 1
        faults = self.faults
        if faults.app_key_revoked or inst.code in faults.app_key_revoked_for:
            # The record is there but stopped (该权限记录已被停用): the same answer, this institution only.
            return _business_error(500, MSG_APP_KEY), inst

        stamp = params["hie_time_stamp"]
        if not (stamp.isascii() and stamp.isdigit()) or abs(int(stamp) / 1000 - cfg.clock()) > cfg.max_clock_skew_s:
            return _text_answer(MSG_UNAUTHORISED, 401), inst

        event_code = params["hie_event_code"]
        codes = EVENT_CODES[endpoint]
        expected = codes.get(cfg.env, codes["test"])
        if event_code != expected:
            if event_code in codes.values():
                return _business_error(500, MSG_NO_PERMISSION), inst
            return _business_error(500, MSG_PATH_MISMATCH.format(path=req.path, code=event_code)), inst

        if params["hie_secret"] != sign(event_code, params["hie_app_key"], stamp):
            return _business_error(500, MSG_BAD_SIGNATURE), inst
        return None, inst

    def _institution_by_key(self, read: str) -> Institution | None:
        """The institution whose app key, in the platform's reading, is the text the gateway read."""
        for inst in self.config.institutions():
            if read == self._reading(inst.app_key):
                return inst
        return None

    def _login(self, req: RequestSeen, inst: Institution) -> _Answer:
        """``inst``: the institution whose app key the gateway read."""
        try:
            body = json.loads(req.body)
        except ValueError:
            body = None
        username = body.get("username") if isinstance(body, dict) else None
        password = body.get("password") if isinstance(body, dict) else None
        owner = self._account_owner(username) if isinstance(username, str) else None
        if owner is None or not isinstance(password, str) or owner.accounts.get(str(username)) != password:
            self._count("auth_failures", org=inst.code)
            return _business_error(500, MSG_BAD_LOGIN)
        username = str(username)
        # FAQ 14 (请确认授权码app_key是本医院的，并且登录账号属于该医院). The document gives no order;
        # this reading: the gateway has already accepted the key (a key no institution has is
        # FAQ 1), the application then verifies the credentials (only a real account has an
        # institution, and a wrong password must not tell whose account it is), then compares
        # the key's institution with the account's, before any first-login demand (FAQ 11).
        if owner.code != inst.code:
            self._count("key_mismatches", org=inst.code)
            return _business_error(500, MSG_KEY_ORG_MISMATCH)
        if username in self.config.password_change:
            self._count("auth_failures", org=inst.code)
            return _business_error(500, MSG_FIRST_LOGIN)

        token = secrets.token_hex(16)
        now = self.config.clock()
        with self._lock:
            # FAQ 4 is per account: this login pushes out this account's previous token only.
            previous = self._current.get(username)
            if previous is not None and previous in self._sessions:
                self._sessions[previous].kicked_at = self._beijing_now()
            self._sessions[token] = _Session(username=username, institution=owner.code, issued_at=now)
            self._current[username] = token
            self.counters["logins"] += 1
            self._org_counters[owner.code]["logins"] += 1
        # As the document's example answer; the home institution's values are the example's own.
        data = {
            "userId": hashlib.md5(username.encode("utf-8")).hexdigest(),
            "loginId": username,
            "username": username,
            "orgId": owner.code,
            "orgName": owner.name,
            "areaId": owner.county_code,
            "areaName": owner.county_name,
            "orgType": "29",
            "orgCode": None,
            "orgArea": owner.county_code,
            "field10": None,
            "ownAreaIds": [owner.county_code],
            "token": token,
        }
        return _json_answer(
            {
                "code": 200,
                "data": data,
                "message": None,
                "success": True,
                "requestId": secrets.token_hex(16),
                "datasourceIndex": 0,
                "serviceSuccess": True,
                "systemErrorCode": None,
            }
        )

    def _account_owner(self, username: str) -> Institution | None:
        """The institution ``username`` belongs to (an account belongs to one), None if none has it."""
        for inst in self.config.institutions():
            if username in inst.accounts:
                return inst
        return None

    def _check_token(self, token: str | None) -> tuple[str | None, _Session | None]:
        """(None, its session) if the token is good, else (the platform's message, None)."""
        if not token:
            return MSG_LOGIN_FIRST, None
        now = self.config.clock()
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return MSG_LOGIN_EXPIRED, None
            if session.kicked_at is not None:
                return MSG_KICKED.format(when=session.kicked_at), None
            if now - session.issued_at > self.config.token_ttl_s:
                del self._sessions[token]
                if self._current.get(session.username) == token:
                    del self._current[session.username]
                return MSG_LOGIN_EXPIRED, None
        return None, session

    def _rybq(self, raw_id: str, inst: Institution) -> _Answer:
        id_number = urllib.parse.unquote(raw_id)
        failing = self.faults.labels_fail.get(id_number)
        if failing is not None:
            self._count("faults")
            if failing == "reset":
                raise _Drop
            if failing == "504":
                return _text_answer(HTML_504, 504, "text/html")
            if failing == "middle":
                return _business_error(500, MSG_MIDDLE)
            return _json_answer({"code": 200, "data": MSG_SAVE_FAILED, "message": None})
        with self._lock:
            # The labels are the province's: every institution sees the same person.
            person = copy.deepcopy(self.config.people.get(id_number))
            self.counters["lookups"] += 1
            self._org_counters[inst.code]["lookups"] += 1
        return _json_answer(
            {
                "code": 200,
                "data": person,
                "message": None,
                "detailMessage": None,
                "success": True,
                "requestId": secrets.token_hex(16),
                "datasourceIndex": None,
                "serviceSuccess": True,
                "systemErrorCode": None,
            }
        )

    def _upload(self, raw: bytes, inst: Institution) -> _Answer:
        """Validate and store one record in ``inst``'s own records (lsh is unique only inside one)."""
        self._count("uploads", org=inst.code)
        try:
            body = json.loads(raw, parse_float=Decimal)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # An unreadable body never reaches the validator; the platform answers its generic error.
            self._count("rejections", org=inst.code)
            return _business_error(500, MSG_MIDDLE)
        errors = validate_upload(body)
        refused = self.faults.reject_lsh.get(str(body.get("lsh")))
        if refused == "middle":
            self._count("rejections", org=inst.code)
            return _business_error(500, MSG_MIDDLE)
        if refused is not None:
            errors = [*errors, "业务流水号不正确！"]
        if errors:
            self._count("rejections", org=inst.code)
            return _business_error(500, MSG_VALIDATION_PREFIX + "".join(e + "," for e in errors))

        lsh = body["lsh"]
        records = self.records_of(inst.code)
        with self._lock:
            created = lsh not in records
            records[lsh] = body
            outcome = "creates" if created else "updates"
            self.counters[outcome] += 1
            self._org_counters[inst.code][outcome] += 1
        if self.faults.take("commit_then_reset"):
            # Stored, but the answer is lost: the client must upload again and get 修改成功.
            self._count("faults")
            raise _Drop
        return _json_answer({"code": 200, "data": "新增成功" if created else "修改成功", "message": None})


# --- command line ----------------------------------------------------------------------------


def _load_people(path: str) -> dict[str, dict[str, Any] | None]:
    with open(path, encoding="utf-8") as f:
        loaded = json.load(f)
    if not isinstance(loaded, dict):
        raise SystemExit(f"{path}: expected a JSON object {{ID number: rybq data or null}}")
    people: dict[str, dict[str, Any] | None] = {}
    for id_number, data in loaded.items():
        people[str(id_number)] = None if data is None else _person(str(id_number), **data)
    return people


_FORM_TEXT: Final = {"as_printed": "as printed, %2B", "decoded": "decoded, +"}


def _yaml(text: str) -> str:
    # A JSON string is a YAML double-quoted scalar: codes stay strings, any name stays one value.
    return json.dumps(text, ensure_ascii=False)


def _banner(sim: Simulator) -> Iterator[str]:
    cfg = sim.config
    institutions = cfg.institutions()
    yield f"省平台模拟器已启动 / Platform simulator listening on {sim.url}  (env: {cfg.env})"
    if len(institutions) == 1:
        yield "在 settings.yaml 中填写 / Put this in settings.yaml:"
    else:
        yield (
            f"在 settings.yaml 中填写 / Put this in settings.yaml ({len(institutions)} institutions; "
            "the HIS query returns each visit's code in an `institution` column):"
        )
    yield "  upstream:"
    yield f"    env: {cfg.env}"
    yield f"    base_url: {sim.url}"
    if len(institutions) == 1:
        # Printed as a hospital receives it; the settings accept it decoded as well.
        yield f'    app_key: "{printed(base64_key(cfg.app_key))}"'
        for username, password in cfg.accounts.items():
            yield f"    username: {username}"
            yield f'    password: "{password}"'
            break
    else:
        yield "  institutions:"
        for inst in institutions:
            yield f"    - code: {_yaml(inst.code)}"
            yield f"      name: {_yaml(inst.name)}"
            yield f"      county_code: {_yaml(inst.county_code)}"
            yield f"      app_key: {_yaml(printed(base64_key(inst.app_key)))}"
            for username, password in inst.accounts.items():
                yield f"      username: {_yaml(username)}"
                yield f"      password: {_yaml(password)}"
                break
    labelled = [k for k, v in cfg.people.items() if v is not None]
    yield f"授权码读法 / app key form: {cfg.key_form} (hie_secret over the key {_FORM_TEXT[cfg.key_form]})"
    yield f"有标签的身份证号 / ID numbers with labels: {', '.join(labelled) or '-'}"
    if cfg.env == "test":
        yield f"测试环境需要请求头 / test env requires header  ehrkey: {EHRKEY}"
    yield "按 Ctrl-C 停止 / Press Ctrl-C to stop"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Serve the simulator until SIGINT or SIGTERM; prints the URL and the settings to use."""
    parser = argparse.ArgumentParser(
        prog="crowd-sync simulator", description="省平台模拟器 / Sichuan key-population platform simulator"
    )
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--env", choices=("test", "prod"), default="test")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added before every answer")
    parser.add_argument("--people", metavar="FILE.json", help="JSON object {ID number: rybq data or null}")
    parser.add_argument(
        "--key-form", choices=KEY_FORMS, default="as_printed",
        help="which text of the app key the platform signs: as printed (%%2B) or decoded (+)",
    )
    parser.add_argument(
        "--institutions", type=_positive, default=1, metavar="N",
        help="play N institutions of one alliance: the document's test institution and N-1 generated members, "
        "each with its own app key and account (default 1)",
    )
    args = parser.parse_args(argv)

    config = SimConfig(
        env=args.env, key_form=args.key_form,
        other_institutions=[demo_member(n) for n in range(2, args.institutions + 1)],
    )
    if args.people:
        config.people = _load_people(args.people)
    sim = Simulator(config, host=args.host, port=args.port)
    sim.faults.latency_s = max(args.latency_ms, 0.0) / 1000
    done = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        done.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _on_signal)
    sim.start()
    try:
        for line in _banner(sim):
            print(line, flush=True)
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("模拟器已停止 / simulator stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
