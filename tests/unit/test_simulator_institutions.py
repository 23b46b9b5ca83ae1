"""Several institutions on one simulated platform, as the interface document ties them.

"每个对接机构都有自己的hie_app_key"; an account belongs to one institution and FAQ 14
("AppKey与机构id不匹配，请核实。") answers a key and an account of different ones; and
``lsh`` is "只能保证院内唯一", so two institutions' equal lsh are two records.

Requests are built by hand (the helpers of test_simulator: http.client, MD5 from the
document's formula computed with hashlib), so these tests check the simulator against
the document, not against the client.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from sync.upstream.simulator import (
    TEST_APP_KEY,
    TEST_APP_KEY_ENCODED,
    TEST_IDS,
    TEST_PASSWORD,
    TEST_USERNAME,
    Institution,
    SimConfig,
    Simulator,
    demo_member,
    generated_app_key,
    main,
)
from tests.unit.test_simulator import APP_KEY_KICK, KICKED, LOGIN, RYBQ, UPLOAD, Remote, _dumps, call, visit

FAQ14 = "AppKey与机构id不匹配，请核实。"
HOME = "510115"  # the orgId of the document's login example: the test account's institution
# A second member of the alliance: its own key (base64 text, with + / = so both readings differ) and account.
MEMBER = "510115002"
MEMBER_KEY = "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAN+member/two+own+key/Qz9WkCAwEAAQ=="
MEMBER_USER = "wj-wanchun"
MEMBER_PASSWORD = "Wanchun2024@"


def on_wire(key: str, key_form: str = "as_printed") -> str:
    """The key as the platform reads (and signs) it in hie_app_key: the printed text, or the base64 text."""
    return urllib.parse.quote(key, safe="") if key_form == "as_printed" else key


def login_answer(sim: Simulator | Remote, username: str, password: str, key: str) -> Any:
    return call(sim, "POST", LOGIN, body={"username": username, "password": password}, app_key=key).json()


def login_as(sim: Simulator | Remote, username: str, password: str, key: str) -> str:
    answer = login_answer(sim, username, password, key)
    assert answer["code"] == 200, answer
    return str(answer["data"]["token"])


def upload_as(sim: Simulator | Remote, token: str, key: str, record: dict[str, Any]) -> Any:
    return call(sim, "POST", UPLOAD, raw_body=_dumps(record), token=token, app_key=key).json()


@pytest.fixture
def alliance() -> Iterator[Simulator]:
    """The document's test institution and one more member, each with its own key and account."""
    member = Institution(
        code=MEMBER,
        name="温江区万春镇卫生院",
        county_code="510115",
        county_name="温江区",
        app_key=MEMBER_KEY,
        accounts={MEMBER_USER: MEMBER_PASSWORD},
    )
    with Simulator(SimConfig(other_institutions=[member])) as s:
        yield s


# --- records per institution -------------------------------------------------------------------


def test_two_institutions_with_the_same_lsh_are_two_records(alliance: Simulator) -> None:
    sim = alliance
    home_key, member_key = on_wire(TEST_APP_KEY), on_wire(MEMBER_KEY)
    home_login = login_answer(sim, TEST_USERNAME, TEST_PASSWORD, home_key)
    member_login = login_answer(sim, MEMBER_USER, MEMBER_PASSWORD, member_key)
    # Each login answers with the account's own institution; the home one exactly as the document's example.
    assert (home_login["data"]["orgId"], home_login["data"]["orgName"]) == (HOME, "温江区卫健局")
    assert (member_login["data"]["orgId"], member_login["data"]["orgName"]) == (MEMBER, "温江区万春镇卫生院")
    home, member = home_login["data"]["token"], member_login["data"]["token"]

    # The same lsh, two different visits of two hospitals: each is new to its own institution.
    assert upload_as(sim, home, home_key, visit(lsh="MZ0001", cardNo=TEST_IDS[0]))["data"] == "新增成功"
    assert upload_as(sim, member, member_key, visit(lsh="MZ0001", cardNo=TEST_IDS[1]))["data"] == "新增成功"
    assert sim.records["MZ0001"]["cardNo"] == TEST_IDS[0]
    assert sim.records_of(HOME) is sim.records
    assert sim.records_of(MEMBER)["MZ0001"]["cardNo"] == TEST_IDS[1]

    # A second upload of that lsh by the same institution overwrites its own record only.
    again = upload_as(sim, member, member_key, visit(lsh="MZ0001", cardNo=TEST_IDS[1], totalPrepayment=Decimal("500.00")))
    assert again == {"code": 200, "data": "修改成功", "message": None}
    assert sim.records_of(MEMBER)["MZ0001"]["totalPrepayment"] == Decimal("500.00")
    assert sim.records["MZ0001"]["totalPrepayment"] == 0
    assert set(sim.all_records()) == {(HOME, "MZ0001"), (MEMBER, "MZ0001")}

    assert (sim.counters["creates"], sim.counters["updates"]) == (2, 1)
    assert (sim.counters_of(HOME)["creates"], sim.counters_of(HOME)["updates"]) == (1, 0)
    assert (sim.counters_of(MEMBER)["creates"], sim.counters_of(MEMBER)["updates"]) == (1, 1)
    assert sim.counters_of(MEMBER)["logins"] == 1 and sim.counters["logins"] == 2


def test_labels_are_the_provinces_whichever_institution_asks(alliance: Simulator) -> None:
    member_key = on_wire(MEMBER_KEY)
    token = login_as(alliance, MEMBER_USER, MEMBER_PASSWORD, member_key)
    person = call(alliance, "GET", RYBQ + TEST_IDS[0], token=token, app_key=member_key).json()
    assert person["data"]["xm"] == "李四"
    assert alliance.counters_of(MEMBER)["lookups"] == 1 and alliance.counters_of(HOME)["lookups"] == 0


# --- FAQ 14 ------------------------------------------------------------------------------------


def test_faq14_at_login_when_the_key_is_another_institutions(alliance: Simulator) -> None:
    sim = alliance
    home_key, member_key = on_wire(TEST_APP_KEY), on_wire(MEMBER_KEY)
    member_token = login_as(sim, MEMBER_USER, MEMBER_PASSWORD, member_key)

    for username, password, key in ((MEMBER_USER, MEMBER_PASSWORD, home_key), (TEST_USERNAME, TEST_PASSWORD, member_key)):
        answer = login_answer(sim, username, password, key)
        assert (answer["code"], answer["data"], answer["message"], answer["success"]) == (500, None, FAQ14, False)
    assert sim.counters["key_mismatches"] == 2
    assert sim.counters["logins"] == 1  # the member's own, before
    # A refused login issues no token and pushes nobody out (FAQ 4 needs a login that succeeds).
    assert sim.issued_tokens() == 1
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=member_token, app_key=member_key).json()["code"] == 200

    # The credentials come first: a wrong password under another institution's key says so, not FAQ 14.
    answer = login_answer(sim, MEMBER_USER, "Wrong2024@", home_key)
    assert answer["message"] == "用户不存在或密码错误"
    # The key comes before everything: a key no institution has is FAQ 1 whatever the account.
    answer = login_answer(sim, MEMBER_USER, MEMBER_PASSWORD, on_wire("MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAN+nobody/s=="))
    assert answer["message"] == APP_KEY_KICK
    # FAQ 14 before the first-login password change (FAQ 11): the key is the thing to fix first.
    sim.config.password_change = {MEMBER_USER}
    assert login_answer(sim, MEMBER_USER, MEMBER_PASSWORD, home_key)["message"] == FAQ14
    assert "修改密码" in login_answer(sim, MEMBER_USER, MEMBER_PASSWORD, member_key)["message"]


def test_faq14_on_labels_and_upload_with_a_token_of_another_institutions_account(alliance: Simulator) -> None:
    sim = alliance
    home_key, member_key = on_wire(TEST_APP_KEY), on_wire(MEMBER_KEY)
    member = login_as(sim, MEMBER_USER, MEMBER_PASSWORD, member_key)
    home = login_as(sim, TEST_USERNAME, TEST_PASSWORD, home_key)

    for token, key in ((member, home_key), (home, member_key)):
        answer = call(sim, "GET", RYBQ + TEST_IDS[0], token=token, app_key=key).json()
        assert (answer["code"], answer["data"], answer["message"]) == (500, None, FAQ14)
        answer = upload_as(sim, token, key, visit(lsh="ZY9"))
        assert (answer["code"], answer["data"], answer["message"]) == (500, None, FAQ14)
    assert sim.all_records() == {}
    assert (sim.counters["lookups"], sim.counters["uploads"], sim.counters["key_mismatches"]) == (0, 0, 4)

    # The token is checked before: a token that is no good says so whatever the key.
    answer = call(sim, "GET", RYBQ + TEST_IDS[0], token="deadbeef", app_key=home_key).json()
    assert answer["message"] == "登录过期或未登录"
    # With their own keys both go on.
    assert upload_as(sim, member, member_key, visit(lsh="ZY9"))["data"] == "新增成功"
    assert upload_as(sim, home, home_key, visit(lsh="ZY9"))["data"] == "新增成功"


# --- revoked keys, kick-outs -----------------------------------------------------------------


def test_one_institutions_revoked_key_refuses_only_it(alliance: Simulator) -> None:
    sim = alliance
    home_key, member_key = on_wire(TEST_APP_KEY), on_wire(MEMBER_KEY)
    member = login_as(sim, MEMBER_USER, MEMBER_PASSWORD, member_key)

    sim.faults.app_key_revoked_for = {MEMBER}
    assert login_answer(sim, MEMBER_USER, MEMBER_PASSWORD, member_key)["message"] == APP_KEY_KICK
    assert upload_as(sim, member, member_key, visit())["message"] == APP_KEY_KICK
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=member, app_key=member_key).json()["message"] == APP_KEY_KICK
    assert sim.counters_of(MEMBER)["gateway_rejections"] == 3
    # The other institution goes on.
    home = login_as(sim, TEST_USERNAME, TEST_PASSWORD, home_key)
    assert upload_as(sim, home, home_key, visit())["data"] == "新增成功"
    assert sim.records_of(MEMBER) == {}

    # Restored: the member's earlier token works again (the key was refused, not the session).
    sim.faults.app_key_revoked_for.clear()
    assert upload_as(sim, member, member_key, visit())["data"] == "新增成功"
    # The global fault still refuses every institution's key.
    sim.faults.app_key_revoked = True
    assert upload_as(sim, home, home_key, visit())["message"] == APP_KEY_KICK
    assert upload_as(sim, member, member_key, visit())["message"] == APP_KEY_KICK
    sim.faults.clear()
    assert sim.faults.app_key_revoked_for == set()
    assert upload_as(sim, home, home_key, visit())["data"] == "修改成功"


def test_kick_outs_are_per_account(alliance: Simulator) -> None:
    sim = alliance
    home_key, member_key = on_wire(TEST_APP_KEY), on_wire(MEMBER_KEY)
    home = login_as(sim, TEST_USERNAME, TEST_PASSWORD, home_key)
    member_first = login_as(sim, MEMBER_USER, MEMBER_PASSWORD, member_key)
    # Another account's login pushes nobody out.
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=home, app_key=home_key).json()["code"] == 200
    assert sim.issued_tokens() == 2
    assert (sim.issued_tokens(HOME), sim.issued_tokens(MEMBER)) == (1, 1)

    # The member logs in again: only its own earlier token is pushed out (FAQ 4).
    member_second = login_as(sim, MEMBER_USER, MEMBER_PASSWORD, member_key)
    answer = call(sim, "GET", RYBQ + TEST_IDS[0], token=member_first, app_key=member_key).json()
    assert answer["code"] == 401 and KICKED.match(answer["message"]), answer
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=home, app_key=home_key).json()["code"] == 200
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=member_second, app_key=member_key).json()["code"] == 200

    # kick() and revoke_tokens() can aim at one account or one institution.
    sim.kick(MEMBER_USER)
    assert KICKED.match(call(sim, "GET", RYBQ + TEST_IDS[0], token=member_second, app_key=member_key).json()["message"])
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=home, app_key=home_key).json()["code"] == 200
    member_third = login_as(sim, MEMBER_USER, MEMBER_PASSWORD, member_key)
    sim.revoke_tokens(HOME)
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=home, app_key=home_key).json()["message"] == "登录过期或未登录"
    assert call(sim, "GET", RYBQ + TEST_IDS[0], token=member_third, app_key=member_key).json()["code"] == 200


# --- the API for more institutions -------------------------------------------------------------


def test_add_institution_while_running_with_a_generated_key_and_account() -> None:
    with Simulator(SimConfig(key_form="decoded")) as sim:
        added = sim.add_institution("510115009", name="温江区和盛镇卫生院")
        assert [i.code for i in sim.institutions()] == [HOME, "510115009"]
        assert sim.institution("510115009") is added
        # Shaped like the document's key (512-bit RSA SubjectPublicKeyInfo), and its own.
        der = base64.b64decode(added.app_key, validate=True)
        assert len(der) == 94 and der[:25] == base64.b64decode(TEST_APP_KEY)[:25] and der[-5:] == b"\x02\x03\x01\x00\x01"
        assert added.app_key != TEST_APP_KEY and added.app_key == generated_app_key("510115009")
        assert sim.known_app_key("510115009") == added.app_key  # decoded reading: the base64 text

        ((username, password),) = added.accounts.items()
        assert "*" not in password  # FAQ 5
        token = login_as(sim, username, password, on_wire(added.app_key, "decoded"))
        answer = upload_as(sim, token, on_wire(added.app_key, "decoded"), visit())
        assert answer["data"] == "新增成功"
        assert set(sim.all_records()) == {("510115009", "ZY2024000123")}
        assert sim.records == {}

        # Given, not generated; a printed key is taken as its base64 text.
        given = sim.add_institution("510115010", app_key=urllib.parse.quote(MEMBER_KEY, safe=""), username="u10", password="P10@pass")
        assert given.app_key == MEMBER_KEY and given.accounts == {"u10": "P10@pass"}
        assert login_answer(sim, "u10", "P10@pass", on_wire(MEMBER_KEY, "decoded"))["data"]["orgId"] == "510115010"

        # Each institution its own code, key and accounts.
        for kw, said in (
            ({"code": HOME}, "two institutions have the code"),
            ({"code": "X1", "app_key": TEST_APP_KEY_ENCODED}, "shares its app key"),
            ({"code": "X2", "username": TEST_USERNAME}, "shares accounts"),
        ):
            with pytest.raises(ValueError, match=said):
                sim.add_institution(**kw)
        assert len(sim.institutions()) == 3  # nothing refused was added
        with pytest.raises(KeyError):
            sim.records_of("nowhere")
    with pytest.raises(ValueError, match="two institutions have the code"):
        Simulator(SimConfig(other_institutions=[demo_member(2), demo_member(2)]))


def test_demo_members_are_the_same_every_time() -> None:
    assert demo_member(2) == demo_member(2)
    assert demo_member(2).app_key != demo_member(3).app_key
    assert demo_member(2).code == "510115002" and demo_member(2).county_code == "510115"
    with pytest.raises(ValueError, match="numbered from 2"):
        demo_member(1)


def test_command_line_plays_several_institutions() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync.upstream.simulator", "--port", "0", "--institutions", "3"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        banner: list[str] = []
        while not banner or "Ctrl-C" not in banner[-1]:
            line = proc.stdout.readline()
            assert line, banner
            banner.append(line.rstrip("\n"))
        url = re.search(r"http://127\.0\.0\.1:\d+", banner[0])
        assert url, banner[0]
        text = "\n".join(banner)
        assert "  institutions:" in text and "3 institutions" in text

        # Each entry as settings.yaml takes it: code, name, county_code, app_key (printed), username, password.
        entries: list[dict[str, str]] = []
        for line in banner:
            m = re.match(r"^ {4}(?:- | {2})(code|name|county_code|app_key|username|password): (.*)$", line)
            if m:
                if m.group(1) == "code":
                    entries.append({})
                entries[-1][m.group(1)] = json.loads(m.group(2))
        assert [e["code"] for e in entries] == [HOME, "510115002", "510115003"]
        assert entries[0]["app_key"] == TEST_APP_KEY_ENCODED and entries[0]["username"] == TEST_USERNAME
        assert len({e["app_key"] for e in entries}) == 3 and len({e["username"] for e in entries}) == 3

        # Every member logs in with its own settings, and the same lsh is new to each.
        remote = Remote(url=url.group(0), config=SimConfig())
        for e in entries:
            answer = login_answer(remote, e["username"], e["password"], e["app_key"])
            assert answer["data"]["orgId"] == e["code"]
            assert upload_as(remote, answer["data"]["token"], e["app_key"], visit())["data"] == "新增成功"
        wrong = login_answer(remote, entries[1]["username"], entries[1]["password"], entries[2]["app_key"])
        assert wrong["message"] == FAQ14

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_line_refuses_no_institutions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--institutions", "0"])
    assert exit_.value.code == 2
    assert "--institutions" in capsys.readouterr().err
