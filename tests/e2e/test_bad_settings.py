"""Broken settings through the real command line: exit 2, every problem named by its
key, no traceback, no secret echoed back."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from sync.upstream.simulator import TEST_APP_KEY, TEST_APP_KEY_ENCODED, SimConfig, Simulator
from tests.e2e.test_cli import crowd_sync
from tests.support import HIS_QUERY, His

PASSWORD = "Pw-Very-Secret-7731"
DB_PASSWORD = "Db-Very-Secret-5519"
NUMERIC_PASSWORD = 98765432  # YAML reads it as a number: a type error that must not echo the value
SECRETS = (PASSWORD, DB_PASSWORD, str(NUMERIC_PASSWORD), TEST_APP_KEY, TEST_APP_KEY_ENCODED, quote(TEST_APP_KEY, safe=""))


def _good() -> dict[str, Any]:
    return {
        "institution": {"name": "测试医院", "county_code": "511425"},
        "upstream": {
            "env": "test",
            "base_url": "http://127.0.0.1:9",
            "app_key": TEST_APP_KEY_ENCODED,
            "username": "ceshi-rybq",
            "password": PASSWORD,
        },
        "his": {"url": f"mysql+pymysql://reader:{DB_PASSWORD}@127.0.0.1:9/his", "query": HIS_QUERY},
        "outbox": {"url": "sqlite:///outbox.db"},
    }


def _without(section: str, key: str | None = None) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        if key is None:
            del d[section]
        else:
            del d[section][key]

    return edit


def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    """`_set(**{"upstream.concurrency": "many"})`."""

    def edit(d: dict[str, Any]) -> None:
        for dotted, value in values.items():
            *path, last = dotted.split(".")
            block = d
            for part in path:
                block = block.setdefault(part, {})
            if value is _DELETE:
                block.pop(last, None)
            else:
                block[last] = value

    return edit


_DELETE = object()


@dataclass(frozen=True)
class Broken:
    name: str
    edit: Callable[[dict[str, Any]], None] | None  # None: `text` is the whole file
    named: tuple[str, ...]  # each must appear in stderr
    text: str = ""


CASES: list[Broken] = [
    # Each required key missing, one file each.
    Broken("no-app-key", _without("upstream", "app_key"), ("upstream.app_key: required setting is missing",)),
    Broken("no-username", _without("upstream", "username"), ("upstream.username: required setting is missing",)),
    Broken("no-password", _without("upstream", "password"), ("upstream.password: required setting is missing",)),
    Broken("no-his-url", _without("his", "url"), ("his.url: required setting is missing",)),
    Broken("no-his-query", _without("his", "query"), ("his.query: required setting is missing",)),
    Broken("no-upstream", _without("upstream"), ("upstream: required setting is missing",)),
    Broken("no-his", _without("his"), ("his: required setting is missing",)),
    # Wrong types and values, all in one file: every one is reported, not just the first.
    Broken(
        "wrong-types",
        _set(**{
            "upstream.concurrency": "many",
            "upstream.timeout_s": [1, 2],
            "upstream.env": "staging",
            "upstream.password": NUMERIC_PASSWORD,
            "upstream.base_url": "ftp://example",
            "his.settle_delay_s": "soon",
            "key_crowd.source": "guess",
            "key_crowd.upload_only_key_crowd": "perhaps",
            "schedule.poll_every_s": -1,
            "schedule.timezone": "Mars/Olympus",
            "schedule.reconcile_at": "25:00",
            "retry.first_delay_s": 0,
            "log.level": "loud",
            "institution.county_code": 511425,
            "metrics.listen": "everywhere",
        }),
        (
            "upstream.concurrency", "upstream.timeout_s", "upstream.env", "upstream.password: must be text",
            "upstream.base_url", "his.settle_delay_s", "key_crowd.source", "key_crowd.upload_only_key_crowd",
            "schedule.poll_every_s", "schedule.timezone", "schedule.reconcile_at", "retry.first_delay_s",
            "log.level", "institution.county_code: must be text", "metrics.listen", "has 15 problems",
        ),
    ),
    Broken(
        "unknown-keys",
        _set(**{"bogus": 1, "upstream.pasword": PASSWORD, "upstream.password": _DELETE, "his.quey": "x"}),
        (
            "bogus: unknown setting", "upstream.pasword: unknown setting", "his.quey: unknown setting",
            "upstream.password: required setting is missing",
        ),
    ),
    Broken(
        "unset-variables",
        _set(**{
            "upstream.password": "${CROWD_SYNC_TEST_UNSET_PW}",
            "his.url": "mysql+pymysql://reader:${CROWD_SYNC_TEST_UNSET_DB}@127.0.0.1/his",
        }),
        (
            "upstream.password: environment variable CROWD_SYNC_TEST_UNSET_PW is not set",
            "his.url: environment variable CROWD_SYNC_TEST_UNSET_DB is not set",
        ),
    ),
    # Tests run as root, who may read any file: a directory and a missing file are unreadable to anyone.
    Broken(
        "secret-file-is-a-directory",
        _set(**{"upstream.password": _DELETE, "upstream.password_file": "{dir}/secrets"}),
        ("upstream.password_file: cannot read", "Is a directory"),
    ),
    Broken(
        "secret-file-missing",
        _set(**{"upstream.password": _DELETE, "upstream.password_file": "{dir}/no-such-file"}),
        ("upstream.password_file: cannot read", "No such file or directory"),
    ),
    Broken(
        "both-secret-and-file",
        _set(**{"upstream.password_file": "{dir}/no-such-file"}),
        ("give either upstream.password or upstream.password_file, not both",),
    ),
    Broken(
        "query-without-since",
        _set(**{"his.query": "SELECT * FROM his_settlement WHERE changed < :until"}),
        ("his.query: must use the bind parameters :since and :until (missing :since)",),
    ),
    Broken(
        "query-not-select",
        _set(**{"his.query": "DELETE FROM his_settlement WHERE changed >= :since AND changed < :until"}),
        ("his.query: must be a SELECT",),
    ),
    Broken(
        "invalid-yaml",
        None,
        ("is not valid YAML at line",),
        text=f'upstream:\n  env: test\n  app_key: x\n  password: "{PASSWORD}\n  username: u\nhis:\n  url: x\n',
    ),
    Broken(
        "tab-indented-yaml",
        None,
        ("is not valid YAML at line 2", "spaces, not tabs"),
        text=f"upstream:\n\tpassword: {PASSWORD}\n",
    ),
    Broken("empty-file", None, ("upstream: required setting is missing", "his: required setting is missing")),
    Broken("top-level-list", None, ("the top level must be a mapping",), text=f"- {PASSWORD}\n- b\n"),
]


def _write(tmp_path: Path, case: Broken) -> Path:
    path = tmp_path / f"{case.name}.yaml"
    (tmp_path / "secrets").mkdir(exist_ok=True)
    if case.edit is None:
        path.write_text(case.text, encoding="utf-8")
        return path
    data = copy.deepcopy(_good())
    case.edit(data)
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False).replace("{dir}", str(tmp_path))
    path.write_text(text, encoding="utf-8")
    return path


def _assert_clean(output: str) -> None:
    assert "Traceback" not in output
    for secret in SECRETS:
        assert secret not in output


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_settings_exit_2_naming_every_problem(tmp_path: Path, case: Broken) -> None:
    path = _write(tmp_path, case)

    r = crowd_sync("check", "--config", str(path), cwd=tmp_path)

    assert r.returncode == 2, r.stdout + r.stderr
    for fragment in case.named:
        assert fragment in r.stderr, (fragment, r.stderr)
    assert r.stderr.startswith("crowd-sync: "), r.stderr  # one message for people, not a crash dump
    _assert_clean(r.stdout + r.stderr)


def test_good_baseline_passes_settings_validation(tmp_path: Path) -> None:
    # The corpus edits a valid file: without that, every case above could fail for one shared reason.
    path = _write(tmp_path, Broken("good", lambda d: None, ()))
    r = crowd_sync("check", "--config", str(path), cwd=tmp_path)
    assert "[ OK ] settings:" in r.stdout, r.stdout + r.stderr
    _assert_clean(r.stdout + r.stderr)


def test_missing_settings_file_exits_2(tmp_path: Path) -> None:
    r = crowd_sync("status", "--config", "nowhere.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert "nowhere.yaml not found" in r.stderr
    assert "Traceback" not in r.stderr


# -- the query's columns ------------------------------------------------------------


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


def _site(tmp_path: Path, sim: Simulator, query: str) -> Path:
    His(f"sqlite:///{tmp_path / 'his.db'}").dispose()
    data = _good()
    data["upstream"].update(base_url=sim.url, password="Ehr123456@")
    data["his"].update(url=f"sqlite:///{tmp_path / 'his.db'}", query=query, settle_delay_s=0)
    data["key_crowd"] = {"source": "column"}
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def test_query_with_a_missing_and_an_unknown_column_is_refused_by_check_and_once(
    tmp_path: Path, sim: Simulator
) -> None:
    assert "diag_code AS icd_code, " in HIS_QUERY
    query = HIS_QUERY.replace("diag_code AS icd_code, ", "").replace("SELECT ", "SELECT 'A3' AS ward, ", 1)
    path = _site(tmp_path, sim, query)

    check = crowd_sync("check", "--config", str(path), cwd=tmp_path)
    once = crowd_sync("once", "--config", str(path), cwd=tmp_path)

    assert check.returncode == 2, check.stdout + check.stderr
    assert "[FAIL] HIS database and query" in check.stdout
    assert "missing column(s) icd_code" in check.stdout
    assert "unknown column(s) ward" in check.stdout
    assert once.returncode == 2, once.stdout + once.stderr
    assert "missing column icd_code: add `... AS icd_code` to his.query" in once.stderr
    assert "unknown column ward: remove or rename it" in once.stderr
    assert sim.counters["uploads"] == 0
    for r in (check, once):
        assert "Traceback" not in r.stdout + r.stderr


def test_key_crowd_column_is_required_only_with_source_column(tmp_path: Path, sim: Simulator) -> None:
    assert "is_key AS key_crowd," in HIS_QUERY
    query = HIS_QUERY.replace("is_key AS key_crowd,", "")
    path = _site(tmp_path, sim, query)

    r = crowd_sync("once", "--config", str(path), cwd=tmp_path)

    assert r.returncode == 2
    assert "missing column key_crowd" in r.stderr
    assert "or set key_crowd.source: lookup" in r.stderr
