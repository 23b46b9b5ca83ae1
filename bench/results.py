"""The final table: every figure as a ratio to its yardstick, with the target and whether it is met."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Row:
    measurement: str
    figure: str
    ratio: str
    target: str
    met: bool | None  # None: a figure without a target


def share(value: float) -> str:
    return f"{100 * value:.0f} %"


def times(value: float) -> str:
    return f"{value:.2f} x"


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def info(self, measurement: str, figure: str, ratio: str = "") -> None:
        self.rows.append(Row(measurement=measurement, figure=figure, ratio=ratio, target="", met=None))

    def at_least(self, measurement: str, figure: str, value: float, floor: float) -> None:
        """A share that must reach ``floor``."""
        self.rows.append(Row(
            measurement=measurement, figure=figure, ratio=share(value), target=f">= {share(floor)}", met=value >= floor,
        ))

    def at_most(self, measurement: str, figure: str, value: float, ceiling: float) -> None:
        """A multiple that must stay within ``ceiling``."""
        self.rows.append(Row(
            measurement=measurement, figure=figure, ratio=times(value), target=f"<= {times(ceiling)}",
            met=value <= ceiling,
        ))

    def below(self, measurement: str, figure: str, value: float, limit: float, unit: str) -> None:
        self.rows.append(Row(
            measurement=measurement, figure=figure, ratio=f"{value:.0f} {unit}", target=f"< {limit:g} {unit}",
            met=value < limit,
        ))

    def print(self, say: Callable[[str], None], *, markdown: bool = False) -> None:
        header = ("measurement", "figure", "ratio", "target", "met")
        lines = [(r.measurement, r.figure, r.ratio, r.target, _met(r.met)) for r in self.rows]
        if markdown:
            say("| " + " | ".join(header) + " |")
            say("|" + "---|" * len(header))
            for line in lines:
                say("| " + " | ".join(line) + " |")
            return
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)] if lines else []
        for line in [header, *lines]:
            say("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        targets = [r for r in self.rows if r.met is not None]
        say(f"  targets met: {sum(1 for r in targets if r.met)} of {len(targets)}")


def _met(met: bool | None) -> str:
    if met is None:
        return ""
    return "met" if met else "NOT MET"
