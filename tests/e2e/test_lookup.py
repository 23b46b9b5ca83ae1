"""`crowd-sync lookup` at the front desk and from the HIS (--json), against the simulator
holding the document's three test ID numbers. The hospital is in 511425 青神县."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sync.upstream.simulator import TEST_IDS, SimConfig, Simulator
from tests.support import write_settings

ROOT = Path(__file__).resolve().parents[2]
NOT_FOUND = "510100198506020044"

# The stable keys of `lookup --json` (READMEs, "Label lookup"); the HIS parses them.
KEYS = [
    "id_number", "found", "key_population", "name", "credit_constrained", "insured",
    "household_county", "household_county_name", "household_county_table_name",
    "own_county", "own_county_name", "in_own_county", "labels",
]
LABEL_KEYS = ["code", "name", "family", "family_name", "list", "remark", "credit_constrained"]


def lookup(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync", "lookup", *args, "--config", "settings.yaml"],
        cwd=site, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("front-desk")
    with Simulator(SimConfig()) as sim:
        write_settings(path / "settings.yaml", his_url="sqlite:///his.db", outbox_url="sqlite:///outbox.db", base_url=sim.url)
        yield path


EXPECTED: dict[str, dict[str, Any]] = {
    TEST_IDS[0]: {
        "name": "李四", "county": ("511425", "青神县"), "own": True, "credit": True,
        "labels": [("J01", "社会经济学标签", "J01.01", "特困人员", True), ("J01", "社会经济学标签", "J01.02", "农村低保对象", True)],
    },
    TEST_IDS[1]: {
        "name": "王芳", "county": ("510115", "温江区"), "own": False, "credit": True,
        "labels": [("J01", "社会经济学标签", "J01.03", "孤儿", True), ("H01", "基本健康标签", "H01.01", "高血压", False)],
    },
    TEST_IDS[2]: {
        "name": "赵敏", "county": ("513431", "昭觉县"), "own": False, "credit": False,
        "labels": [("J01", "社会经济学标签", "J01.05", "边缘易致贫户", False)],
    },
}


@pytest.mark.parametrize("id_number", TEST_IDS)
def test_lookup_of_a_test_id_text_and_json(site: Path, id_number: str) -> None:
    want = EXPECTED[id_number]
    masked = id_number[:6] + "********" + id_number[-4:]
    code, county = want["county"]

    r = lookup(site, id_number)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert id_number not in text + r.stderr
    assert text.startswith(f"{masked} {want['name']} — 重点人群 / key population")
    assert f"户籍地 household county: {code} {county}\n" in text
    assert "本县户籍 registered in the hospital's county (511425 青神县): " + ("是 / yes" if want["own"] else "否 / no") in text
    assert "信用约束 credit-constraint list: " + ("是 / yes" if want["credit"] else "否 / no") in text
    for family, family_name, label, label_name, credit in want["labels"]:
        assert f"    {family} {family_name}\n" in text
        assert f"      {label} {label_name}" + (" — 信用约束 / credit-constrained" if credit else "") + "\n" in text

    r = lookup(site, id_number, "--json")
    assert r.returncode == 0, r.stderr
    assert id_number not in r.stdout
    d = json.loads(r.stdout)
    assert list(d) == KEYS
    assert d["id_number"] == masked
    assert (d["found"], d["key_population"], d["name"]) == (True, True, want["name"])
    assert (d["household_county"], d["household_county_name"], d["household_county_table_name"]) == (code, county, county)
    assert (d["own_county"], d["own_county_name"], d["in_own_county"]) == ("511425", "青神县", want["own"])
    assert d["credit_constrained"] is want["credit"]
    assert all(list(lbl) == LABEL_KEYS for lbl in d["labels"])
    assert [
        (lbl["family"], lbl["family_name"], lbl["code"], lbl["name"], lbl["credit_constrained"]) for lbl in d["labels"]
    ] == want["labels"]


def test_lookup_of_an_unknown_id_says_not_key_population(site: Path) -> None:
    r = lookup(site, NOT_FOUND)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("510100********0044: 平台无此人数据，不是重点人群 / not in the key population")
    assert "FAQ 15" in r.stdout
    assert NOT_FOUND not in r.stdout + r.stderr

    d = json.loads(lookup(site, NOT_FOUND, "--json").stdout)
    assert list(d) == KEYS  # the same keys as for a person found
    assert (d["found"], d["key_population"], d["in_own_county"], d["labels"]) == (False, False, None, [])
    assert d["own_county"] == "511425"
