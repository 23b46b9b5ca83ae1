"""The common query parameters, checked against the document's formula (2.2), in both
readings of the app key: decoded (MD5 over the base64 text, %2B on the wire) and as
printed (MD5 over the printed text, %252B on the wire)."""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qsl

import pytest

from sync.errors import ConfigError
from sync.settings import EventCodes
from sync.upstream.signing import (
    DOCUMENT_EVENT_CODES,
    EHRKEY_HEADER,
    ENDPOINTS,
    KEY_FORMS,
    SALT,
    app_key_texts,
    decode_app_key,
    event_code,
    hie_secret,
    other_form,
    platform_app_key,
    printed_app_key,
    signed_query,
)

# As printed in the document (percent-encoded) and as base64 text.
DOC_KEY = (
    "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMQnkRMriK2hsKxFZnu5O5152ITG7EiafzU8Sxj%2BT6Irh8IdwcV3AS7Qt2M7aIXHrnprb"
    "%2BpsxlkaMGdTeN7%2F8WkCAwEAAQ%3D%3D"
)
PLAIN_KEY = (
    "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMQnkRMriK2hsKxFZnu5O5152ITG7EiafzU8Sxj+T6Irh8IdwcV3AS7Qt2M7aIXHrnprb"
    "+psxlkaMGdTeN7/8WkCAwEAAQ=="
)
LABELS_TEST = "2af82deac11d4670977580bcc01aaa94"
LOGIN_CODE = "177cf201a6997f4ca0b8da298e31e3f1"
STAMP = 1721266147694  # the document's example: 2024-07-18 09:29:07


def test_both_key_forms_decode_to_the_base64_text() -> None:
    assert decode_app_key(DOC_KEY) == PLAIN_KEY
    assert decode_app_key(PLAIN_KEY) == PLAIN_KEY
    assert decode_app_key(f"  {DOC_KEY}\n") == PLAIN_KEY


def test_a_twice_encoded_key_is_decoded_only_once() -> None:
    twice = DOC_KEY.replace("%", "%25")
    assert decode_app_key(twice) == DOC_KEY  # still wrong, and the platform will say so


def test_known_answer_vector_follows_the_document_formula() -> None:
    expected = hashlib.md5(f"{LABELS_TEST}{PLAIN_KEY}{STAMP}{SALT}".encode()).hexdigest()
    got = hie_secret(LABELS_TEST, PLAIN_KEY, str(STAMP))
    assert got == expected
    assert got == "94a4d5765a5b89761f03c901828ea3fd"
    assert SALT == "HIE_ADAPTER_382d8d3b4e6bc62de8b984ac84acf492"


@pytest.mark.parametrize("given", [DOC_KEY, PLAIN_KEY])
def test_wire_query_carries_the_key_encoded_exactly_once(given: str) -> None:
    query = signed_query(LABELS_TEST, decode_app_key(given), STAMP)
    assert "%2B" in query
    assert "%2F" in query
    assert "%3D" in query
    assert "%25" not in query
    assert f"hie_app_key={DOC_KEY}&" in query
    # What a server sees after its one decoding: the base64 key and a secret it can recompute.
    params = dict(parse_qsl(query))
    assert params == {
        "hie_event_code": LABELS_TEST,
        "hie_app_key": PLAIN_KEY,
        "hie_time_stamp": str(STAMP),
        "hie_secret": "94a4d5765a5b89761f03c901828ea3fd",
    }


def test_event_codes_per_environment_and_overrides() -> None:
    assert event_code("test", "labels") == LABELS_TEST
    assert event_code("prod", "labels") == "8f6fa17d4dbf4b95bf1dfb01b0837345"
    assert event_code("test", "upload") == "a7a87688f52e4100ab33a2514ec1971f"
    assert event_code("prod", "upload") == "b60eb517bdcd4525958aebadeef76d63"
    # Login's code does not change between environments (document 2.3).
    assert event_code("test", "login") == event_code("prod", "login") == "177cf201a6997f4ca0b8da298e31e3f1"
    assert event_code("prod", "upload", EventCodes(upload="abc")) == "abc"
    assert event_code("prod", "labels", EventCodes(upload="abc")) == DOCUMENT_EVENT_CODES["prod"]["labels"]
    with pytest.raises(ConfigError):
        event_code("staging", "login")  # type: ignore[arg-type]


def test_endpoints_and_header_match_the_document() -> None:
    assert ENDPOINTS["login"].method == "POST"
    assert ENDPOINTS["labels"].method == "GET"
    assert ENDPOINTS["upload"].path == "/adapter/http/ehrc/v1.0/api/crowd/medical/record/insertOrUpdate"
    assert EHRKEY_HEADER == ("ehrkey", "ehr#health@check")


# --- the two readings of the app key ----------------------------------------------------------


@pytest.mark.parametrize("given", [DOC_KEY, PLAIN_KEY, f" {DOC_KEY}\n"])
def test_settings_may_hold_either_form_in_both_readings(given: str) -> None:
    assert printed_app_key(given) == DOC_KEY
    assert platform_app_key(given, "as_printed") == DOC_KEY
    assert platform_app_key(given, "decoded") == PLAIN_KEY


def test_known_answer_login_secret_as_printed() -> None:
    # MD5 over event code + the key exactly as the document prints it (%2B, %2F, %3D) + time stamp + salt.
    by_hand = hashlib.md5(
        b"177cf201a6997f4ca0b8da298e31e3f1"
        b"MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMQnkRMriK2hsKxFZnu5O5152ITG7EiafzU8Sxj%2BT6Irh8IdwcV3AS7Qt2M7aIXHrnprb"
        b"%2BpsxlkaMGdTeN7%2F8WkCAwEAAQ%3D%3D"
        b"1721266147694"
        b"HIE_ADAPTER_382d8d3b4e6bc62de8b984ac84acf492"
    ).hexdigest()
    assert by_hand == "6583d12ab36ae994cae5a7bfcfb64ad6"
    for given in (DOC_KEY, PLAIN_KEY):
        assert hie_secret(LOGIN_CODE, platform_app_key(given, "as_printed"), str(STAMP)) == by_hand


def test_known_answer_login_secret_decoded() -> None:
    # MD5 over event code + the base64 text (+, /, =) + time stamp + salt.
    by_hand = hashlib.md5(
        b"177cf201a6997f4ca0b8da298e31e3f1"
        b"MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMQnkRMriK2hsKxFZnu5O5152ITG7EiafzU8Sxj+T6Irh8IdwcV3AS7Qt2M7aIXHrnprb"
        b"+psxlkaMGdTeN7/8WkCAwEAAQ=="
        b"1721266147694"
        b"HIE_ADAPTER_382d8d3b4e6bc62de8b984ac84acf492"
    ).hexdigest()
    assert by_hand == "1899397dab9edf3d75de3c6866bdd912"
    for given in (DOC_KEY, PLAIN_KEY):
        assert hie_secret(LOGIN_CODE, platform_app_key(given, "decoded"), str(STAMP)) == by_hand


@pytest.mark.parametrize("given", [DOC_KEY, PLAIN_KEY])
def test_as_printed_travels_encoded_once_more_and_reads_back_as_printed(given: str) -> None:
    query = signed_query(LOGIN_CODE, platform_app_key(given, "as_printed"), STAMP)
    assert f"hie_app_key={DOC_KEY.replace('%', '%25')}&" in query
    assert "%252B" in query and "%252F" in query and "%253D" in query
    # After the platform's one decoding: the printed text, and a secret it can recompute over it.
    assert dict(parse_qsl(query)) == {
        "hie_event_code": LOGIN_CODE,
        "hie_app_key": DOC_KEY,
        "hie_time_stamp": str(STAMP),
        "hie_secret": "6583d12ab36ae994cae5a7bfcfb64ad6",
    }


def test_auto_tries_as_printed_first_then_decoded() -> None:
    assert KEY_FORMS == ("as_printed", "decoded")
    assert other_form("as_printed") == "decoded" and other_form("decoded") == "as_printed"


def test_every_text_of_the_key_is_known_to_the_redactor() -> None:
    texts = set(app_key_texts(PLAIN_KEY))
    assert {PLAIN_KEY, DOC_KEY, DOC_KEY.replace("%", "%25")} <= texts
    assert set(app_key_texts(DOC_KEY)) == texts | {DOC_KEY}
