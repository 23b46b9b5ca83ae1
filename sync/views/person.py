"""`crowd-sync lookup`: what the label API says about one person, as data (``--json``) and as text."""

from __future__ import annotations

from typing import Any

from sync import counties, labels, logs
from sync.settings import Institution
from sync.upstream.person import LABEL_LISTS, Person


def person_data(person: Person | None, id_number: str, institution: Institution) -> dict[str, Any]:
    """The `lookup --json` answer: the same keys whether the person is found or not
    (the HIS parses them; the READMEs list them). The ID number is masked."""
    own = institution.platform_county_code
    household = person.household_county if person is not None else None
    items: list[dict[str, Any]] = []
    if person is not None:
        for list_key, attr in LABEL_LISTS:
            for lbl in getattr(person, attr):
                family = labels.family_of(lbl.code) if lbl.code else None
                items.append(
                    {
                        "code": lbl.code or None,
                        "name": lbl.name or labels.label_name(lbl.code) or None,
                        "family": family,
                        "family_name": labels.family_name(family) if family else None,
                        "list": list_key,
                        "remark": lbl.remark,
                        "credit_constrained": lbl.attr1 == "1",
                    }
                )
    return {
        "id_number": logs.mask_id(id_number),
        "found": person is not None,
        "key_population": bool(person is not None and person.is_key_population),
        "name": person.name if person is not None else None,
        "credit_constrained": bool(person is not None and person.credit_constrained),
        "insured": person.insured if person is not None else None,
        "household_county": household,
        "household_county_name": person.household_county_name if person is not None else None,
        "household_county_table_name": counties.name(household),
        "own_county": own,
        "own_county_name": counties.name(own),
        "in_own_county": _in_own_county(household, own),
        "labels": items,
    }


def _in_own_county(household: str | None, own: str | None) -> bool | None:
    """None when it cannot be told: the front desk must not read "no" into a gap, nor
    into a hospital code that is not the platform's (a HIS code missing from county_map)."""
    if not household or not own:
        return None
    if household == own:
        return True
    return False if counties.known(own) else None


def _yes_no(value: bool) -> str:
    return "是 / yes" if value else "否 / no"


def render_person(d: dict[str, Any]) -> str:
    """``person_data`` for the front desk: who, whether key population, the household county, the labels."""
    if not d["found"]:
        return (
            f"{d['id_number']}: 平台无此人数据，不是重点人群 / not in the key population (the platform returned no data)\n"
            "  如应为重点人群，请区县卫健局导入其标签 / if the person should be, the county health bureau must "
            "import them with labels (FAQ 15)"
        )
    head = "重点人群 / key population" if d["key_population"] else "无标签，不按重点人群处理 / no labels: not key population (FAQ 15)"
    lines = [
        f"{d['id_number']} {d['name'] or ''} — {head}",
        f"  信用约束 credit-constraint list: {_yes_no(d['credit_constrained'])}",
        f"  户籍地 household county: {_county_text(d)}",
    ]
    own = d["own_county"]
    if not own:
        own_text = "未知 / unknown — institution.county_code is not set"
    elif d["in_own_county"] is None and not d["household_county"]:
        own_text = "未知 / unknown — the platform gave no household county"
    elif d["in_own_county"] is None:
        own_text = (
            f"未知 / unknown — {own} is not a platform county code (document section 5): "
            "check institution.county_code and institution.county_map"
        )
    else:
        own_text = _yes_no(d["in_own_county"])
    where = f" ({own} {d['own_county_name'] or ''})".replace(" )", ")") if own else ""
    lines.append(f"  本县户籍 registered in the hospital's county{where}: {own_text}")
    if d["labels"]:
        lines.append("  标签 labels:")
        family: object = object()
        for lbl in d["labels"]:
            if lbl["family"] != family:
                family = lbl["family"]
                lines.append(f"    {family or '-'} {lbl['family_name'] or ''}".rstrip())
            flag = " — 信用约束 / credit-constrained" if lbl["credit_constrained"] else ""
            lines.append(f"      {lbl['code'] or '-'} {lbl['name'] or ''}{flag}")
    return "\n".join(lines)


def _county_text(d: dict[str, Any]) -> str:
    code, answered, listed = d["household_county"], d["household_county_name"], d["household_county_table_name"]
    if not code:
        return "- (平台未返回 / not in the answer)"
    text = f"{code} {answered or listed or ''}".rstrip()
    if listed is None:
        return f"{text} (不在区划表中 / not in the county table, document section 5)"
    if answered and answered != listed:
        return f"{text} (区划表 county table: {listed})"
    return text
