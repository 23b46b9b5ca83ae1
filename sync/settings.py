"""Load and validate ``settings.yaml``.

- ``${NAME}`` variables and secret files (``password_file: /path``): settings_secrets.py.
  systemd credentials are files too: ``password_file: ${CREDENTIALS_DIRECTORY}/password``.
- Every problem is collected and reported at once, each naming its key and the fix.

Relative SQLite paths in ``outbox.url`` and ``his.url`` are resolved against the
directory holding the settings file, so a service finds the same database
whatever its working directory.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from datetime import date, time, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sync import counties
from sync.errors import ConfigError
from sync.outbox.model import DEFAULT_INSTITUTION
from sync.settings_file import MANY, describe_errors, placeholders, read_query_file, warn_retired
from sync.settings_secrets import (
    FILE_KEYS,
    interpolate,
    read_secret_files,
    without_unneeded_secrets,
)
from sync.settings_secrets import NOT_LOADED as NOT_LOADED  # re-exported: commands and app use it
from sync.settings_secrets import SecretFileWarning as SecretFileWarning
from sync.sqltext import QUERY_PARAMETERS, code_only, query_parameters, url_dialect

DEFAULT_CONFIG_NAME = "settings.yaml"
CONFIG_ENV = "CROWD_SYNC_CONFIG"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Institution(_Model):
    # The value of his.query's `institution` column for this institution; in the
    # single-institution form it may stay empty (the outbox then keys its rows by DEFAULT_CODE).
    code: str = Field(default="", max_length=40)
    name: str = ""
    county_code: str | None = Field(default=None, description="the platform's county code, document section 5")
    # HIS county code -> platform county code, where the two differ (document 3.1.2 note 1).
    county_map: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_counties(self) -> Institution:
        # A warning, not an error: section 5 may lag behind the platform, and only
        # `lookup`'s household-county answer depends on these codes.
        problems = [
            f"institution.county_map.{his_code}: {target!r} is not a county code of the platform (document section 5); "
            "map to a code listed there"
            for his_code, target in self.county_map.items()
            if not counties.known(target)
        ]
        own = self.platform_county_code
        # An unedited placeholder is refused by name when the file is read: no warning beside it.
        if own is not None and not counties.known(own) and not placeholders(own, "institution.county_code"):
            via = f" (mapped from {self.county_code!r})" if own != (self.county_code or "").strip() else ""
            problems.append(
                f"institution.county_code: {own!r}{via} is not a county code of the platform (document section 5); "
                "`lookup` cannot tell whether a person is registered in this county; write the platform's code, "
                "or map the HIS code to it under institution.county_map"
            )
        for text in problems:
            warnings.warn(text, CountyCodeWarning, stacklevel=2)
        return self

    @property
    def platform_county_code(self) -> str | None:
        """The hospital's county as the platform writes it (``county_code`` through ``county_map``)."""
        return counties.to_platform(self.county_code, self.county_map)


class EventCodes(_Model):
    login: str | None = None
    labels: str | None = None
    upload: str | None = None


class Upstream(_Model):
    env: Literal["test", "prod"] = "test"
    base_url: str = "http://183.220.195.216:9080"
    # The credentials of the single-institution form; with `institutions:` each entry has its own.
    app_key: SecretStr | None = None
    # Which text of the app key the platform signs (docs/signing.md): auto learns it at the
    # first login and remembers it in the outbox; decoded or as_printed pins it.
    app_key_form: Literal["auto", "decoded", "as_printed"] = "auto"
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = Field(default=15.0, gt=0, le=600)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    concurrency: int = Field(default=4, ge=1, le=64)
    rate_limit_per_s: float = Field(default=20.0, gt=0, le=5000)
    verify_tls: bool = True
    ca_bundle: str | None = None
    # How long a token is trusted before logging in again (the document: 12 hours in prod).
    token_ttl_h: float = Field(default=12.0, gt=0, le=48)
    event_codes: EventCodes = Field(default_factory=EventCodes)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must start with http:// or https:// followed by a host, e.g. http://11.6.226.2:9091")
        return v

    @field_validator("username")
    @classmethod
    def _username(cls, v: str | None) -> str | None:
        return None if v is None else not_empty_text(v)

    @field_validator("app_key", "password")
    @classmethod
    def _not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None else not_empty_secret(v)

    def credentials(self) -> tuple[str, str, str]:
        """(app key, username, password); ConfigError naming the setting when one is absent."""
        if self.app_key is None or self.username is None or self.password is None:
            raise ConfigError(
                "缺少平台凭据 / the platform credentials are missing",
                hint="填写 upstream.app_key、username、password，或在 institutions: 中为每个机构填写 / set "
                "upstream.app_key, upstream.username and upstream.password, or list each institution with its own "
                "under institutions:",
            )
        return self.app_key.get_secret_value(), self.username, self.password.get_secret_value()


def not_empty_text(v: str) -> str:
    if not v.strip():
        raise ValueError("is empty")
    return v.strip()


def not_empty_secret(v: SecretStr) -> SecretStr:
    if not v.get_secret_value().strip():
        raise ValueError("is empty")
    return SecretStr(v.get_secret_value().strip())


# The outbox's institution of the single-institution form when `institution.code` is not set.
DEFAULT_CODE = DEFAULT_INSTITUTION


class InstitutionEntry(Institution):
    """One member of a county medical alliance (医共体): its code in his.query's `institution`
    column and its own platform credentials ("每个对接机构都有自己的hie_app_key")."""

    code: str = Field(min_length=1, max_length=40)
    app_key: SecretStr
    username: str
    password: SecretStr

    @field_validator("code", "username")
    @classmethod
    def _text(cls, v: str) -> str:
        return not_empty_text(v)

    @field_validator("app_key", "password")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        return not_empty_secret(v)


@dataclass(frozen=True, kw_only=True)
class Member:
    """One institution crowd-sync uploads for: the outbox's code for it, what the platform
    knows of it, and ``upstream`` with its own credentials (the rest shared)."""

    code: str
    institution: Institution
    upstream: Upstream

    @property
    def label(self) -> str:
        """``code name`` for people (the code alone when unnamed)."""
        name = self.institution.name
        return f"{self.code} {name}" if name and name != self.code else self.code


class His(_Model):
    url: SecretStr
    query: str  # or query_file: the query in a file of its own (read by ``parse``)
    start_from: date | None = None
    settle_delay_s: int = Field(default=60, ge=0, le=86400)
    lookback_s: int = Field(default=600, ge=0, le=30 * 86400)
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    # Below MySQL's wait_timeout (8 h by default) and the usual firewall idle cut.
    pool_recycle_s: int = Field(default=1800, ge=30)
    # The zone the HIS writes its datetimes (changed_at) in; None: schedule.timezone. The HIS
    # clock is the database's UTC clock in this zone, whatever the server's own time_zone.
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        return None if v is None or not v.strip() else check_zone(v.strip())

    @field_validator("query")
    @classmethod
    def _query(cls, v: str, info: ValidationInfo) -> str:
        text = v.strip().rstrip(";").strip()
        # The URL is validated first (declared first): its dialect decides how literals are written.
        url = info.data.get("url")
        dialect = url_dialect(url.get_secret_value()) if isinstance(url, SecretStr) else ""
        used = query_parameters(text, dialect)
        missing = [f":{p}" for p in QUERY_PARAMETERS if p not in used]
        if missing:
            raise ValueError(
                f"must use the bind parameters :since and :until (missing {', '.join(missing)}) outside string "
                "literals and comments, e.g. WHERE changed_at >= :since AND changed_at < :until"
            )
        code = code_only(text, dialect)
        if not re.match(r"(?is)^\s*(select|with)\b", code):
            raise ValueError("must be a SELECT (or WITH ... SELECT) statement")
        unknown = [f":{p}" for p in used if p not in QUERY_PARAMETERS]
        if unknown:
            raise ValueError(
                f"uses {', '.join(unknown)}, but crowd-sync fills in only :since and :until: write the value "
                "itself, or put text holding a colon inside quotes"
            )
        return text


class KeyCrowd(_Model):
    source: Literal["column", "lookup"] = "lookup"
    cache_ttl_h: float = Field(default=24.0, ge=0, le=24 * 90)
    upload_only_key_crowd: bool = True


class Outbox(_Model):
    url: SecretStr = SecretStr("sqlite:///var/crowd-sync.db")
    # How long a claimed row stays reserved for one worker before others may take it.
    lease_s: int = Field(default=300, ge=10, le=86400)
    # How long the service keeps sync_run rows (one per cycle) and sync_attempt rows (each
    # attempt at a visit, `crowd-sync show`) before it deletes them.
    keep_runs_days: int = Field(default=90, ge=1, le=3650)
    keep_attempts_days: int = Field(default=180, ge=1, le=3650)


def check_zone(v: str) -> str:
    """A time zone name (Asia/Shanghai, UTC) or a fixed offset (+08:00, UTC+8, -05:30)."""
    if _fixed_offset(v) is not None:
        return v
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {v!r}; use a name such as Asia/Shanghai or UTC, or an offset such as +08:00"
        ) from None
    return v


_OFFSET = re.compile(r"^(?:UTC|GMT)?\s*([+-])(\d{1,2})(?::?(\d{2}))?$", re.IGNORECASE)


def _fixed_offset(v: str) -> tzinfo | None:
    m = _OFFSET.match(v.strip())
    if not m:
        return None
    hours, minutes = int(m.group(2)), int(m.group(3) or 0)
    if hours > 14 or minutes > 59:
        return None
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if m.group(1) == "-" else delta)


def zone(v: str) -> tzinfo:
    """The tzinfo of a name ``check_zone`` accepted."""
    return _fixed_offset(v) or ZoneInfo(v)


class Schedule(_Model):
    timezone: str = "Asia/Shanghai"
    poll_every_s: int = Field(default=120, ge=5, le=86400)
    reconcile_at: str = "02:30"
    reconcile_days: int = Field(default=31, ge=1, le=366)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; use a name such as Asia/Shanghai") from None
        return v

    @field_validator("reconcile_at", mode="before")
    @classmethod
    def _at(cls, v: Any) -> str:
        read_as = ""
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            # YAML 1.1 reads an unquoted 02:30 as the sexagesimal number 150.
            v = f"{v // 60:02d}:{v % 60:02d}"
            read_as = f" (read as {v}; put the time in quotes)"
        if isinstance(v, time):
            v = v.strftime("%H:%M")
        if not isinstance(v, str) or not re.fullmatch(r"([01]?\d|2[0-3]):[0-5]\d", v.strip()):
            raise ValueError(f'must be a time of day "HH:MM", e.g. "02:30"{read_as}')
        return v.strip()

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def reconcile_time(self) -> time:
        h, m = self.reconcile_at.split(":")
        return time(int(h), int(m))


class Retry(_Model):
    first_delay_s: float = Field(default=30.0, gt=0)
    max_delay_s: float = Field(default=3600.0, gt=0)
    # No longer used: no record is given up because of the platform (see sync.circuit);
    # kept so that settings files written for earlier versions still load.
    give_up_after_h: float = Field(default=72.0, gt=0)
    # After this many unexplained refusals of one record (中间请求异常, a code 200 without
    # 新增成功/修改成功), each further one is logged as an error; the record is still retried.
    max_generic_attempts: int = Field(default=5, ge=1, le=1000)

    @model_validator(mode="after")
    def _order(self) -> Retry:
        if self.max_delay_s < self.first_delay_s:
            raise ValueError(
                f"max_delay_s ({self.max_delay_s:g}) must not be smaller than first_delay_s ({self.first_delay_s:g})"
            )
        return self


class Log(_Model):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "<N>" (the syslog priority) before each line, for journald; auto: when stderr is the journal.
    priority_prefix: bool | Literal["auto"] = "auto"
    # Long work (a back-fill, a reconcile, a large dispatch) logs one progress line this often
    # when no terminal shows the live display; 0: never.
    progress_every_s: float = Field(default=10.0, ge=0, le=3600)


class Metrics(_Model):
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})", v.strip())
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9464")
        return v.strip()


class Settings(_Model):
    institution: Institution = Field(default_factory=Institution)
    # A county medical alliance: several institutions on one HIS, each with its own credentials.
    institutions: list[InstitutionEntry] | None = None
    upstream: Upstream
    his: His
    key_crowd: KeyCrowd = Field(default_factory=KeyCrowd)
    outbox: Outbox = Field(default_factory=Outbox)
    schedule: Schedule = Field(default_factory=Schedule)
    retry: Retry = Field(default_factory=Retry)
    log: Log = Field(default_factory=Log)
    metrics: Metrics = Field(default_factory=Metrics)

    # Where the settings came from (for messages); not a setting.
    source_path: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _one_form(self) -> Settings:
        if self.institutions is None:
            return self
        problems: list[str] = []
        if not self.institutions:
            problems.append("institutions: 列表为空 / is empty; list each institution, or remove it and use institution:")
        if "institution" in self.model_fields_set:
            problems.append("institution: 二者只能写一个 / give either institution: (one institution) or institutions: (several), not both")
        for key in ("app_key", "username", "password"):
            if getattr(self.upstream, key) is not None:
                problems.append(
                    f"upstream.{key}: 多机构时写在各机构条目中 / with institutions:, each institution has its own; move it into its entry"
                )
        for attr in ("code", "username"):
            seen: dict[str, int] = {}
            for i, entry in enumerate(self.institutions):
                value = getattr(entry, attr)
                if value in seen:
                    why = " (each institution must use its own account, document FAQ 4 and 14)" if attr == "username" else ""
                    problems.append(
                        f"institutions[{i}].{attr}: {value!r} 与 institutions[{seen[value]}] 重复 / is institutions[{seen[value]}]'s already{why}; "
                        f"give each institution its own {attr}"
                    )
                seen.setdefault(value, i)
        if problems:
            raise ValueError(MANY + MANY.join(problems))
        return self

    @property
    def members(self) -> tuple[Member, ...]:
        """Every institution uploaded for, in the order of the settings (one in the single form)."""
        if self.institutions is None:
            return (Member(code=self.institution.code or DEFAULT_CODE, institution=self.institution,
                           upstream=self.upstream),)
        return tuple(
            Member(
                code=e.code,
                institution=Institution(name=e.name, county_code=e.county_code, county_map=e.county_map),
                upstream=self.upstream.model_copy(
                    update={"app_key": e.app_key, "username": e.username, "password": e.password}
                ),
            )
            for e in self.institutions
        )

    def member(self, code: str | None) -> Member:
        """The institution ``code`` (None: the only one); ConfigError naming the codes otherwise."""
        members = self.members
        if code is None and len(members) == 1:
            return members[0]
        for m in members:
            if m.code == code:
                return m
        codes = ", ".join(m.code for m in members)
        raise ConfigError(
            f"配置中没有机构 {code!r} / no institution {code!r} in the settings" if code
            else "配置了多个机构，请指定一个 / there are several institutions: name one",
            hint=f"用 --institution 指定 / pass --institution with one of: {codes}",
        )

    @property
    def his_timezone(self) -> str:
        """The zone the HIS writes its datetimes in: his.timezone, else schedule.timezone."""
        return self.his.timezone or self.schedule.timezone


def default_config_path() -> Path:
    """``$CROWD_SYNC_CONFIG``, else ``./settings.yaml``."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME)


def load(path: str | Path | None = None, *, env: dict[str, str] | None = None, platform: bool = True) -> Settings:
    """Read, interpolate and validate the settings file; raise ConfigError listing every problem.

    ``platform=False`` is for commands that use only the outbox (status, retry,
    report, migrate): the platform credentials and the HIS URL may then be absent or
    unreadable, as when an operator runs them outside the service that holds them.
    """
    p = Path(path) if path is not None else default_config_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"找不到配置文件 / settings file {p} not found",
            hint="用 --config 指定，或设置 CROWD_SYNC_CONFIG / pass --config PATH, set CROWD_SYNC_CONFIG, or copy "
            "settings.yaml from the project",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"配置文件无法读取 / settings file {p} cannot be read: {exc}",
            hint="检查文件权限和编码（UTF-8）/ check its permissions and encoding (UTF-8)",
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        # The problem text is PyYAML's short description ("mapping values are not allowed
        # here"); the snippet it can also print is left out since it may hold a secret.
        problem = getattr(exc, "problem", None)
        what = f": {problem}" if problem else ""
        raise ConfigError(
            f"配置文件不是有效的 YAML / settings file {p} is not valid YAML{where}{what}",
            hint="检查缩进（用空格，不用 Tab），含 ':' 或 '#' 的值加引号 / check indentation (spaces, not tabs) and "
            "quote values containing ':' or '#'",
        ) from None
    environ = os.environ.copy() if env is None else env
    if not platform:
        raw = without_unneeded_secrets(raw, environ)
    return parse(raw, env=environ, base_dir=p.resolve().parent, source=str(p))


def parse(raw: Any, *, env: dict[str, str], base_dir: Path, source: str = "settings") -> Settings:
    """Validate already-parsed YAML; ``base_dir`` anchors relative SQLite paths."""
    problems: list[str] = []
    # Keys already reported (unset variable, unreadable file): the validation error that
    # follows from the same cause would only repeat it less clearly.
    reported: set[str] = set()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: 顶层须是各节的映射 / the top level must be a mapping of sections (upstream:, his:, ...), not a "
            f"{type(raw).__name__}",
            hint="以示例 settings.yaml 为起点 / start from the example settings.yaml",
        )
    data = interpolate(raw, env, "", problems, reported)
    # A section whose keys are all commented out reads as null: it means "all defaults".
    for section in Settings.model_fields:
        if section in data and data[section] is None:
            del data[section]
    data.pop("source_path", None)
    read_secret_files(data, problems, reported)
    read_query_file(data, base_dir, problems, reported)
    problems.extend(placeholders(data, ""))
    upstream = data.get("upstream")
    if not data.get("institutions") and isinstance(upstream, dict):
        # The single-institution form: the credentials are upstream's (the model lets them be
        # absent because with institutions: they are each entry's).
        problems.extend(
            f"upstream.{key}: required setting is missing / 缺少必填项"
            for key in FILE_KEYS["upstream"] if key not in upstream and f"upstream.{key}" not in reported
        )
    warn_retired(data)
    if isinstance(data.get("outbox", {}), dict):
        # The embedded default is relative too, and must not depend on the working directory.
        data.setdefault("outbox", {}).setdefault("url", Outbox.model_fields["url"].get_default().get_secret_value())
    for section in ("his", "outbox"):
        block = data.get(section)
        if isinstance(block, dict) and isinstance(block.get("url"), str):
            block["url"] = resolve_sqlite_url(block["url"], base_dir)
    settings: Settings | None
    try:
        settings = Settings.model_validate({**data, "source_path": source})
    except ValidationError as exc:
        problems.extend(p for loc, p in describe_errors(exc) if loc not in reported)
        settings = None
    if problems or settings is None:
        raise ConfigError(
            f"配置文件 {source} 有 {len(problems)} 处问题 / {source} has {len(problems)} "
            f"problem{'s' if len(problems) != 1 else ''}",
            problems=problems,
            hint="逐项修改后运行 `crowd-sync check` / fix each key listed, then run `crowd-sync check`",
        )
    return settings


class CountyCodeWarning(UserWarning):
    """A county code in ``institution`` is not in the platform's table (document section 5)."""


def resolve_sqlite_url(url: str, base_dir: Path) -> str:
    """Make a relative ``sqlite:///relative/path`` absolute against ``base_dir``."""
    m = re.match(r"^(sqlite(?:\+\w+)?):///(?!/)(.+)$", url.strip())
    if not m or m.group(2).startswith(":memory:") or m.group(2).startswith("file:"):
        return url
    path_part, sep, query = m.group(2).partition("?")
    return f"{m.group(1)}:///{(base_dir / path_part).resolve()}{sep}{query}"
