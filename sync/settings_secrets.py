"""Secrets in the settings file: ``${NAME}`` variables and secret files.

- ``${NAME}`` anywhere in a string value is replaced by that environment variable
  (``$$`` writes a literal ``$``); an unset variable is a problem naming it.
- A secret may come from a file instead: ``password_file: /path`` (also ``app_key_file``,
  ``username_file``, and ``url_file`` under ``his``/``outbox``), in ``upstream`` or in each
  entry of ``institutions``.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

# Keys that may be given as `<key>_file:` and are read from that file.
FILE_KEYS = {
    "upstream": ("app_key", "username", "password"),
    "his": ("url",),
    "outbox": ("url",),
}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# Stands in for a secret that a command using only the outbox has no need to read.
NOT_LOADED = "(not loaded: this command uses only the outbox)"


def without_unneeded_secrets(raw: Any, env: dict[str, str]) -> Any:
    """Replace the platform credentials and the HIS URL by a placeholder where they
    cannot be resolved here (unset variable, unreadable or missing file, absent)."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    members = out.get("institutions")
    if isinstance(members, list):
        out["institutions"] = [_stand_ins(e, FILE_KEYS["upstream"], env) if isinstance(e, dict) else e for e in members]
    for section in ("upstream", "his"):
        block = dict(out.get(section) or {}) if isinstance(out.get(section) or {}, dict) else None
        if block is None:
            continue
        if section == "upstream" and isinstance(members, list):
            out[section] = block  # the credentials are the institutions'
            continue
        out[section] = _stand_ins(block, FILE_KEYS[section], env)
    return out


def _stand_ins(block: dict[str, Any], keys: tuple[str, ...], env: dict[str, str]) -> dict[str, Any]:
    block = dict(block)
    for key in keys:
        file_key = f"{key}_file"
        scratch: list[str] = []
        if file_key in block:
            path = interpolate(block[file_key], env, file_key, scratch, set())
            if not scratch and isinstance(path, str) and os.access(path, os.R_OK) and Path(path).is_file():
                continue
            del block[file_key]
            block[key] = NOT_LOADED
        elif key in block:
            interpolate(block[key], env, key, scratch, set())
            if scratch:
                block[key] = NOT_LOADED
        else:
            block[key] = NOT_LOADED
    return block


def interpolate(value: Any, env: dict[str, str], where: str, problems: list[str], reported: set[str]) -> Any:
    if isinstance(value, dict):
        return {
            k: interpolate(v, env, f"{where}.{k}" if where else str(k), problems, reported) for k, v in value.items()
        }
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]", problems, reported) for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name = m.group(1)
            if name not in env:
                reported.add(where)
                problems.append(
                    f"{where}: environment variable {name} is not set "
                    f"(export {name}=..., or put it in the service's environment file) / 环境变量 {name} 未设置"
                )
                return ""
            return env[name]

        return _VAR.sub(sub, value)
    return value


def _secret_blocks(data: dict[str, Any]) -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    """(where, block, keys that may be given as files): the sections, and each entry of institutions:."""
    out = [(section, block, keys) for section, keys in FILE_KEYS.items() if isinstance(block := data.get(section), dict)]
    members = data.get("institutions")
    if isinstance(members, list):
        out += [(f"institutions[{i}]", e, FILE_KEYS["upstream"]) for i, e in enumerate(members) if isinstance(e, dict)]
    return out


def read_secret_files(data: dict[str, Any], problems: list[str], reported: set[str]) -> None:
    for section, block, keys in _secret_blocks(data):
        for key in keys:
            file_key = f"{key}_file"
            if file_key not in block:
                continue
            path_value = block.pop(file_key)
            where = f"{section}.{file_key}"
            if where in reported:
                # The path itself is broken (unset variable): reading it would only add noise.
                reported.add(f"{section}.{key}")
                continue
            if key in block:
                problems.append(f"{where}: give either {section}.{key} or {where}, not both")
                continue
            reported.add(f"{section}.{key}")
            if not isinstance(path_value, str) or not path_value.strip():
                problems.append(f"{where}: must be the path of a file holding the secret")
                continue
            path = Path(path_value.strip())
            try:
                content = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(
                    f"{where}: cannot read {path} ({exc.strerror or type(exc).__name__}); "
                    "check the path and that the service user may read it"
                )
                continue
            except UnicodeDecodeError:
                problems.append(f"{where}: {path} is not UTF-8 text")
                continue
            if not content:
                problems.append(f"{where}: {path} is empty; write the secret into it")
                continue
            reported.discard(f"{section}.{key}")
            try:
                mode = path.stat().st_mode
            except OSError:
                mode = 0
            if mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWOTH):
                warnings.warn(
                    f"{where}: {path} is readable by other users; run `chmod 600 {path}`",
                    SecretFileWarning,
                    stacklevel=2,
                )
            block[key] = content


class SecretFileWarning(UserWarning):
    """A secret file is readable by users other than its owner."""
