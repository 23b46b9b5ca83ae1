"""Every answer the document lists is classified, with the FAQ's fix attached."""

from __future__ import annotations

import json

import pytest

from sync.errors import AuthError, ConfigError, InvalidRecord, PlatformUnavailable, TransientError
from sync.logs import register_secret
from sync.upstream.answers import FAQ, MAX_MESSAGE_CHARS, Answer, Outcome, classify, split_violations, to_error


def platform(message: str, code: int = 500) -> bytes:
    """A business error as the platform sends it: HTTP 200, JSON body."""
    return json.dumps({"code": code, "data": None, "message": message, "success": False}, ensure_ascii=False).encode()


# (message as returned, outcome, a fragment of the fix the operator must read)
DOCUMENT_MESSAGES = [
    ("没找到该appKey对应的权限记录,或是该权限记录已被停用", Outcome.CONFIG, "测试环境使用测试 app_key"),
    ("中间请求异常：路径【/adapter/http/ehrc/v1.0/api/ehr/rybq/1】跟eventCode【12345678】不匹配", Outcome.CONFIG, "event_code"),
    ("Missing API key found in request", Outcome.CONFIG, "ehrkey"),
    ("你的账号于[2024-07-18 09:29:07]，在其他地方登录，当前账号被挤出", Outcome.AUTH, "logged in again elsewhere"),
    ("用户不存在或密码错误", Outcome.CONFIG, "special characters such as *"),
    ("集成平台适配器提示：签名认证未通过", Outcome.CONFIG, "9091"),
    ("没有访问该接口的权限", Outcome.CONFIG, "upstream.env"),
    ("请先登录", Outcome.AUTH, "logs in again"),
    ("登录过期或未登录", Outcome.AUTH, "logs in again"),
    ("504 GeteWay Time-out", Outcome.TRANSIENT, "retried later"),
    ("加密验证未通过", Outcome.CONFIG, "never twice"),
    ("(401) 未经授权", Outcome.CONFIG, "clock"),
    ("Method Not Allowed", Outcome.CONFIG, "GET/POST"),
    ("AppKey与机构id不匹配，请核实。", Outcome.CONFIG, "本医院"),
    ("授权错误或授权到期", Outcome.CONFIG, "renew"),
    ("中间请求异常", Outcome.GENERIC, "retried later with back-off"),
    ("参数校验错误：诊疗类型不能为空！,证件类型不能为空！,", Outcome.INVALID, "correct it in the HIS"),
]


@pytest.mark.parametrize(("message", "outcome", "fix"), DOCUMENT_MESSAGES)
def test_document_messages_as_json(message: str, outcome: Outcome, fix: str) -> None:
    answer = classify(200, platform(message), "application/json;charset=UTF-8")
    assert answer.outcome is outcome
    assert fix in answer.fix
    assert message in answer.message


@pytest.mark.parametrize(("message", "outcome", "fix"), DOCUMENT_MESSAGES)
def test_document_messages_as_plain_text_with_an_error_status(message: str, outcome: Outcome, fix: str) -> None:
    # Gateways answer in text with their own status; the text still decides.
    answer = classify(500, message.encode(), "text/plain")
    assert answer.outcome is outcome
    assert fix in answer.fix


def test_every_faq_row_has_a_bilingual_fix_and_its_example_matches_itself() -> None:
    for entry in FAQ:
        assert " / " in entry.fix, entry.example
        assert entry.pattern.search(entry.example), entry.example
        assert classify(200, platform(entry.example)).outcome is entry.outcome


def test_success_answers() -> None:
    created = classify(200, b'{"code":200,"data":"\xe6\x96\xb0\xe5\xa2\x9e\xe6\x88\x90\xe5\x8a\x9f","message":null}')
    assert created.ok
    assert created.data == "新增成功"
    person = classify(200, json.dumps({"code": 200, "data": {"xm": "李四"}, "message": None, "success": True}))
    assert person.outcome is Outcome.OK
    assert person.data == {"xm": "李四"}
    assert classify(200, '{"code":"200","data":null}').outcome is Outcome.OK


def test_validation_error_is_split_into_the_platforms_field_messages() -> None:
    answer = classify(200, platform("参数校验错误：诊疗类型不能为空！,证件类型不能为空！,总费用不能小于欠费金额！,"))
    assert answer.outcome is Outcome.INVALID
    assert answer.fields == ("诊疗类型不能为空！", "证件类型不能为空！", "总费用不能小于欠费金额！")
    error = to_error(answer, lsh="ZY001")
    assert isinstance(error, InvalidRecord)
    assert error.violations == list(answer.fields)
    assert error.lsh == "ZY001"


def test_split_violations_keeps_commas_inside_a_message_and_accepts_ascii_colon() -> None:
    assert split_violations("参数校验错误:a,b不能为空！,c！") == ("a,b不能为空！", "c！")
    assert split_violations("参数校验错误：x") == ("x",)


@pytest.mark.parametrize(
    ("status", "body", "outcome", "fix"),
    [
        (401, b"", Outcome.CONFIG, "clock"),
        (401, b"Unauthorized", Outcome.CONFIG, "clock"),
        (403, b"<html>Forbidden</html>", Outcome.CONFIG, "Sichuan"),
        (404, b"<html>Not Found</html>", Outcome.CONFIG, "base_url"),
        (404, b'{"code":404,"message":"\xe4\xb8\xad\xe9\x97\xb4\xe8\xaf\xb7\xe6\xb1\x82\xe5\xbc\x82\xe5\xb8\xb8"}', Outcome.CONFIG, "base_url"),
        (405, b"", Outcome.CONFIG, "GET/POST"),
        (302, b"", Outcome.CONFIG, "final address"),
        (418, b"I'm a teapot", Outcome.GENERIC, "retried later with back-off"),
        (429, b"Too Many Requests", Outcome.TRANSIENT, "retried later"),
        (502, b"<html><head><title>502 Bad Gateway</title></head></html>", Outcome.TRANSIENT, "retried later"),
        (503, b"503 Service Temporarily Unavailable", Outcome.TRANSIENT, "retried later"),
        (504, b"<html><head><title>504 Gateway Time-out</title></head><body>nginx</body></html>", Outcome.TRANSIENT, "packet loss"),
        (500, b"<html>Internal Server Error</html>", Outcome.TRANSIENT, "retried later"),
    ],
)
def test_http_statuses(status: int, body: bytes, outcome: Outcome, fix: str) -> None:
    answer = classify(status, body, "text/html")
    assert answer.outcome is outcome
    assert fix in answer.fix
    assert answer.http_status == status


def test_json_401_code_with_unlisted_wording_means_log_in_again() -> None:
    assert classify(200, platform("token无效", code=401)).outcome is Outcome.AUTH


def test_unknown_answers_keep_the_whole_body_redacted_and_cut() -> None:
    register_secret("s3cr3t-token-value")
    body = "<html>proxy says 510100198506020036 s3cr3t-token-value " + "x" * 2000 + "</html>"
    answer = classify(200, body, "text/html")
    # An HTML page answered with 200 (a proxy, a maintenance page): the platform is not there.
    assert answer.outcome is Outcome.TRANSIENT
    assert len(answer.message) <= MAX_MESSAGE_CHARS + 1
    assert "s3cr3t-token-value" not in answer.message
    assert "510100198506020036" not in answer.message
    assert "510100" in answer.message
    # FAQ 17: the whole answer is kept, not only its message field.
    generic = classify(200, json.dumps({"code": 500, "message": "中间请求异常", "requestId": "r-42"}))
    assert generic.outcome is Outcome.GENERIC
    assert "r-42" in generic.message
    assert classify(200, platform("未知错误")).outcome is Outcome.GENERIC


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "empty"),
        (None, "empty"),
        (b'{"code":200,"data":"\xe6\x96\xb0\xe5\xa2', "cut off"),
        (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "html"),
        (b'{"code":500}', "says nothing"),
        (b'{"code":500,"data":null,"message":null}', "says nothing"),
        (b"{}", "says nothing"),
    ],
)
def test_answers_no_application_gave_are_the_platforms_fault(body: bytes | None, why: str) -> None:
    for endpoint in (None, "login", "labels", "upload"):
        answer = classify(200, body, "application/json", endpoint=endpoint)
        assert answer.outcome is Outcome.TRANSIENT, (why, endpoint, answer)
        assert isinstance(to_error(answer), PlatformUnavailable)


@pytest.mark.parametrize(
    ("endpoint", "body", "ok"),
    [
        ("upload", {"code": 200, "data": "新增成功", "message": None}, True),
        ("upload", {"code": 200, "data": "修改成功", "message": None}, True),
        ("upload", {"code": "200", "data": "修改成功"}, True),
        ("upload", {"code": 200, "data": "保存失败", "message": None}, False),
        ("upload", {"code": 200, "data": None, "message": None}, False),
        ("upload", {"code": 200, "data": {"id": 1}}, False),
        ("upload", {"code": 200}, False),
        ("upload", {"code": 201, "data": "新增成功"}, False),
        ("login", {"code": 200, "data": {"token": "abc"}}, True),
        ("login", {"code": 200, "data": {"token": ""}}, False),
        ("login", {"code": 200, "data": "保存失败"}, False),
        ("login", {"code": 200, "data": None}, False),
        ("labels", {"code": 200, "data": None}, True),
        ("labels", {"code": 200, "data": {"xm": "李四"}}, True),
        ("labels", {"code": 200, "data": "保存失败"}, False),
        ("labels", {"code": 200, "data": []}, False),
    ],
)
def test_success_is_only_the_documents_success_answer_of_each_endpoint(
    endpoint: str, body: dict[str, object], ok: bool
) -> None:
    answer = classify(200, json.dumps(body, ensure_ascii=False), "application/json", endpoint=endpoint)
    assert answer.ok is ok, answer
    if not ok:
        # Not accepted, and not a reason to blame the record or the configuration.
        assert answer.outcome is Outcome.GENERIC
        error = to_error(answer)
        assert isinstance(error, TransientError) and error.generic


@pytest.mark.parametrize(
    "message",
    ["首次登录请修改密码", "您的密码为初始密码，请修改密码后登录", "默认密码不允许登录", "密码已过期，请修改", "第一次登录需要修改密码"],
)
def test_first_login_password_change_is_a_configuration_error_with_the_web_site(message: str) -> None:
    answer = classify(200, platform(message), "application/json", endpoint="login")
    assert answer.outcome is Outcome.CONFIG and answer.faq == 11
    assert "https://ehr.scwjxx.cn/login.html" in answer.fix and "upstream.password" in answer.fix
    # FAQ 5's wrong password stays FAQ 5.
    assert classify(200, platform("用户不存在或密码错误"), endpoint="login").faq == 5


def test_to_error_gives_each_class_with_message_fix_and_status() -> None:
    def make(message: str, status: int = 200) -> Answer:
        return classify(status, platform(message))

    config = to_error(make("没找到该appKey对应的权限记录,或是该权限记录已被停用"))
    assert isinstance(config, ConfigError)
    assert "正式环境使用医院下发的 app_key" in config.hint
    assert config.platform_message == "没找到该appKey对应的权限记录,或是该权限记录已被停用"
    assert "正式环境使用医院下发的 app_key" in str(config)
    assert isinstance(to_error(make("登录过期或未登录")), AuthError)
    transient = to_error(classify(504, b"<title>504 Gateway Time-out</title>"), lsh="MZ9")
    assert isinstance(transient, TransientError)
    assert not transient.generic
    assert transient.http_status == 504
    assert transient.lsh == "MZ9"
    generic = to_error(make("中间请求异常"))
    assert isinstance(generic, TransientError)
    assert generic.generic
    with pytest.raises(ValueError, match="OK"):
        to_error(classify(200, b'{"code":200,"data":"ok"}'))
