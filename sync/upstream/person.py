"""Pure: the label API's answer (document 3.1.2) parsed into a Person with their labels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The label lists of the answer's ``data`` (document 3.1.2), in the document's order, each
# with the Person attribute that holds it.
LABEL_LISTS: tuple[tuple[str, str], ...] = (
    ("rkxBq", "demographic"),
    ("jjxBq", "socio_economic"),
    ("jkBq", "health"),
    ("glztBq", "management"),
)


@dataclass(frozen=True, kw_only=True)
class Label:
    code: str
    name: str
    remark: str | None
    attr1: str | None  # "1": the person is on the credit-constraint list
    attr2: str | None


@dataclass(frozen=True, kw_only=True)
class Person:
    name: str | None
    id_number: str
    household_county: str | None  # hjdQh: the platform's county code (document section 5)
    household_county_name: str | None
    residence_county: str | None
    residence_county_name: str | None
    insured: bool | None
    demographic: tuple[Label, ...]
    socio_economic: tuple[Label, ...]
    health: tuple[Label, ...]
    management: tuple[Label, ...]

    @property
    def labels(self) -> tuple[Label, ...]:
        return self.demographic + self.socio_economic + self.health + self.management

    @property
    def credit_constrained(self) -> bool:
        return any(label.attr1 == "1" for label in self.labels)

    @property
    def is_key_population(self) -> bool:
        # FAQ 15: a person imported without labels is not recognised as key population.
        return bool(self.labels)


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _labels(value: Any) -> tuple[Label, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(
        Label(
            code=str(item.get("code") or ""),
            name=str(item.get("name") or ""),
            remark=_opt_str(item.get("remark")),
            attr1=_opt_str(item.get("attr1")),
            attr2=_opt_str(item.get("attr2")),
        )
        for item in value
        if isinstance(item, Mapping)
    )


def parse_person(data: Mapping[str, Any] | None) -> Person | None:
    """The rybq answer's ``data`` object as a Person; None when the platform says null."""
    if not isinstance(data, Mapping):
        return None
    insured = _opt_str(data.get("ylbx"))
    return Person(
        name=_opt_str(data.get("xm")),
        id_number=_opt_str(data.get("zjhm")) or "",
        household_county=_opt_str(data.get("hjdQh")),
        household_county_name=_opt_str(data.get("hjdQhName")),
        residence_county=_opt_str(data.get("xjdQh")),
        residence_county_name=_opt_str(data.get("xjdQhName")),
        insured={"1": True, "0": False}.get(insured or ""),
        demographic=_labels(data.get("rkxBq")),
        socio_economic=_labels(data.get("jjxBq")),
        health=_labels(data.get("jkBq")),
        management=_labels(data.get("glztBq")),
    )
