"""The label dictionary of the interface document (section 4, 字典表).

A label code is ``FAMILY.NN`` (``J01.01``); the family is the part before the dot.
The document lists the families and only the first labels of most of them
("..."); the platform's answer carries each label's own name, so these names
are a fallback and a heading, not a gate: an unknown code is shown as sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

FAMILIES: Mapping[str, str] = MappingProxyType(
    {
        "R01": "人口学标签",
        "J01": "社会经济学标签",
        "H01": "基本健康标签",
        "S01": "社会保障标签",
        "Q01": "亲属信息标签",
        "D01": "档案信息标签",
    }
)

LABELS: Mapping[str, str] = MappingProxyType(
    {
        "R01.01": "姓名",
        "J01.01": "特困人员",
        "J01.02": "农村低保对象",
        "J01.03": "孤儿",
        "J01.04": "脱贫不稳定户",
        "J01.05": "边缘易致贫户",
        "J01.06": "突发严重困难户",
        "J01.07": "一般脱贫户",
        "H01.01": "高血压",
        "S01.01": "医疗保险类型",
        "Q01.01": "子女数",
        "D01.01": "建档日期",
    }
)


def family_of(code: str) -> str:
    """``J01.03`` -> ``J01``; a code without a dot is its own family."""
    return code.strip().split(".", 1)[0].upper()


def family_name(code: str) -> str | None:
    """The family's name for a label or family code, None when the document does not list it."""
    return FAMILIES.get(family_of(code))


def label_name(code: str) -> str | None:
    return LABELS.get(code.strip().upper())
