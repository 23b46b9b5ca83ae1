"""The platform's county codes and names (interface document, section 5).

The label API answers a person's household-registration county as the platform's
code (``hjdQh``), which may differ from the HIS's own county codes (document
3.1.2, note 1); county-level hospitals judge "treated in the household county"
from it (note 2). ``sync/data/counties.tsv`` holds every row of section 5 as
``code<TAB>name``, in the document's order.

Stdlib only and free of our other modules, so that settings validation can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib import resources
from types import MappingProxyType


@cache
def table() -> Mapping[str, str]:
    """Every county of section 5: platform code -> name."""
    text = resources.files("sync").joinpath("data", "counties.tsv").read_text(encoding="utf-8")
    rows: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        code, sep, name = line.partition("\t")
        if not sep or not code.strip() or not name.strip():
            raise ValueError(f"counties.tsv line {number}: expected CODE<TAB>NAME, got {line!r}")
        rows[code.strip()] = name.strip()
    return MappingProxyType(rows)


def name(code: str | None) -> str | None:
    """The county's name in section 5, or None for a code the document does not list."""
    if not code:
        return None
    return table().get(code.strip())


def known(code: str | None) -> bool:
    return name(code) is not None


def to_platform(code: str | None, county_map: Mapping[str, str]) -> str | None:
    """A county code as the platform writes it: a HIS code is translated through
    ``institution.county_map``; a code that is already the platform's passes unchanged."""
    if code is None or not code.strip():
        return None
    code = code.strip()
    return county_map.get(code, code).strip()
