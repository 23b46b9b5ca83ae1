"""Settings of a county medical alliance (医共体): several institutions on one HIS, each
with its own code, key and account; the single-institution form keeps working unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sync.columns import check_columns
from sync.errors import ConfigError
from sync.settings import DEFAULT_CODE, Settings, parse

QUERY = "SELECT * FROM v WHERE changed >= :since AND changed < :until"


def base(**more: Any) -> dict[str, Any]:
    return {"upstream": {"base_url": "http://127.0.0.1:9"}, "his": {"url": "sqlite:///his.db", "query": QUERY}, **more}


def entry(code: str, n: int, **more: Any) -> dict[str, Any]:
    return {"code": code, "name": f"卫生院{n}", "app_key": f"key-{n}", "username": f"user{n}", "password": f"pw{n}", **more}


def load(raw: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None) -> Settings:
    return parse(raw, env=env or {}, base_dir=tmp_path)


def problems(raw: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(raw, tmp_path, env)
    return list(info.value.problems)


def test_single_institution_form_is_one_member_with_the_upstream_credentials(tmp_path: Path) -> None:
    raw = base(institution={"name": "县医院"})
    raw["upstream"].update(app_key="k", username="u", password="p")
    (member,) = load(raw, tmp_path).members
    assert member.code == DEFAULT_CODE
    assert member.upstream.credentials() == ("k", "u", "p")
    assert member.institution.name == "县医院"


def test_each_institution_has_its_own_credentials_from_variables_and_files(tmp_path: Path) -> None:
    secret = tmp_path / "pw2"
    secret.write_text("from-file\n", encoding="utf-8")
    secret.chmod(0o600)
    second = entry("510115002", 2, password_file=str(secret))
    del second["password"]
    raw = base(institutions=[entry("510115", 1, app_key="${KEY1}"), second])
    s = load(raw, tmp_path, env={"KEY1": "key-from-env"})
    assert [m.code for m in s.members] == ["510115", "510115002"]
    assert s.members[0].upstream.credentials() == ("key-from-env", "user1", "pw1")
    assert s.members[1].upstream.credentials() == ("key-2", "user2", "from-file")
    # What is not a credential stays shared.
    assert {m.upstream.base_url for m in s.members} == {"http://127.0.0.1:9"}
    assert s.member("510115002").institution.name == "卫生院2"


def test_duplicate_codes_and_accounts_are_refused_naming_the_entries(tmp_path: Path) -> None:
    raw = base(institutions=[entry("A", 1), entry("A", 2, username="user1")])
    found = problems(raw, tmp_path)
    assert any(p.startswith("institutions[1].code: 'A'") and "is institutions[0]'s already" in p for p in found)
    assert any(p.startswith("institutions[1].username: 'user1'") and "FAQ" in p for p in found)


def test_credentials_in_upstream_beside_institutions_are_refused(tmp_path: Path) -> None:
    raw = base(institutions=[entry("A", 1)])
    raw["upstream"]["password"] = "shared"
    assert any(
        p.startswith("upstream.password: ") and "with institutions:, each institution has its own" in p
        for p in problems(raw, tmp_path)
    )


def test_missing_secret_and_placeholder_name_the_entry(tmp_path: Path) -> None:
    second = entry("B", 2, app_key="<填写 授权码>")
    del second["password"]
    found = problems(base(institutions=[entry("A", 1, username="${USER_A}"), second]), tmp_path)
    assert any(p.startswith("institutions[0].username: environment variable USER_A is not set") for p in found)
    assert any(p.startswith("institutions[1].app_key:") and "placeholder" in p for p in found)
    assert any(p.startswith("institutions[1].password: required setting is missing") for p in found)


def test_the_query_must_return_institution_when_several_are_listed() -> None:
    columns = ["lsh", "code", "card_type", "card_no", "visit_type", "enter_date", "leave_date", "icd_name",
               "icd_code", "total_fee", "ins_fee", "total_prepayment", "deficient_fee", "settlement_date", "changed_at"]
    check_columns(columns, need_key_crowd=False)
    with pytest.raises(ConfigError) as info:
        check_columns(columns, need_key_crowd=False, need_institution=True)
    assert any("missing column institution" in p for p in info.value.problems)
    check_columns([*columns, "INSTITUTION"], need_key_crowd=False, need_institution=True)
