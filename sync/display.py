"""Pure: text laid out for a terminal, where a Chinese character takes two columns.

``status``, ``failures``, ``show`` and the month's report align their columns with
these, so that a table mixing Chinese and English lines up.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


def width(text: str) -> int:
    """Terminal columns: wide and full-width characters (Chinese) take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def ljust(text: str, columns: int) -> str:
    return text + " " * max(0, columns - width(text))


def rjust(text: str, columns: int) -> str:
    return " " * max(0, columns - width(text)) + text


def wrap(text: str, columns: int) -> list[str]:
    """``text`` cut into lines of at most ``columns`` terminal columns: at spaces where it can,
    anywhere between two Chinese characters, inside a word only when one word is longer."""
    columns = max(columns, 8)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for token in _tokens(paragraph):
            if width(line + token) <= columns:
                line += token
                continue
            if line.strip():
                lines.append(line.rstrip())
            line = token.lstrip()
            while width(line) > columns:
                cut = _fit(line, columns)
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line.rstrip())
    return lines


def _tokens(text: str) -> list[str]:
    """Words with the spaces before them; each wide character a token of its own."""
    tokens: list[str] = []
    current = ""
    for ch in text:
        wide = unicodedata.east_asian_width(ch) in ("W", "F")
        if wide or (ch == " " and current and not current.isspace()):
            if current:
                tokens.append(current)
            current = ""
            if wide:
                tokens.append(ch)
                continue
        current += ch
    if current:
        tokens.append(current)
    return tokens


def _fit(text: str, columns: int) -> int:
    used = 0
    for i, ch in enumerate(text):
        used += width(ch)
        if used > columns:
            return max(i, 1)
    return len(text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = (), gap: str = "  ") -> list[str]:
    """Rows under their headers, columns aligned by terminal width; the last column may hold
    several lines (a wrapped reason), continued under itself. ``right``: right-aligned columns."""
    split = [[cell.split("\n") for cell in row] for row in rows]
    widths = [width(h) for h in headers]
    for row in split:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], *(width(part) for part in cell))

    def line(cells: Sequence[str]) -> str:
        out = [rjust(c, widths[i]) if i in right else ljust(c, widths[i]) for i, c in enumerate(cells)]
        return gap.join(out).rstrip()

    lines = [line(headers), line(["-" * w for w in widths])]
    for row in split:
        depth = max(len(cell) for cell in row)
        for k in range(depth):
            lines.append(line([cell[k] if k < len(cell) else "" for cell in row]))
    return lines
