"""Pure: the SQL text of ``his.query``, read the way the database will read it.

The hospital's query is theirs: a ``:word`` inside its string literals, quoted
identifiers and comments is text, and only ``:since`` and ``:until`` outside them are
bind parameters. Each dialect's quirks decide what a literal or a comment is.
"""

from __future__ import annotations

import re

# A bind parameter as sqlalchemy.text() finds one: `:name`, not after a colon, a word
# character or a backslash (its escape), and not followed by a colon (PostgreSQL's `::`).
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")
QUERY_PARAMETERS = ("since", "until")


def _sql_parts(query: str, dialect: str) -> list[tuple[bool, str]]:
    """``query`` cut into (is_code, text) parts: string literals, quoted identifiers and
    comments are not code. ``dialect`` (a SQLAlchemy backend name) decides the quirks:
    MySQL's backslash escapes and ``#`` comments, PostgreSQL's dollar quotes."""
    mysql = dialect in ("mysql", "mariadb")
    parts: list[tuple[bool, str]] = []
    code_start = i = 0
    n = len(query)

    def close(end: int) -> int:
        nonlocal code_start
        if end > code_start:
            parts.append((True, query[code_start:end]))
        return end

    while i < n:
        ch = query[i]
        end: int | None = None
        if ch in "'\"`":
            j = i + 1
            while j < n:
                if mysql and query[j] == "\\" and ch != "`":
                    j += 2
                    continue
                if query[j] == ch:
                    if j + 1 < n and query[j + 1] == ch:  # '' inside '...'
                        j += 2
                        continue
                    break
                j += 1
            end = min(j + 1, n)
        elif query.startswith("--", i) or (mysql and ch == "#"):
            j = query.find("\n", i)
            end = n if j < 0 else j
        elif query.startswith("/*", i):
            j = query.find("*/", i + 2)
            end = n if j < 0 else j + 2
        elif ch == "$" and dialect == "postgresql" and (m := re.match(r"\$([A-Za-z_]\w*)?\$", query[i:])):
            j = query.find(m.group(0), i + len(m.group(0)))
            end = n if j < 0 else j + len(m.group(0))
        if end is None:
            i += 1
            continue
        close(i)
        parts.append((False, query[i:end]))
        i = code_start = end
    close(n)
    return parts


def query_parameters(query: str, dialect: str = "") -> list[str]:
    """The bind parameters (``:name``) of ``query``, leaving string literals and comments alone."""
    names: list[str] = []
    for is_code, text in _sql_parts(query, dialect):
        if is_code:
            names.extend(m.group(1) for m in _BIND.finditer(text) if m.group(1) not in names)
    return names


def escape_literal_colons(query: str, dialect: str = "") -> str:
    """``query`` for ``sqlalchemy.text()``: a ``:word`` inside a string literal or a comment is
    escaped, so that only the real bind parameters are taken as parameters."""
    return "".join(
        text if is_code else _BIND.sub(lambda m: "\\:" + m.group(1), text) for is_code, text in _sql_parts(query, dialect)
    )


def url_dialect(url: str) -> str:
    """The backend name of a database URL (``mysql+pymysql://`` -> ``mysql``), "" when unknown."""
    m = re.match(r"\s*([A-Za-z][\w]*)(?:\+[\w]+)?://", url)
    return m.group(1).lower() if m else ""


def code_only(query: str, dialect: str = "") -> str:
    """``query`` without its string literals, quoted identifiers and comments."""
    return "".join(part for is_code, part in _sql_parts(query, dialect) if is_code)
