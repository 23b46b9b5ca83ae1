"""Log lines never carry a secret or a whole ID number, whoever writes them."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import structlog

from sync.logs import configure, is_journal, mask_id, priority, redact, register_secret, with_priority

ID18 = "510100198506020036"
ID18_MASKED = "510100********0036"
ID18X = "51010019850602003X"
ID15 = "510100850602003"
ID15_MASKED = "510100*****2003"

# Values unique to this module: the secret registry is process-wide.
PASSWORD = "Lg!n-pw*7731"
APP_KEY = "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMQnkRMriK2hsKxFZnu5O5152ITG7Eia+T6Irh8Idw/V3AS7Qt2M7a=="
TOKEN = "tok-3f9c1d2e8a7b4c5d"
HIE_SECRET = "0123456789abcdef0123456789abcdef"
DB_PASSWORD = "Db-pa55-9921"


@pytest.fixture(autouse=True)
def _secrets() -> None:
    register_secret(PASSWORD, APP_KEY, TOKEN, DB_PASSWORD)


# --- redact ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ID18, ID18_MASKED),
        (ID18X, "510100********003X"),
        ("51010019850602003x", "510100********003x"),
        (ID15, ID15_MASKED),
        (f"cardNo={ID18}&type=1", f"cardNo={ID18_MASKED}&type=1"),
        (f'{{"cardNo": "{ID18}"}}', f'{{"cardNo": "{ID18_MASKED}"}}'),
        (f"/api/ehr/rybq/{ID18}?hie_event_code=x", f"/api/ehr/rybq/{ID18_MASKED}?hie_event_code=x"),
        (f"患者{ID18}已上传", f"患者{ID18_MASKED}已上传"),
        (f"('{ID18}', '{ID15}')", f"('{ID18_MASKED}', '{ID15_MASKED}')"),
    ],
)
def test_id_numbers_keep_first_six_and_last_four(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "hie_time_stamp=1721266147694",  # 13-digit millisecond time stamp
        "hie_event_code=a7a87688f52e4100ab33a2514ec1971f",  # 32-hex event code
        "md5 123456789012345678abcdef01234567",  # 32 hex starting with 18 digits
        "md5 abcdef012345678901234567890abcde",
        "order 5101001985060200361 and 51010019850602",  # 19 and 14 digits
        "lsh ZY2024060100012 fee 123456.78 visits 4521",
        "unixtime 1721266147 and 2024-07-18T09:29:07",
        "",
    ],
)
def test_ordinary_numbers_are_left_alone(text: str) -> None:
    assert redact(text) == text


def test_hie_secret_is_removed_although_it_is_not_an_id() -> None:
    out = redact(f"hie_event_code=x&hie_time_stamp=1721266147694&hie_secret={HIE_SECRET}")
    assert HIE_SECRET not in out
    assert "hie_secret=[secret]" in out
    assert "hie_time_stamp=1721266147694" in out  # useful when the platform says the clock is off


def test_registered_secrets_are_removed_plain_and_percent_encoded() -> None:
    for form in (PASSWORD, APP_KEY, quote(APP_KEY, safe=""), quote(PASSWORD, safe=""), TOKEN):
        out = redact(f"before {form} after")
        assert out == "before [secret] after"


def test_a_key_registered_percent_encoded_is_also_removed_decoded() -> None:
    encoded = "QmFzZTY0S2V5%2Bwith%2Fslash%3D%3D"
    register_secret(encoded)
    assert redact("key QmFzZTY0S2V5+with/slash== end") == "key [secret] end"
    assert redact(f"key {encoded} end") == "key [secret] end"


def test_short_values_are_not_registered() -> None:
    register_secret("ab1", "", None)
    assert redact("tab1e ab1") == "tab1e ab1"


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("POST /login?hie_app_key=Zm9vYmFy%2B1&hie_secret=abc123 HTTP/1.1", "Zm9vYmFy"),
        ("GET /x?hie_secret=abc123def&hie_event_code=e", "abc123def"),
        ('{"username": "ceshi-rybq", "password": "Ehr1 23456@"}', "Ehr1 23456@"),
        ("{'password': 'Ehr123456@', 'x': 1}", "Ehr123456@"),
        ('{"code":200,"data":{"token":"eyJhbGciOi.xyz"},"success":true}', "eyJhbGciOi"),
        ("{'accesstoken': 'abc-token-1', 'ehrkey': 'ehr#health@check'}", "abc-token-1"),
        ("accesstoken: abc-token-2\r\nContent-Type: application/json", "abc-token-2"),
        ("password=Hunter2x&username=u", "Hunter2x"),
        ("mysql+pymysql://reader:s3cr%40t@10.0.0.5/his", "s3cr%40t"),
        ("oracle+oracledb://his:OraPw_1@10.0.0.6:1521/?service_name=orcl", "OraPw_1"),
        ("postgresql://:pgpw99@db/x", "pgpw99"),
    ],
)
def test_credential_parameters_and_url_passwords_are_removed(text: str, leak: str) -> None:
    out = redact(text)
    assert leak not in out
    assert "[secret]" in out


def test_configuration_messages_keep_their_wording() -> None:
    # Operator-facing problems name the key followed by a colon; they are not secrets.
    for text in (
        "upstream.password: environment variable X is not set",
        "password_file=/run/creds/pw",
        "token_ttl_h=12",
    ):
        assert redact(text) == text


def test_redaction_is_stable_when_applied_twice() -> None:
    text = f"GET /rybq/{ID18}?hie_app_key=K%2B1&hie_secret={HIE_SECRET} mysql://u:{DB_PASSWORD}@h {PASSWORD}"
    once = redact(text)
    assert redact(once) == once


def test_mask_id_masks_any_document_number() -> None:
    assert mask_id(ID18) == ID18_MASKED
    assert mask_id(f" {ID15} ") == ID15_MASKED
    assert mask_id("E12345678") == "*********"
    assert mask_id("") == ""


# --- end to end: what reaches the log stream ---------------------------------------------

URLLIB3_FORMAT = '%s://%s:%s "%s %s %s" %s %s'
SIGNED_PATH = (
    "/adapter/http/ehrc/v1.0/api/crowd/medical/record/insertOrUpdate?hie_event_code=a7a87688f52e4100ab33a2514ec1971f"
    f"&hie_app_key={quote(APP_KEY, safe='')}&hie_time_stamp=1721266147694&hie_secret={HIE_SECRET}"
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libs = {name: logging.getLogger(name).level for name in ("urllib3", "sqlalchemy", "apscheduler", "alembic")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in libs.items():
        logging.getLogger(name).setLevel(lvl)
    structlog.configure(**saved)


def emit_everything() -> None:
    log = structlog.get_logger("sync.pipeline")
    log.info("record_sent", lsh="ZY0001", card_no=ID18, url=f"http://h{SIGNED_PATH}")
    log.debug("login_request", body={"username": "ceshi-rybq", "password": PASSWORD}, headers={"accesstoken": TOKEN})
    try:
        raise RuntimeError(f"login refused for password {PASSWORD} and id {ID18}")
    except RuntimeError:
        log.exception("login_failed")
    log.warning("upload_failed", error=ValueError(f"token {TOKEN} rejected"))
    logging.getLogger("urllib3.connectionpool").debug(
        URLLIB3_FORMAT, "http", "183.220.195.216", 9080, "POST", SIGNED_PATH, "HTTP/1.1", 200, None
    )
    logging.getLogger("sqlalchemy.engine.Engine").info(
        "[cached since 0.1s ago] %s", (ID18, "ZY0001", f"mysql+pymysql://reader:{DB_PASSWORD}@10.0.0.5/his")
    )
    try:
        raise ConnectionError(f"cannot reach mysql+pymysql://reader:{DB_PASSWORD}@10.0.0.5/his for {ID15}")
    except ConnectionError:
        logging.getLogger("x").exception("query failed for %s", ID18X)


def assert_nothing_leaks(out: str) -> None:
    for secret in (PASSWORD, APP_KEY, quote(APP_KEY, safe=""), TOKEN, HIE_SECRET, DB_PASSWORD, ID18, ID15, ID18X):
        assert secret not in out


def test_json_lines_carry_no_secret_and_no_whole_id(restore_logging: None) -> None:
    buf = io.StringIO()
    configure(level="debug", fmt="json", stream=buf)
    emit_everything()

    out = buf.getvalue()
    assert_nothing_leaks(out)
    lines = [json.loads(line) for line in out.splitlines()]
    by_event = {line["event"]: line for line in lines}

    sent = by_event["record_sent"]
    assert sent["card_no"] == ID18_MASKED
    assert sent["lsh"] == "ZY0001"
    assert sent["level"] == "info"
    assert sent["logger"] == "sync.pipeline"
    assert "hie_event_code=a7a87688f52e4100ab33a2514ec1971f" in sent["url"]

    failed = by_event["login_failed"]
    assert failed["level"] == "error"
    assert "Traceback" in failed["exception"]
    assert "RuntimeError: login refused for password [secret]" in failed["exception"]
    assert ID18_MASKED in failed["exception"]

    assert by_event["upload_failed"]["error"] == "ValueError: token [secret] rejected"

    urllib3_line = next(line for line in lines if line["logger"] == "urllib3.connectionpool")
    assert "POST /adapter/http/ehrc/v1.0/api/crowd/medical/record/insertOrUpdate?" in urllib3_line["event"]
    assert '" 200 None' in urllib3_line["event"]

    sql_line = next(line for line in lines if line["logger"] == "sqlalchemy.engine.Engine")
    assert ID18_MASKED in sql_line["event"]

    stdlib_exc = next(line for line in lines if line["logger"] == "x")
    assert stdlib_exc["event"] == "query failed for 510100********003X"
    assert "ConnectionError: cannot reach mysql+pymysql://reader:[secret]@10.0.0.5/his" in stdlib_exc["exception"]
    assert ID15_MASKED in stdlib_exc["exception"]


def test_console_lines_carry_no_secret_and_no_whole_id(restore_logging: None) -> None:
    buf = io.StringIO()
    configure(level="debug", fmt="console", stream=buf)
    emit_everything()

    out = buf.getvalue()
    assert_nothing_leaks(out)
    assert "record_sent" in out
    assert ID18_MASKED in out
    assert "RuntimeError: login refused for password [secret]" in out
    assert "ConnectionError: cannot reach" in out
    assert "hie_secret=[secret]" in out


def test_configure_twice_writes_each_line_once(restore_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure(level="info", fmt="json", stream=first)
    configure(level="info", fmt="json", stream=second)
    structlog.get_logger("sync.cli").info("run_started")
    logging.getLogger("sync.other").warning("plain_line")

    assert first.getvalue() == ""
    assert [json.loads(line)["event"] for line in second.getvalue().splitlines()] == ["run_started", "plain_line"]


def test_info_level_hides_debug_and_library_chatter(restore_logging: None) -> None:
    buf = io.StringIO()
    configure(level="info", fmt="json", stream=buf)
    structlog.get_logger("sync.pipeline").debug("noisy_detail")
    logging.getLogger("urllib3.connectionpool").info("Starting new HTTP connection (1): 183.220.195.216:9080")
    structlog.get_logger("sync.pipeline").info("cycle_finished", sent=3)

    events = [json.loads(line)["event"] for line in buf.getvalue().splitlines()]
    assert events == ["cycle_finished"]


def test_a_library_line_with_a_broken_format_is_kept_and_redacted(restore_logging: None) -> None:
    # Only our handler: the test runner's own log capture would report the broken format itself.
    logging.getLogger().handlers.clear()
    buf = io.StringIO()
    configure(level="info", fmt="json", stream=buf)
    logging.getLogger("apscheduler.scheduler").warning(f"job for {ID18} failed: %s %s", "only one")

    line = json.loads(buf.getvalue())
    assert line["event"].startswith(f"job for {ID18_MASKED} failed: %s %s")
    assert line["level"] == "warning"


# --- journald priorities ------------------------------------------------------------------


def test_priority_prefix_on_every_line_tracebacks_included_still_redacted(restore_logging: None) -> None:
    buf = io.StringIO()
    configure(level="debug", fmt="console", stream=buf, priority_prefix=True)
    log = structlog.get_logger("sync.pipeline")
    log.debug("detail")
    log.info("cycle_finished", sent=3)
    log.warning("record_failed", lsh="A")
    logging.getLogger("urllib3.connectionpool").warning("Retrying with password=%s", PASSWORD)
    try:
        raise RuntimeError(f"login failed for {ID18} with {PASSWORD}")
    except RuntimeError:
        log.exception("upload_crashed")

    lines = buf.getvalue().splitlines()
    assert len(lines) > 5  # the traceback spans several lines, each its own journal entry
    assert [line[:3] for line in lines[:4]] == ["<7>", "<6>", "<4>", "<4>"]
    assert all(line.startswith("<3>") for line in lines[4:]), lines[4:]
    text = buf.getvalue()
    assert PASSWORD not in text and ID18 not in text and ID18_MASKED in text


def test_priority_prefix_auto_follows_journal_stream(
    restore_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "journal").open("w", encoding="utf-8") as journal, (tmp_path / "other").open("w") as other:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert is_journal(journal) and not is_journal(other) and not is_journal(io.StringIO())
        configure(level="info", fmt="json", stream=journal)
        structlog.get_logger("sync.cli").error("bad_settings")
        configure(level="info", fmt="json", stream=other)
        structlog.get_logger("sync.cli").error("bad_settings")
        configure(level="info", fmt="json", stream=journal, priority_prefix=False)
        structlog.get_logger("sync.cli").error("not_prefixed")
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not is_journal(journal)
    lines = (tmp_path / "journal").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith('<3>{"event": "bad_settings"') and lines[1].startswith('{"event": "not_prefixed"')
    assert (tmp_path / "other").read_text(encoding="utf-8").startswith('{"event": "bad_settings"')


def test_syslog_priorities_of_each_level() -> None:
    assert [priority(n) for n in ("critical", "error", "warning", "info", "debug")] == [2, 3, 4, 6, 7]
    assert with_priority("one\ntwo", logging.WARNING) == "<4>one\n<4>two"
