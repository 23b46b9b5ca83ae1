"""The client against the built-in platform simulator over loopback."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest

from sync.errors import AuthError, ConfigError, InvalidRecord, TransientError
from sync.logs import configure
from sync.settings import EventCodes, Upstream
from sync.upstream.client import Client, UploadResult
from sync.upstream.simulator import (
    TEST_APP_KEY,
    TEST_IDS,
    TEST_PASSWORD,
    TEST_USERNAME,
    SimConfig,
    Simulator,
)
from sync.upstream.tokens import MemoryTokenStore, Token

# The app key as the document prints it (percent-encoded once).
TEST_APP_KEY_ENCODED = quote(TEST_APP_KEY, safe="")
LOGIN = "/adapter/http/ehrc/login/integration"


def settings(sim: Simulator, **overrides: Any) -> Upstream:
    values: dict[str, Any] = {
        "base_url": sim.url, "app_key": TEST_APP_KEY_ENCODED, "username": TEST_USERNAME, "password": TEST_PASSWORD,
        "timeout_s": 5, "rate_limit_per_s": 1000, "concurrency": 16,
    }
    values.update(overrides)
    return Upstream(**values)


def record(lsh: str = "ZY2024000001", **overrides: Any) -> str:
    payload: dict[str, Any] = {
        "cardType": "10", "cardNo": TEST_IDS[0], "type": "1", "lsh": lsh, "code": "ZY001",
        "enterDate": "2024-07-01", "leaveDate": "2024-07-05", "keyCrowd": "1", "icdName": "肺炎", "icdCode": "J18.9",
        "totalFee": 1234.56, "insFee": 1000.00, "totalPrepayment": 0, "deficientFee": 234.56,
        "settlementDate": "2024-07-05",
    }
    payload.update(overrides)
    return json.dumps(payload, ensure_ascii=False)


@pytest.fixture
def client(sim: Simulator) -> Iterator[Client]:
    c = Client(settings(sim), MemoryTokenStore())
    yield c
    c.close()


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure(level="debug", fmt="json", stream=stream)
    yield stream
    configure(level="warning", fmt="json")


def test_lookup_returns_the_person_with_labels_county_and_credit_flag(client: Client) -> None:
    result = client.lookup("510100198506020036")
    person = result.person
    assert person is not None
    assert person.name == "李四"
    assert person.id_number == "510100198506020036"
    assert (person.household_county, person.household_county_name) == ("511425", "青神县")
    assert person.insured is True
    assert [label.code for label in person.socio_economic] == ["J01.01", "J01.02"]
    assert person.is_key_population
    assert person.credit_constrained
    assert result.data is not None
    assert result.data["hjdQh"] == "511425"


def test_unknown_or_unlabelled_person_is_none(sim: Simulator, client: Client) -> None:
    sim.add_person("510100199001010011", None)
    assert client.lookup("510100199001010011").person is None
    assert client.lookup("110101199003077777").person is None
    assert client.counters["logins"] == 1  # one token for every call


def test_upload_creates_then_updates(sim: Simulator, client: Client) -> None:
    first = client.upload(record(totalFee=100.5, deficientFee=0.5), lsh="ZY2024000001")
    assert first == UploadResult(created=True, message="新增成功", http_status=200)
    second = client.upload(record(totalFee=200.25, deficientFee=0.5), lsh="ZY2024000001")
    assert not second.created
    assert second.message == "修改成功"
    assert str(sim.records["ZY2024000001"]["totalFee"]) == "200.25"


def test_body_is_sent_exactly_as_given(sim: Simulator, client: Client) -> None:
    body = record(icdName="社区获得性肺炎")
    client.upload(body, lsh="ZY2024000001")
    seen = [r for r in sim.requests_log if r.method == "POST" and r.path != LOGIN][-1]
    assert seen.body == body.encode("utf-8")
    assert seen.headers["content-type"].lower().startswith("application/json")


@pytest.mark.parametrize("key", [TEST_APP_KEY_ENCODED, TEST_APP_KEY])
@pytest.mark.parametrize(
    ("form", "on_the_wire"),
    [
        # As printed: the printed text encoded once more, so the platform reads back %2B.
        ("as_printed", TEST_APP_KEY_ENCODED.replace("%", "%25")),
        # Decoded: the base64 text encoded exactly once, so the platform reads back +.
        ("decoded", TEST_APP_KEY_ENCODED),
    ],
)
def test_wire_query_carries_the_app_key_as_the_platform_reads_it(key: str, form: str, on_the_wire: str) -> None:
    with (
        Simulator(SimConfig(key_form=form)) as sim,
        Client(settings(sim, app_key=key, app_key_form=form), MemoryTokenStore()) as c,
    ):
        c.lookup(TEST_IDS[1])
        assert len(sim.requests_log) == 2
        for seen in sim.requests_log:
            assert f"hie_app_key={on_the_wire}&" in seen.raw_query
            assert "%2525" not in seen.raw_query
        stamps = [r.raw_query.split("hie_time_stamp=")[1].split("&")[0] for r in sim.requests_log]
        assert all(abs(int(s) / 1000 - time.time()) < 60 for s in stamps)


def test_headers_ehrkey_in_test_only_and_accesstoken_on_all_but_login(sim: Simulator, client: Client) -> None:
    client.lookup(TEST_IDS[0])
    client.upload(record(), lsh="ZY2024000001")
    assert [r.path == LOGIN for r in sim.requests_log] == [True, False, False]
    for seen in sim.requests_log:
        assert seen.headers["ehrkey"] == "ehr#health@check"
        assert ("accesstoken" in seen.headers) == (seen.path != LOGIN)

    with Simulator(SimConfig(env="prod")) as prod, Client(settings(prod, env="prod"), MemoryTokenStore()) as c:
        assert c.lookup("110104198506020037").person is not None
        assert len(prod.requests_log) == 2
        assert all("ehrkey" not in r.headers for r in prod.requests_log)


@pytest.mark.parametrize("how", ["expired", "revoked"])
def test_sixteen_threads_with_a_stale_token_cause_exactly_one_login(sim: Simulator, how: str) -> None:
    store = MemoryTokenStore()
    c = Client(settings(sim), store)
    if how == "expired":
        past = datetime.now(UTC) - timedelta(hours=13)
        store.renew(None, lambda: Token(value="old-token", obtained_at=past, expires_at=past + timedelta(hours=12)))
    else:
        c.lookup(TEST_IDS[0])
        sim.revoke_tokens()
    sim.reset_counters()
    start = threading.Barrier(16)

    def upload(i: int) -> UploadResult:
        start.wait()
        return c.upload(record(lsh=f"MZ{i:04d}", type="2", leaveDate=None), lsh=f"MZ{i:04d}")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(upload, range(16)))
    c.close()
    assert all(r.created for r in results)
    assert sim.counters["logins"] == 1
    assert len(sim.records) == 16


def test_a_kicked_token_recovers_with_exactly_one_login(sim: Simulator, client: Client) -> None:
    client.lookup(TEST_IDS[0])
    sim.reset_counters()
    sim.kick()
    assert client.lookup(TEST_IDS[1]).person is not None
    assert sim.counters["logins"] == 1
    assert client.counters["auth_retries"] == 1


def test_a_token_refused_twice_is_an_auth_error(sim: Simulator) -> None:
    # A token store that keeps handing out a token the platform does not know.
    class Stuck(MemoryTokenStore):
        def renew(self, stale: str | None, login: Any) -> Token:
            now = datetime.now(UTC)
            return Token(value="never-valid", obtained_at=now, expires_at=now + timedelta(hours=1))

    with Client(settings(sim), Stuck()) as c, pytest.raises(AuthError):
        c.lookup(TEST_IDS[0])


@pytest.mark.parametrize(
    ("change", "fix"),
    [
        ({"app_key": "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMQnkRMriK2hsKxFZnu5O5152ITG7Eia"}, "正式环境使用医院下发的 app_key"),
        ({"password": "wrong-password"}, "upstream.password"),
        ({"env": "prod"}, "ehrkey"),
        ({"event_codes": EventCodes(login="2af82deac11d4670977580bcc01aaa94")}, "event_code"),
        ({"base_url": "{url}/some/prefix"}, "base_url"),
    ],
)
def test_configuration_errors_surface_with_the_fix(sim: Simulator, change: dict[str, Any], fix: str) -> None:
    if "base_url" in change:
        change = {"base_url": change["base_url"].format(url=sim.url)}
    with Client(settings(sim, **change), MemoryTokenStore()) as c, pytest.raises(ConfigError) as caught:
        c.lookup(TEST_IDS[0])
    assert fix in caught.value.hint


def test_revoked_app_key_is_a_configuration_error(sim: Simulator, client: Client) -> None:
    client.lookup(TEST_IDS[0])
    sim.faults.app_key_revoked = True
    with pytest.raises(ConfigError) as caught:
        client.upload(record(), lsh="ZY2024000001")
    # Refused in the reading that worked, then once in the other (upstream.app_key_form: auto).
    said = caught.value.platform_message or ""
    assert said.count("没找到该appKey对应的权限记录,或是该权限记录已被停用") == 2
    assert "as_printed" in said and "decoded" in said
    assert "测试环境使用测试 app_key" in caught.value.hint
    assert sim.records == {}


def test_a_bad_record_is_invalid_with_the_platforms_field_messages(sim: Simulator, client: Client) -> None:
    with pytest.raises(InvalidRecord) as caught:
        client.upload(record(type="", totalFee=-1), lsh="ZY2024000009")
    assert "诊疗类型不能为空！" in caught.value.violations
    assert "总费用不能为负数！" in caught.value.violations
    assert caught.value.lsh == "ZY2024000009"
    assert "ZY2024000009" not in sim.records


@pytest.mark.parametrize("fault", ["next_504", "next_reset"])
def test_gateway_timeouts_and_resets_are_transient(sim: Simulator, client: Client, fault: str) -> None:
    client.lookup(TEST_IDS[0])
    setattr(sim.faults, fault, 1)
    with pytest.raises(TransientError) as caught:
        client.upload(record(), lsh="ZY2024000001")
    assert not caught.value.generic
    assert client.upload(record(), lsh="ZY2024000001").created


def test_platform_down_is_transient(sim: Simulator, client: Client) -> None:
    sim.faults.down = True
    with pytest.raises(TransientError) as caught:
        client.lookup(TEST_IDS[0])
    assert caught.value.http_status == 503


def test_a_lost_answer_after_commit_is_retried_without_duplicating(sim: Simulator, client: Client) -> None:
    sim.faults.next_commit_then_reset = 1
    with pytest.raises(TransientError):
        client.upload(record(), lsh="ZY2024000001")
    assert "ZY2024000001" in sim.records
    again = client.upload(record(), lsh="ZY2024000001")  # as the outbox would, later
    assert again.message == "修改成功"
    assert list(sim.records) == ["ZY2024000001"]
    assert (sim.counters["creates"], sim.counters["updates"]) == (1, 1)


def test_a_trickling_server_is_cut_at_the_deadline(sim: Simulator) -> None:
    with Client(settings(sim, timeout_s=1.5), MemoryTokenStore()) as c:
        sim.faults.trickle_s = 0.2
        began = time.monotonic()
        with pytest.raises(TransientError) as caught:
            c.lookup(TEST_IDS[0])
        elapsed = time.monotonic() - began
        sim.faults.trickle_s = 0.0
    assert elapsed < 1.5 + 1.0
    assert "timeout_s" in caught.value.message


def test_clock_skew_is_measured_and_warned(log_text: io.StringIO) -> None:
    config = SimConfig(clock=lambda: time.time() + 600)
    with Simulator(config) as skewed, Client(settings(skewed), MemoryTokenStore()) as c:
        # The platform refuses our time stamp as 10 minutes off: FAQ 12.
        with pytest.raises(ConfigError) as caught:
            c.lookup(TEST_IDS[0])
        assert "clock" in caught.value.hint
        skew = c.clock_skew_s()
        assert skew is not None
        assert 595 < skew < 605
        with pytest.raises(ConfigError):
            c.lookup(TEST_IDS[0])
    warnings = [line for line in log_text.getvalue().splitlines() if '"clock_skew"' in line]
    assert len(warnings) == 1  # not once per request
    assert "未经授权" in warnings[0]


@pytest.mark.parametrize("kind", ["as_printed", "decoded"])
def test_no_secret_reaches_the_logs(log_text: io.StringIO, kind: str) -> None:
    with Simulator(SimConfig(key_form=kind)) as sim:
        _log_everything_against(sim, log_text)


def _log_everything_against(sim: Simulator, log_text: io.StringIO) -> None:
    store = MemoryTokenStore()
    tokens: set[str] = set()
    with Client(settings(sim), store) as c:
        c.lookup(TEST_IDS[0])
        tokens.add(store.current().value)  # type: ignore[union-attr]
        sim.kick()
        c.upload(record(), lsh="ZY2024000001")
        tokens.add(store.current().value)  # type: ignore[union-attr]
        with pytest.raises(InvalidRecord):
            c.upload(record(cardNo=TEST_IDS[1], totalFee=-5), lsh="ZY2024000002")
        sim.faults.next_reset = 1
        with pytest.raises(TransientError):
            c.lookup(TEST_IDS[2])
    text = log_text.getvalue()
    assert "login_succeeded" in text
    assert "label_lookup" in text
    assert "record_uploaded" in text
    assert "upstream_error" in text
    if sim.config.key_form == "decoded":
        assert "app_key_form_refused" in text  # as printed was tried first
    secrets = {TEST_PASSWORD, TEST_APP_KEY, TEST_APP_KEY_ENCODED, TEST_APP_KEY_ENCODED.replace("%", "%25"), *tokens}
    secrets |= {r.raw_query.split("hie_secret=")[1] for r in sim.requests_log}
    for secret in secrets:
        assert secret not in text
    for id_number in TEST_IDS:
        assert id_number not in text
    assert "510100********0036" in text
