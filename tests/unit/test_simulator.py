"""The platform simulator answers exactly as the province's interface document says.

Requests are built by hand here (stdlib http.client, signatures computed with
hashlib from the document's formula) so these tests check the simulator
against the document, not against the client.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from sync.upstream.simulator import (
    TEST_APP_KEY,
    TEST_APP_KEY_ENCODED,
    TEST_IDS,
    TEST_PASSWORD,
    TEST_USERNAME,
    SimConfig,
    Simulator,
    sign,
)

SALT = "HIE_ADAPTER_382d8d3b4e6bc62de8b984ac84acf492"
LOGIN = "/adapter/http/ehrc/login/integration"
RYBQ = "/adapter/http/ehrc/v1.0/api/ehr/rybq/"
UPLOAD = "/adapter/http/ehrc/v1.0/api/crowd/medical/record/insertOrUpdate"
CODES = {
    "test": {
        LOGIN: "177cf201a6997f4ca0b8da298e31e3f1",
        RYBQ: "2af82deac11d4670977580bcc01aaa94",
        UPLOAD: "a7a87688f52e4100ab33a2514ec1971f",
    },
    "prod": {
        LOGIN: "177cf201a6997f4ca0b8da298e31e3f1",
        RYBQ: "8f6fa17d4dbf4b95bf1dfb01b0837345",
        UPLOAD: "b60eb517bdcd4525958aebadeef76d63",
    },
}
APP_KEY_KICK = "没找到该appKey对应的权限记录,或是该权限记录已被停用"


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body, parse_float=Decimal)


def md5_secret(event_code: str, app_key: str, stamp: str) -> str:
    return hashlib.md5((event_code + app_key + stamp + SALT).encode("utf-8")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Remote:
    """A simulator running in another process: its URL and the configuration it was started with."""

    url: str
    config: SimConfig


def call(
    sim: Simulator | Remote,
    method: str,
    path: str,
    *,
    body: Any = None,
    raw_body: bytes | None = None,
    token: str | None = None,
    event_code: str | None = None,
    app_key: str | None = None,
    stamp: str | None = None,
    secret: str | None = None,
    upper_secret: bool = False,
    ehrkey: str | None = "ehr#health@check",
    query: str | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Reply:
    """One request signed as the document says; any part can be overridden to break it.

    ``app_key`` is the text the platform is to read and sign: by default the test key in
    the simulator's reading (the printed text, or the base64 text when decoded).
    """
    env = sim.config.env
    if app_key is None:
        app_key = TEST_APP_KEY_ENCODED if sim.config.key_form == "as_printed" else TEST_APP_KEY
    code_path = RYBQ if path.startswith(RYBQ) else path
    code = event_code if event_code is not None else CODES[env].get(code_path, "x")
    ts = stamp if stamp is not None else str(int(sim.config.clock() * 1000))
    sig = secret if secret is not None else md5_secret(code, app_key, ts)
    if upper_secret:
        sig = sig.upper()
    if query is None:
        # Percent-encode the key once, so that the platform reads back exactly app_key:
        # decoded + -> %2B; as printed %2B -> %252B.
        query = (
            f"hie_event_code={code}&hie_app_key={urllib.parse.quote(app_key, safe='')}"
            f"&hie_time_stamp={urllib.parse.quote(ts, safe='')}&hie_secret={sig}"
        )
    headers = {"Content-Type": "application/json"}
    if ehrkey is not None:
        headers["ehrkey"] = ehrkey
    if token is not None:
        headers["accesstoken"] = token
    data = raw_body if raw_body is not None else (None if body is None else json.dumps(body, default=str).encode())
    own = conn is None
    c = conn or http.client.HTTPConnection(urllib.parse.urlsplit(sim.url).netloc, timeout=10)
    try:
        c.request(method, f"{path}?{query}", body=data, headers=headers)
        r = c.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        if own:
            c.close()


def login(sim: Simulator, **kw: Any) -> str:
    reply = call(sim, "POST", LOGIN, body={"username": TEST_USERNAME, "password": TEST_PASSWORD}, **kw)
    answer = reply.json()
    assert answer["code"] == 200, answer
    return str(answer["data"]["token"])


def visit(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "cardType": "10",
        "cardNo": TEST_IDS[0],
        "type": "1",
        "lsh": "ZY2024000123",
        "code": "2024000123",
        "enterDate": "2024-07-01",
        "leaveDate": "2024-07-08",
        "keyCrowd": "1",
        "icdName": "社区获得性肺炎",
        "icdCode": "J18.900",
        "totalFee": Decimal("8234.56"),
        "insFee": Decimal("6540.12"),
        "totalPrepayment": 0,
        "deficientFee": Decimal("1694.44"),
        "settlementDate": "2024-07-08",
    }
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not ...}


def upload(sim: Simulator, token: str, record: dict[str, Any]) -> Any:
    return call(sim, "POST", UPLOAD, raw_body=_dumps(record), token=token).json()


def _dumps(record: dict[str, Any]) -> bytes:
    """JSON with each Decimal written as a bare number literal, exactly as given (json.dumps cannot)."""
    parts = []
    for k, v in record.items():
        value = str(v) if isinstance(v, Decimal) else json.dumps(v, ensure_ascii=False)
        parts.append(f"{json.dumps(k)}: {value}")
    return ("{" + ", ".join(parts) + "}").encode("utf-8")


@pytest.fixture
def decoded_sim() -> Iterator[Simulator]:
    with Simulator(SimConfig(key_form="decoded")) as s:
        yield s


# --- signature ---------------------------------------------------------------------------------


def test_signature_known_answer() -> None:
    """The document's formula, by hand: md5(event_code + app_key + time_stamp + salt), lower-case hex."""
    by_hand = hashlib.md5(
        b"177cf201a6997f4ca0b8da298e31e3f1"
        b"MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMQnkRMriK2hsKxFZnu5O5152ITG7EiafzU8Sxj+T6Irh8IdwcV3AS7Qt2M7aIXHrnprb"
        b"+psxlkaMGdTeN7/8WkCAwEAAQ=="
        b"1721266147694"
        b"HIE_ADAPTER_382d8d3b4e6bc62de8b984ac84acf492"
    ).hexdigest()
    assert by_hand == "1899397dab9edf3d75de3c6866bdd912"
    assert sign("177cf201a6997f4ca0b8da298e31e3f1", TEST_APP_KEY, "1721266147694") == by_hand
    # TEST_APP_KEY is the base64 text of the document's percent-encoded key.
    assert "%" not in TEST_APP_KEY
    assert urllib.parse.quote(TEST_APP_KEY, safe="") == TEST_APP_KEY_ENCODED
    assert TEST_APP_KEY_ENCODED.endswith("%2F8WkCAwEAAQ%3D%3D")


def test_the_default_platform_knows_the_key_as_printed(sim: Simulator) -> None:
    assert sim.config.key_form == "as_printed"
    assert login(sim)
    # Signed over the printed text, but sent encoded only once: the gateway reads the base64 text.
    ts = str(int(time.time() * 1000))
    code = CODES["test"][LOGIN]
    once = (
        f"hie_event_code={code}&hie_app_key={TEST_APP_KEY_ENCODED}&hie_time_stamp={ts}"
        f"&hie_secret={md5_secret(code, TEST_APP_KEY_ENCODED, ts)}"
    )
    body = {"username": TEST_USERNAME, "password": TEST_PASSWORD}
    assert call(sim, "POST", LOGIN, body=body, query=once).json()["message"] == APP_KEY_KICK
    # The printed text, signed over the base64 text: the signature is refused.
    answer = call(sim, "POST", LOGIN, body=body, secret=md5_secret(code, TEST_APP_KEY, ts), stamp=ts).json()
    assert answer["message"] == "加密验证未通过"
    assert call(sim, "POST", LOGIN, body=body, app_key=TEST_APP_KEY).json()["message"] == APP_KEY_KICK
    assert sim.counters["logins"] == 1


def test_a_decoded_platform_knows_the_base64_text(decoded_sim: Simulator) -> None:
    assert login(decoded_sim)
    body = {"username": TEST_USERNAME, "password": TEST_PASSWORD}
    # Sent as printed (%252B on the wire): the gateway reads %2B, a key it does not know.
    assert call(decoded_sim, "POST", LOGIN, body=body, app_key=TEST_APP_KEY_ENCODED).json()["message"] == APP_KEY_KICK
    ts = str(int(time.time() * 1000))
    code = CODES["test"][LOGIN]
    answer = call(
        decoded_sim, "POST", LOGIN, body=body, secret=md5_secret(code, TEST_APP_KEY_ENCODED, ts), stamp=ts
    ).json()
    assert answer["message"] == "加密验证未通过"
    assert decoded_sim.counters["logins"] == 1


# --- the order of checks, each with the platform's exact answer -------------------------------

BAD_REQUESTS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("unknown path", "GET", "/adapter/http/ehrc/v1.0/api/nothing", {}, 404, '"message": "中间请求异常"'),
    ("wrong method", "GET", LOGIN, {}, 405, "Method Not Allowed"),
    ("no ehrkey in test", "GET", RYBQ + TEST_IDS[0], {"ehrkey": None}, 401, "Missing API key found in request"),
    ("wrong ehrkey", "GET", RYBQ + TEST_IDS[0], {"ehrkey": "ehr#health"}, 401, "Missing API key found in request"),
    (
        "missing parameter",
        "GET",
        RYBQ + TEST_IDS[0],
        {"query": "hie_event_code=2af82deac11d4670977580bcc01aaa94"},
        200,
        APP_KEY_KICK,
    ),
    ("unknown app key", "GET", RYBQ + TEST_IDS[0], {"app_key": "AAAA+BBBB/CC=="}, 200, APP_KEY_KICK),
    ("time stamp not a number", "GET", RYBQ + TEST_IDS[0], {"stamp": "2024-07-18 09:29:07"}, 401, "(401) 未经授权"),
    ("document's example time stamp", "GET", RYBQ + TEST_IDS[0], {"stamp": "1721266147694"}, 401, "(401) 未经授权"),
    (
        "prod event code in test",
        "GET",
        RYBQ + TEST_IDS[0],
        {"event_code": "8f6fa17d4dbf4b95bf1dfb01b0837345"},
        200,
        "没有访问该接口的权限",
    ),
    (
        "event code of another path",
        "GET",
        RYBQ + TEST_IDS[0],
        {"event_code": "a7a87688f52e4100ab33a2514ec1971f"},
        200,
        f"中间请求异常：路径【{RYBQ}{TEST_IDS[0]}】跟eventCode【a7a87688f52e4100ab33a2514ec1971f】不匹配",
    ),
    ("wrong secret", "GET", RYBQ + TEST_IDS[0], {"secret": "0" * 32}, 200, "加密验证未通过"),
    ("upper-case secret", "GET", RYBQ + TEST_IDS[0], {"upper_secret": True}, 200, "加密验证未通过"),
    ("no token", "GET", RYBQ + TEST_IDS[0], {}, 200, "请先登录"),
    ("unknown token", "GET", RYBQ + TEST_IDS[0], {"token": "deadbeef"}, 200, "登录过期或未登录"),
]


@pytest.mark.parametrize(
    ("method", "path", "kw", "status", "expected"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_each_check_answers_the_platforms_message(
    sim: Simulator, method: str, path: str, kw: dict[str, Any], status: int, expected: str
) -> None:
    reply = call(sim, method, path, **kw)
    assert reply.status == status
    assert expected in reply.text
    assert reply.headers["content-length"] == str(len(reply.body))
    if status == 200:
        answer = reply.json()
        assert answer["success"] is False
        assert answer["data"] is None
        assert answer["message"] == expected
        assert answer["code"] == (401 if "登录" in expected else 500)
    assert sim.counters["lookups"] == 0


def test_double_encoded_app_key_is_a_wrong_key(decoded_sim: Simulator) -> None:
    sim = decoded_sim
    ts = str(int(time.time() * 1000))
    code = CODES["test"][RYBQ]
    twice = urllib.parse.quote(urllib.parse.quote(TEST_APP_KEY, safe=""), safe="")
    query = (
        f"hie_event_code={code}&hie_app_key={twice}&hie_time_stamp={ts}&hie_secret={md5_secret(code, TEST_APP_KEY, ts)}"
    )
    assert call(sim, "GET", RYBQ + TEST_IDS[0], query=query).json()["message"] == APP_KEY_KICK


def test_earlier_check_wins(sim: Simulator) -> None:
    """Without ehrkey and with a wrong key and secret, the gateway's first complaint is the ehrkey."""
    reply = call(sim, "GET", RYBQ + TEST_IDS[0], ehrkey=None, app_key="wrong", secret="bad")
    assert (reply.status, reply.json()) == (401, {"message": "Missing API key found in request"})
    reply = call(sim, "GET", RYBQ + TEST_IDS[0], stamp="1", secret="bad")
    assert (reply.status, reply.text) == (401, "(401) 未经授权")


def test_bad_password_and_bad_login_body(sim: Simulator) -> None:
    for body in (
        {"username": TEST_USERNAME, "password": "Ehr123456*"},
        {"username": "nobody", "password": TEST_PASSWORD},
    ):
        answer = call(sim, "POST", LOGIN, body=body).json()
        assert (answer["code"], answer["message"]) == (500, "用户不存在或密码错误")
    answer = call(sim, "POST", LOGIN, raw_body=b"username=ceshi-rybq").json()
    assert answer["message"] == "用户不存在或密码错误"
    assert sim.counters["auth_failures"] == 3
    assert sim.counters["logins"] == 0


# --- the happy path ----------------------------------------------------------------------------


def test_login_lookup_then_upload_create_and_update(sim: Simulator) -> None:
    reply = call(sim, "POST", LOGIN, body={"username": TEST_USERNAME, "password": TEST_PASSWORD})
    answer = reply.json()
    assert answer["success"] is True
    assert answer["message"] is None
    assert answer["data"]["username"] == TEST_USERNAME
    token = answer["data"]["token"]
    assert len(token) >= 16

    person = call(sim, "GET", RYBQ + TEST_IDS[0], token=token).json()
    assert person["code"] == 200
    assert person["success"] is True
    assert person["data"]["xm"] == "李四"
    assert (person["data"]["hjdQh"], person["data"]["hjdQhName"]) == ("511425", "青神县")
    assert [(b["code"], b["name"], b["attr1"]) for b in person["data"]["jjxBq"]] == [
        ("J01.01", "特困人员", "1"),
        ("J01.02", "农村低保对象", "1"),
    ]
    others = [call(sim, "GET", RYBQ + i, token=token).json()["data"] for i in TEST_IDS[1:]]
    assert all(o is not None and o["jjxBq"] for o in others)
    assert any(b["attr1"] == "0" for o in others for b in o["jjxBq"])
    assert call(sim, "GET", RYBQ + "510100199001011234", token=token).json()["data"] is None

    record = visit()
    assert upload(sim, token, record) == {"code": 200, "data": "新增成功", "message": None}
    assert upload(sim, token, visit(totalPrepayment=Decimal("500.00"))) == {
        "code": 200,
        "data": "修改成功",
        "message": None,
    }
    stored = sim.records["ZY2024000123"]
    assert stored["totalPrepayment"] == Decimal("500.00")
    assert isinstance(stored["totalFee"], Decimal)
    assert stored["totalFee"] == Decimal("8234.56")
    assert sim.counters["logins"] == 1
    assert sim.counters["lookups"] == 4
    assert (sim.counters["uploads"], sim.counters["creates"], sim.counters["updates"]) == (2, 1, 1)


def test_add_person(sim: Simulator) -> None:
    token = login(sim)
    sim.add_person(
        "510100199001011234",
        xm="王五",
        jjxBq=[{"code": "J01.06", "name": "突发严重困难户", "remark": None, "attr1": "1", "attr2": None}],
    )
    data = call(sim, "GET", RYBQ + "510100199001011234", token=token).json()["data"]
    assert (data["xm"], data["zjhm"], data["jjxBq"][0]["code"]) == ("王五", "510100199001011234", "J01.06")
    sim.add_person(TEST_IDS[0], None)
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=token).json()["data"] is None


def test_keep_alive_connection_serves_many_requests(sim: Simulator) -> None:
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(sim.url).netloc, timeout=5)
    try:
        token = login(sim, conn=conn)
        for _ in range(5):
            assert call(sim, "GET", RYBQ + TEST_IDS[1], token=token, conn=conn).json()["data"]["zjhm"] == TEST_IDS[1]
    finally:
        conn.close()


# --- tokens ------------------------------------------------------------------------------------

KICKED = re.compile(r"^你的账号于\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\]，在其他地方登录，当前账号被挤出$")


def test_second_login_kicks_out_the_first_token(sim: Simulator) -> None:
    first = login(sim)
    second = login(sim)
    answer = call(sim, "GET", RYBQ + TEST_IDS[0], token=first).json()
    assert answer["code"] == 401
    assert KICKED.match(answer["message"]), answer["message"]
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=second).json()["code"] == 200

    sim.kick()
    assert KICKED.match(call(sim, "GET", RYBQ + TEST_IDS[0], token=second).json()["message"])


def test_token_expires_after_its_lifetime() -> None:
    offset = [0.0]
    config = SimConfig(clock=lambda: time.time() + offset[0])
    with Simulator(config) as sim:
        token = login(sim)
        offset[0] = 12 * 3600 - 60
        assert call(sim, "GET", RYBQ + TEST_IDS[0], token=token).json()["code"] == 200
        offset[0] = 12 * 3600 + 1
        answer = call(sim, "GET", RYBQ + TEST_IDS[0], token=token).json()
        assert (answer["code"], answer["message"]) == (401, "登录过期或未登录")
        # The client's own clock is now 12 hours behind the platform: refused as 401 by the gateway.
        reply = call(sim, "GET", RYBQ + TEST_IDS[0], token=token, stamp=str(int(time.time() * 1000)))
        assert (reply.status, reply.text) == (401, "(401) 未经授权")


def test_revoked_tokens(sim: Simulator) -> None:
    token = login(sim)
    sim.revoke_tokens()
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=token).json()["message"] == "登录过期或未登录"
    assert sim.counters["auth_failures"] == 1


# --- upload validation -------------------------------------------------------------------------

FIELD_RULES: list[tuple[str, Any, str]] = [
    ("type", ..., "诊疗类型不能为空！"),
    ("type", "3", "诊疗类型不正确！"),
    ("cardType", "", "证件类型不能为空！"),
    ("cardType", "11", "证件类型不正确！"),
    ("cardType", 10, "证件类型格式不正确！"),
    ("cardNo", None, "证件号码不能为空！"),
    ("cardNo", "1" * 41, "证件号码长度不能超过40！"),
    ("lsh", "   ", "业务流水号不能为空！"),
    ("lsh", "L" * 51, "业务流水号长度不能超过50！"),
    ("code", ..., "业务编号不能为空！"),
    ("code", "C" * 51, "业务编号长度不能超过50！"),
    ("keyCrowd", "2", "是否重点人群不正确！"),
    ("keyCrowd", ..., "是否重点人群不能为空！"),
    ("icdName", "肺" * 201, "主诊断长度不能超过200！"),
    ("icdCode", "J" * 101, "主诊断编码长度不能超过100！"),
    ("enterDate", ..., "诊疗时间不能为空！"),
    ("enterDate", "2024/07/01", "诊疗时间格式不正确！"),
    ("enterDate", "2024-02-30", "诊疗时间格式不正确！"),
    ("enterDate", "2024-07-01 08:00:00", "诊疗时间格式不正确！"),
    ("leaveDate", ..., "出院时间不能为空！"),
    ("leaveDate", "2024-7-8", "出院时间格式不正确！"),
    ("leaveDate", "2024-06-30", "出院时间不能小于诊疗时间！"),
    ("settlementDate", ..., "结算日期不能为空！"),
    ("settlementDate", "20240708", "结算日期格式不正确！"),
    ("settlementDate", "2024-06-30", "结算日期不能小于诊疗时间！"),
    ("totalFee", ..., "总费用不能为空！"),
    ("totalFee", "8234.56", "总费用格式不正确！"),
    ("totalFee", Decimal("8234.567"), "总费用格式不正确！"),
    ("totalFee", Decimal("-1.00"), "总费用不能为负数！"),
    ("totalFee", Decimal("1000000.00"), "总费用超出范围！"),
    ("totalFee", Decimal("100.00"), "总费用不能小于欠费金额！"),
    ("totalFee", True, "总费用格式不正确！"),
    ("insFee", Decimal("-0.01"), "医保已报销金额不能为负数！"),
    ("insFee", "0", "医保已报销金额格式不正确！"),
    ("totalPrepayment", ..., "住院预交金不能为空！"),
    ("totalPrepayment", "0.00", "住院预交金格式不正确！"),
    ("totalPrepayment", -5, "住院预交金不能为负数！"),
    ("deficientFee", Decimal("0.001"), "欠费金额格式不正确！"),
    ("deficientFee", Decimal("1234567"), "欠费金额超出范围！"),
]


@pytest.mark.parametrize(("field", "bad", "message"), FIELD_RULES, ids=[f"{f}-{m}" for f, _, m in FIELD_RULES])
def test_each_upload_rule(sim: Simulator, field: str, bad: Any, message: str) -> None:
    token = login(sim)
    answer = upload(sim, token, visit(**{field: bad}))
    assert answer["code"] == 500
    assert answer["data"] is None
    assert answer["message"] == f"参数校验错误：{message},"
    assert sim.records == {}
    assert sim.counters["rejections"] == 1


def test_accepted_edge_values(sim: Simulator) -> None:
    token = login(sim)
    outpatient = visit(type="2", leaveDate=..., lsh="MZ1", icdName=..., icdCode=...)
    assert upload(sim, token, outpatient)["data"] == "新增成功"
    extremes = visit(
        lsh="L" * 50,
        cardType="60",
        cardNo="X" * 40,
        totalFee=Decimal("999999.99"),
        deficientFee=Decimal("999999.99"),
        insFee=0,
        totalPrepayment=Decimal("0.5"),
        leaveDate="2024-07-01",
        settlementDate="2024-07-01",
        enterDate="2024-07-01",
        keyCrowd="0",
    )
    assert upload(sim, token, extremes)["data"] == "新增成功"
    assert sim.records["L" * 50]["insFee"] == 0


def test_all_violations_in_one_answer(sim: Simulator) -> None:
    token = login(sim)
    body = {
        "enterDate": "2024-07-01",
        "settlementDate": "2024-07-01",
        "totalFee": 1,
        "insFee": 0,
        "totalPrepayment": 0,
        "deficientFee": 0,
    }
    answer = upload(sim, token, body)
    assert answer["message"] == (
        "参数校验错误：诊疗类型不能为空！,证件类型不能为空！,业务流水号不能为空！,"
        "证件号码不能为空！,业务编号不能为空！,是否重点人群不能为空！,"
    )
    answer = upload(sim, token, visit(cardNo="1" * 41, totalFee="1", insFee=Decimal("-1"), leaveDate="2024-06-01"))
    assert answer["message"] == (
        "参数校验错误：证件号码长度不能超过40！,总费用格式不正确！,医保已报销金额不能为负数！,出院时间不能小于诊疗时间！,"
    )


def test_unreadable_upload_body(sim: Simulator) -> None:
    token = login(sim)
    answer = call(sim, "POST", UPLOAD, raw_body=b"{not json", token=token).json()
    assert (answer["code"], answer["message"]) == (500, "中间请求异常")


# --- faults ------------------------------------------------------------------------------------


def test_504_then_recovers(sim: Simulator) -> None:
    sim.faults.next_504 = 1
    reply = call(sim, "GET", RYBQ + TEST_IDS[0])
    assert reply.status == 504
    assert reply.text.startswith("<html><head><title>504 Gateway Time-out</title>")
    assert call(sim, "GET", RYBQ + TEST_IDS[0]).json()["message"] == "请先登录"


def test_reset_closes_the_connection(sim: Simulator) -> None:
    sim.faults.next_reset = 1
    with pytest.raises(ConnectionError):
        call(sim, "POST", LOGIN, body={"username": TEST_USERNAME, "password": TEST_PASSWORD})
    assert sim.counters["logins"] == 0
    assert login(sim)


def test_commit_then_reset_stores_the_record(sim: Simulator) -> None:
    token = login(sim)
    sim.faults.next_commit_then_reset = 1
    with pytest.raises(ConnectionError):
        upload(sim, token, visit())
    assert sim.records["ZY2024000123"]["lsh"] == "ZY2024000123"
    # The retry finds the record already there.
    assert upload(sim, token, visit())["data"] == "修改成功"


def test_trickle_sends_the_answer_slowly(sim: Simulator) -> None:
    sim.faults.trickle_s = 0.002
    started = time.monotonic()
    reply = call(sim, "GET", RYBQ + TEST_IDS[0])
    elapsed = time.monotonic() - started
    assert reply.json()["message"] == "请先登录"
    # Head plus body, one byte per interval.
    assert elapsed >= 0.002 * (len(reply.body) + 100)


def test_platform_down(sim: Simulator) -> None:
    sim.faults.down = True
    reply = call(sim, "POST", LOGIN, body={"username": TEST_USERNAME, "password": TEST_PASSWORD})
    assert reply.status == 503
    assert "503 Service Temporarily Unavailable" in reply.text
    sim.faults.down = False
    assert login(sim)


def test_app_key_revoked(sim: Simulator) -> None:
    sim.faults.app_key_revoked = True
    answer = call(sim, "POST", LOGIN, body={"username": TEST_USERNAME, "password": TEST_PASSWORD}).json()
    assert (answer["code"], answer["message"]) == (500, APP_KEY_KICK)


def test_probabilistic_faults_repeat_with_a_seed(sim: Simulator) -> None:
    def run() -> list[int]:
        sim.faults.seed = 42
        return [call(sim, "GET", RYBQ + TEST_IDS[0]).status for _ in range(12)]

    sim.faults.p_504 = 0.5
    first = run()
    assert first == run()
    assert set(first) == {200, 504}


# --- counters, headers, environments ----------------------------------------------------------


def test_counters(sim: Simulator) -> None:
    token = login(sim)
    call(sim, "GET", RYBQ + TEST_IDS[0], token=token)
    upload(sim, token, visit())
    upload(sim, token, visit(type="9"))
    call(sim, "GET", RYBQ + TEST_IDS[0], secret="bad")
    assert {
        k: sim.counters[k]
        for k in ("requests", "logins", "lookups", "uploads", "creates", "updates", "rejections", "auth_failures")
    } == {
        "requests": 5,
        "logins": 1,
        "lookups": 1,
        "uploads": 2,
        "creates": 1,
        "updates": 0,
        "rejections": 1,
        "auth_failures": 0,
    }
    assert len(sim.requests_log) == 5
    seen = sim.requests_log[1]
    assert (seen.method, seen.path) == ("GET", RYBQ + TEST_IDS[0])
    assert "hie_app_key=MFww" in seen.raw_query
    assert "%252B" in seen.raw_query  # the printed key, encoded once more on the wire
    assert seen.headers["accesstoken"] == token
    assert json.loads(sim.requests_log[2].body)["lsh"] == "ZY2024000123"
    sim.reset_counters()
    assert sim.counters["requests"] == 0


def test_date_header_follows_the_platform_clock() -> None:
    config = SimConfig(clock=lambda: time.time() + 3600)
    with Simulator(config) as sim:
        reply = call(sim, "GET", RYBQ + TEST_IDS[0])
        platform_time = parsedate_to_datetime(reply.headers["date"]).timestamp()
        assert abs(platform_time - (time.time() + 3600)) < 5
        reply = call(sim, "GET", "/nowhere")
        assert "date" in reply.headers


def test_prod_needs_no_ehrkey_and_refuses_test_event_codes() -> None:
    with Simulator(SimConfig(env="prod")) as sim:
        token = login(sim, ehrkey=None)
        assert call(sim, "GET", RYBQ + "110104198506020037", token=token, ehrkey=None).json()["data"] is not None
        answer = call(sim, "GET", RYBQ + TEST_IDS[0], token=token, ehrkey=None, event_code=CODES["test"][RYBQ]).json()
        assert (answer["code"], answer["message"]) == (500, "没有访问该接口的权限")
        answer = call(sim, "POST", UPLOAD, body={}, token=token, ehrkey=None, event_code=CODES["test"][UPLOAD]).json()
        assert answer["message"] == "没有访问该接口的权限"


# --- concurrency and shutdown -------------------------------------------------------------------


def test_many_keep_alive_connections_then_prompt_stop() -> None:
    sim = Simulator().start()
    token = login(sim)
    netloc = urllib.parse.urlsplit(sim.url).netloc
    conns = [http.client.HTTPConnection(netloc, timeout=10) for _ in range(40)]
    failures: list[BaseException] = []

    def worker(conn: http.client.HTTPConnection) -> None:
        try:
            for i in range(3):
                answer = call(sim, "GET", RYBQ + TEST_IDS[i], token=token, conn=conn).json()
                assert answer["data"]["zjhm"] == TEST_IDS[i]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sim.counters["lookups"] == 120

    # The 40 connections stay open (keep-alive); stopping must not wait for them.
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 2
    for c in conns:
        c.close()


@pytest.mark.parametrize("key_form", ["as_printed", "decoded"])
def test_command_line_serves_until_interrupted(tmp_path: Path, key_form: str) -> None:
    people = tmp_path / "people.json"
    people.write_text(json.dumps({"510100199001011234": {"xm": "王五"}, TEST_IDS[0]: None}), encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "sync.upstream.simulator", "--port", "0", "--env", "test", "--people", str(people),
            "--key-form", key_form,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", first)
        assert url, first
        banner = [proc.stdout.readline() for _ in range(8)]
        assert any(TEST_APP_KEY_ENCODED in line for line in banner)  # as a hospital receives it
        assert any(TEST_USERNAME in line for line in banner)
        assert any(f"app key form: {key_form}" in line for line in banner)

        remote = Remote(url=url.group(0), config=SimConfig(key_form=key_form))
        token = login(remote)
        assert call(remote, "GET", RYBQ + "510100199001011234", token=token).json()["data"]["xm"] == "王五"
        assert call(remote, "GET", RYBQ + TEST_IDS[0], token=token).json()["data"] is None

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the faults the trust tests need -----------------------------------------------------------


def test_down_answers_a_502_page_or_a_reset_to_every_request_login_included(sim: Simulator) -> None:
    sim.faults.down = True
    sim.faults.down_with = "502"
    reply = call(sim, "POST", LOGIN, body={"username": TEST_USERNAME, "password": TEST_PASSWORD})
    assert reply.status == 502 and "502 Bad Gateway" in reply.text
    sim.faults.down_with = "reset"
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        call(sim, "GET", RYBQ + TEST_IDS[0])
    sim.faults.down = False
    assert login(sim)
    assert sim.counters["requests_login"] == 2 and sim.counters["requests_rybq"] == 1


def test_faults_can_be_limited_to_one_endpoint(sim: Simulator) -> None:
    token = login(sim)
    sim.faults.endpoints = frozenset({"upload"})
    sim.faults.p_504 = 1.0
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=token).json()["code"] == 200
    assert call(sim, "POST", UPLOAD, raw_body=_dumps(visit()), token=token).status == 504
    assert sim.records == {}


@pytest.mark.parametrize(
    ("kind", "stored", "body"),
    [
        ("save_failed", False, '{"code": 200, "data": "保存失败", "message": null}'),
        ("bare500", False, '{"code": 500}'),
        ("middle", False, "中间请求异常"),
        ("html200", False, "<html>"),
        ("truncated", True, '{"code": 200, "data": "'),
    ],
)
def test_fake_success_answers(sim: Simulator, kind: str, stored: bool, body: str) -> None:
    token = login(sim)
    sim.faults.fake = (kind,)
    sim.faults.next_fake = 1
    reply = call(sim, "POST", UPLOAD, raw_body=_dumps(visit()), token=token)
    assert reply.status == 200 and body.encode() in reply.body
    assert ("ZY2024000123" in sim.records) is stored
    # The next one is answered for real.
    assert upload(sim, token, visit())["data"] == ("修改成功" if stored else "新增成功")


def test_chosen_lsh_values_and_id_numbers_are_refused(sim: Simulator) -> None:
    token = login(sim)
    sim.faults.reject_lsh = {"A1": "invalid", "A2": "middle"}
    sim.faults.labels_fail = {TEST_IDS[0]: "middle", TEST_IDS[1]: "save_failed"}
    assert "参数校验错误" in upload(sim, token, visit(lsh="A1"))["message"]
    assert upload(sim, token, visit(lsh="A2"))["message"] == "中间请求异常"
    assert upload(sim, token, visit(lsh="A3"))["data"] == "新增成功"
    assert set(sim.records) == {"A3"}
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=token).json()["message"] == "中间请求异常"
    assert call(sim, "GET", RYBQ + TEST_IDS[1], token=token).json()["data"] == "保存失败"
    assert call(sim, "GET", RYBQ + TEST_IDS[2], token=token).json()["data"]["zjhm"] == TEST_IDS[2]


def test_an_account_that_must_change_its_password_first(sim: Simulator) -> None:
    sim.config.password_change = {TEST_USERNAME}
    answer = call(sim, "POST", LOGIN, body={"username": TEST_USERNAME, "password": TEST_PASSWORD}).json()
    assert answer["code"] == 500 and "修改密码" in answer["message"] and "首次登录" in answer["message"]
    sim.config.password_change = set()
    assert login(sim)
