"""The shipped county table (document section 5), the label dictionary (section 4),
and how the hospital's own county is read from the settings."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from sync import counties, labels
from sync.settings import CountyCodeWarning, Settings
from sync.upstream.person import parse_person
from sync.upstream.simulator import TEST_IDS, default_people
from sync.views.person import person_data, render_person
from tests.support import write_settings


def test_table_holds_every_row_of_section_5() -> None:
    t = counties.table()
    # 199 rows in section 5 of the document, from 510104 锦江区 to 513437 雷波县.
    assert len(t) == 199
    rows = list(t.items())
    assert (rows[0], rows[-1]) == (("510104", "锦江区"), ("513437", "雷波县"))
    assert all(re.fullmatch(r"51\d{4}", code) for code in t)
    assert all(name and name == name.strip() for name in t.values())


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("511425", "青神县"),
        ("510115", "温江区"),
        ("513431", "昭觉县"),
        ("510199", "高新区"),  # the platform lists development zones too
        ("513399", "海螺沟景区管理局"),
        ("513201", "马尔康市"),
        ("513229", "马尔康市"),  # the old code is still listed beside the new one
    ],
)
def test_known_rows(code: str, name: str) -> None:
    assert counties.name(code) == name


def test_unknown_code_has_no_name() -> None:
    assert counties.name("110101") is None
    assert counties.name(None) is None
    assert not counties.known("")


def test_label_dictionary_names_the_families_and_the_socio_economic_labels() -> None:
    assert labels.family_name("J01.04") == "社会经济学标签"
    assert [labels.FAMILIES[f] for f in ("R01", "J01", "H01", "S01", "Q01", "D01")] == [
        "人口学标签", "社会经济学标签", "基本健康标签", "社会保障标签", "亲属信息标签", "档案信息标签",
    ]
    assert [labels.label_name(f"J01.0{n}") for n in range(1, 8)] == [
        "特困人员", "农村低保对象", "孤儿", "脱贫不稳定户", "边缘易致贫户", "突发严重困难户", "一般脱贫户",
    ]
    assert labels.family_name("X09.01") is None


def _settings(tmp_path: Path, **institution: object) -> tuple[Settings, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CountyCodeWarning)
        s = write_settings(
            tmp_path / "settings.yaml", his_url="sqlite:///his.db", outbox_url="sqlite:///o.db",
            base_url="http://127.0.0.1:9", overrides={"institution": institution},
        )
    return s, [str(w.message) for w in caught if issubclass(w.category, CountyCodeWarning)]


def test_his_county_code_is_mapped_to_the_platforms(tmp_path: Path) -> None:
    s, warned = _settings(tmp_path, county_code="QS01", county_map={"QS01": "511425"})
    assert warned == []
    assert s.institution.platform_county_code == "511425"
    person = parse_person(default_people()[TEST_IDS[0]])  # household county 511425 青神县
    d = person_data(person, TEST_IDS[0], s.institution)
    assert d["own_county"] == "511425" and d["own_county_name"] == "青神县"
    assert d["in_own_county"] is True


def test_unknown_county_codes_warn_but_load(tmp_path: Path) -> None:
    s, warned = _settings(tmp_path, county_code="519999", county_map={"HIS7": "518888"})
    assert s.institution.county_code == "519999"
    assert any(w.startswith("institution.county_code: '519999'") and "county_map" in w for w in warned)
    assert any(w.startswith("institution.county_map.HIS7: '518888'") for w in warned)
    # A code the platform does not use cannot be compared: "unknown", never a false "no".
    d = person_data(parse_person(default_people()[TEST_IDS[0]]), TEST_IDS[0], s.institution)
    assert d["in_own_county"] is None and d["own_county_name"] is None
    assert "519999 is not a platform county code" in render_person(d)


def test_no_county_code_means_unknown_not_no(tmp_path: Path) -> None:
    s, warned = _settings(tmp_path, county_code=None)
    assert warned == []
    d = person_data(parse_person(default_people()[TEST_IDS[0]]), TEST_IDS[0], s.institution)
    assert d["in_own_county"] is None
    assert "institution.county_code is not set" in render_person(d)


def test_household_county_name_is_checked_against_the_table(tmp_path: Path) -> None:
    s, _ = _settings(tmp_path, county_code="511425")
    data = default_people()[TEST_IDS[0]]
    # The platform spells the county its own way: both names are shown.
    d = person_data(parse_person({**data, "hjdQhName": "眉山市青神县"}), TEST_IDS[0], s.institution)
    assert (d["household_county_name"], d["household_county_table_name"]) == ("眉山市青神县", "青神县")
    assert "511425 眉山市青神县 (区划表 county table: 青神县)" in render_person(d)
    # A code missing from section 5: shown as sent, flagged, and still compared.
    d = person_data(parse_person({**data, "hjdQh": "510199X", "hjdQhName": None}), TEST_IDS[0], s.institution)
    assert d["household_county_table_name"] is None and d["in_own_county"] is False
    assert "510199X (不在区划表中 / not in the county table" in render_person(d)
