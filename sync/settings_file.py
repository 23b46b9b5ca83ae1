"""What a settings file may hold beyond the settings themselves, handled before validation:
``his.query_file`` (the query in a file of its own), the placeholders of the production
example (``<填写 ...>``, refused by name), and retired keys (a deprecation warning).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from pydantic import ValidationError

__all__ = ["DeprecatedSettingWarning", "placeholders", "read_query_file", "warn_retired"]


def read_query_file(data: dict[str, Any], base_dir: Path, problems: list[str], reported: set[str]) -> None:
    """``his.query_file``: the query in a file of its own, relative to the settings file."""
    block = data.get("his")
    if not isinstance(block, dict) or "query_file" not in block:
        return
    value = block.pop("query_file")
    reported.add("his.query")
    if "query" in block:
        problems.append(
            "his.query_file: 不能同时设置 his.query 与 his.query_file / give either his.query or his.query_file, not both"
        )
        return
    if not isinstance(value, str) or not value.strip():
        problems.append("his.query_file: 应为 SQL 文件路径 / must be the path of a file holding the query")
        return
    path = Path(value.strip())
    if not path.is_absolute():
        path = base_dir / path
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        problems.append(
            f"his.query_file: 无法读取 / cannot read {path} ({exc.strerror or type(exc).__name__}); a relative path is "
            "relative to the settings file's directory, and the service user must be able to read it"
        )
        return
    except UnicodeDecodeError:
        problems.append(f"his.query_file: {path} 不是 UTF-8 文本 / is not UTF-8 text: save it as UTF-8")
        return
    reported.discard("his.query")
    block["query"] = text


# The example settings (deploy/settings.prod.example.yaml) write "<填写 ...>" where only the
# hospital knows the value: loading the file unedited names each one.
_PLACEHOLDER = re.compile(r"^\s*<\s*填写.*>\s*$", re.DOTALL)


def placeholders(value: Any, where: str) -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in placeholders(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in placeholders(v, f"{where}[{i}]")]
    if isinstance(value, str) and _PLACEHOLDER.match(value):
        return [f"{where}: 仍是示例中的占位符 / still the example's placeholder {value.strip()}: write the real value"]
    return []


def warn_retired(data: dict[str, Any]) -> None:
    retry = data.get("retry")
    if isinstance(retry, dict) and "give_up_after_h" in retry:
        warnings.warn(
            "retry.give_up_after_h: 已不再使用，记录不会因平台故障被放弃，请删除此项 / no longer used: no record is given "
            "up because of the platform any more (it is retried with back-off until it is sent; see the README's "
            "settings table, retry); delete this line",
            DeprecatedSettingWarning,
            stacklevel=2,
        )


class DeprecatedSettingWarning(UserWarning):
    """A setting that no longer does anything is still in the settings file."""


# Several problems in one validator's error: split into one line each by ``describe_errors``.
MANY = "\n\x00"


def describe_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """(key, problem) for each validation error; secret values are never echoed."""
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        kind = err["type"]
        msg = err["msg"]
        if MANY in msg:
            # A validator of the whole settings: each problem names its own key.
            out.extend((loc, p) for p in msg.split(MANY)[1:])
            continue
        if kind == "missing":
            out.append((loc, f"{loc}: required setting is missing / 缺少必填项"))
        elif kind == "extra_forbidden":
            out.append(
                (loc, f"{loc}: unknown setting (check its spelling and indentation; see settings.yaml for the keys) / 未知配置项")
            )
        else:
            value = err.get("input")
            shown = ""
            # Our own validators already describe the value; echo it only for type and range
            # errors, never for a secret, and not when it is a block of text (the query).
            if kind != "value_error" and not _looks_secret(err["loc"]) and not isinstance(value, dict | list):
                shown = f" (got {value!r})" if len(repr(value)) <= 80 else ""
            msg = msg.removeprefix("Value error, ")
            if msg.startswith("Input should be "):
                msg = "must be " + msg.removeprefix("Input should be ")
            if kind == "string_type":
                # YAML turns unquoted 0123 into a number (octal 83 in YAML 1.1), so quoting is the fix.
                msg = "must be text; put the value in quotes / 应为文本，请加引号"
            out.append((loc, f"{loc}: {msg}{shown}"))
    return out


def _looks_secret(loc: tuple[int | str, ...]) -> bool:
    # The last part names the field: `upstream.password`, `his.url`; `upstream.base_url` is no secret.
    return bool(loc) and str(loc[-1]) in {"password", "app_key", "url", "username"}
