"""Loading settings.yaml: what an operator writes, and what they are told when it is wrong."""

from __future__ import annotations

import textwrap
import warnings
from datetime import date
from pathlib import Path

import pytest
import yaml

from sync.errors import ConfigError
from sync.settings import SecretFileWarning, Settings, default_config_path, load, resolve_sqlite_url

ENV = {
    "CROWD_SYNC_APP_KEY": "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMQnkRMriK2hsKxFZnu5O5152ITG7EiafzU8Sxj%2BT6Irh8IdwcV3AS7Qt2M7aIXHrnprb",
    "CROWD_SYNC_USERNAME": "ceshi-rybq",
    "CROWD_SYNC_PASSWORD": "Ehr123456@",
    "HIS_DB_PASSWORD": "his-Pa55word",
}
SECRETS = ("Ehr123456@", "his-Pa55word", "MFwwDQYJKoZIhvcNAQEB")

QUERY = "SELECT * FROM v_settled WHERE changed_at >= :since AND changed_at < :until"

# The product contract's example, with every extra key the module accepts.
FULL = """\
institution:
  name: 某某县人民医院
  county_code: "511425"
  county_map: {"510100": "511425"}
upstream:
  env: prod
  base_url: http://11.6.226.2:9091/
  app_key: ${CROWD_SYNC_APP_KEY}
  username: ${CROWD_SYNC_USERNAME}
  password: ${CROWD_SYNC_PASSWORD}
  timeout_s: 20
  connect_timeout_s: 3
  concurrency: 8
  rate_limit_per_s: 10
  verify_tls: false
  ca_bundle: /etc/ssl/province.pem
  token_ttl_h: 11.5
  event_codes: {upload: b60eb517bdcd4525958aebadeef76d63}
his:
  url: mysql+pymysql://reader:${HIS_DB_PASSWORD}@10.0.0.5/his
  query: |
    SELECT js.lsh, js.jssj AS changed_at
    FROM js WHERE js.jssj >= :since AND js.jssj < :until;
  start_from: 2024-06-01
  settle_delay_s: 90
  lookback_s: 1200
  batch_size: 500
  pool_recycle_s: 600
key_crowd:
  source: column
  cache_ttl_h: 12
  upload_only_key_crowd: false
outbox:
  url: postgresql+psycopg2://sync@127.0.0.1/outbox
  lease_s: 60
schedule:
  timezone: Asia/Chongqing
  poll_every_s: 60
  reconcile_at: "03:15"
  reconcile_days: 45
retry:
  first_delay_s: 10
  max_delay_s: 600
  max_generic_attempts: 3
log:
  format: console
  level: debug
metrics:
  listen: 127.0.0.1:9464
"""

MINIMAL = """\
upstream:
  app_key: key-1234
  username: someone
  password: pw-1234
his:
  url: sqlite:///his.db
  query: "SELECT * FROM v WHERE changed_at >= :since AND changed_at < :until"
"""


def write(tmp_path: Path, text: str, name: str = "settings.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    return load(write(tmp_path, text), env=ENV if env is None else env)


def problems_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    msg = str(info.value)
    assert_clean(msg)
    for secret in (*SECRETS, "pw-1234", "key-1234"):
        assert secret not in msg
    return msg


def secret_file(tmp_path: Path, name: str, content: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    path.chmod(mode)
    return path


# --- a good file -------------------------------------------------------------------------


def test_full_settings_file_is_read_as_written(tmp_path: Path) -> None:
    s = load_text(tmp_path, FULL)

    assert s.institution.name == "某某县人民医院"
    assert s.institution.county_code == "511425"
    assert s.institution.county_map == {"510100": "511425"}
    up = s.upstream
    assert up.env == "prod"
    assert up.base_url == "http://11.6.226.2:9091"  # trailing slash dropped
    assert up.app_key.get_secret_value() == ENV["CROWD_SYNC_APP_KEY"]
    assert up.username == "ceshi-rybq"
    assert up.password.get_secret_value() == "Ehr123456@"
    assert (up.timeout_s, up.connect_timeout_s, up.concurrency, up.rate_limit_per_s) == (20, 3, 8, 10)
    assert up.verify_tls is False
    assert up.ca_bundle == "/etc/ssl/province.pem"
    assert up.token_ttl_h == 11.5
    assert up.event_codes.upload == "b60eb517bdcd4525958aebadeef76d63"
    assert up.event_codes.login is None
    assert s.his.url.get_secret_value() == "mysql+pymysql://reader:his-Pa55word@10.0.0.5/his"
    assert s.his.query.startswith("SELECT js.lsh")
    assert not s.his.query.endswith(";")  # a trailing semicolon breaks some drivers
    assert s.his.start_from == date(2024, 6, 1)
    assert (s.his.settle_delay_s, s.his.lookback_s, s.his.batch_size, s.his.pool_recycle_s) == (90, 1200, 500, 600)
    assert s.key_crowd.source == "column"
    assert s.key_crowd.cache_ttl_h == 12
    assert s.key_crowd.upload_only_key_crowd is False
    assert s.outbox.url.get_secret_value() == "postgresql+psycopg2://sync@127.0.0.1/outbox"
    assert s.outbox.lease_s == 60
    assert s.schedule.tz.key == "Asia/Chongqing"
    assert s.schedule.reconcile_time.hour == 3
    assert s.schedule.reconcile_time.minute == 15
    assert (s.schedule.poll_every_s, s.schedule.reconcile_days) == (60, 45)
    assert (s.retry.first_delay_s, s.retry.max_delay_s) == (10, 600)
    assert s.retry.max_generic_attempts == 3
    assert (s.log.format, s.log.level) == ("console", "debug")
    assert s.metrics.listen == "127.0.0.1:9464"


def test_secrets_do_not_show_in_the_settings_repr(tmp_path: Path) -> None:
    s = load_text(tmp_path, FULL)
    text = repr(s) + str(s.model_dump())
    for secret in SECRETS:
        assert secret not in text


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    s = load_text(tmp_path, MINIMAL)

    assert s.upstream.env == "test"
    assert s.upstream.base_url == "http://183.220.195.216:9080"
    assert (s.upstream.timeout_s, s.upstream.concurrency, s.upstream.rate_limit_per_s) == (15, 4, 20)
    assert s.upstream.verify_tls is True
    assert s.upstream.token_ttl_h == 12
    assert s.his.start_from is None
    assert (s.his.settle_delay_s, s.his.lookback_s) == (60, 600)
    assert s.key_crowd.source == "lookup"
    assert s.key_crowd.cache_ttl_h == 24
    assert s.key_crowd.upload_only_key_crowd is True
    assert s.schedule.timezone == "Asia/Shanghai"
    assert s.schedule.poll_every_s == 120
    assert s.schedule.reconcile_at == "02:30"
    assert s.schedule.reconcile_days == 31
    assert (s.retry.first_delay_s, s.retry.max_delay_s, s.retry.give_up_after_h) == (30, 3600, 72)
    assert (s.log.format, s.log.level) == ("json", "info")
    assert s.metrics.listen is None
    # The embedded outbox lives next to the settings file, whatever the working directory.
    assert s.outbox.url.get_secret_value() == f"sqlite:///{(tmp_path / 'var' / 'crowd-sync.db').resolve()}"


def test_sections_left_empty_mean_defaults(tmp_path: Path) -> None:
    s = load_text(tmp_path, MINIMAL + "metrics:\n  # listen: 127.0.0.1:9464\nretry:\n")
    assert s.metrics.listen is None
    assert s.retry.first_delay_s == 30


def test_config_path_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CROWD_SYNC_CONFIG", raising=False)
    assert default_config_path() == Path("settings.yaml")
    path = write(tmp_path, MINIMAL, "site.yaml")
    monkeypatch.setenv("CROWD_SYNC_CONFIG", str(path))
    assert default_config_path() == path
    assert load().upstream.username == "someone"


def test_missing_settings_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.yaml", env={})
    assert "nope.yaml" in str(info.value)
    assert "--config" in str(info.value)


# --- environment variables ---------------------------------------------------------------


def test_variables_are_replaced_anywhere_in_a_value_and_double_dollar_is_a_dollar(tmp_path: Path) -> None:
    text = MINIMAL.replace("password: pw-1234", "password: ${PW_A}$$x${PW_B}").replace(
        "url: sqlite:///his.db", "url: mysql+pymysql://u:${HIS_PW}@${HIS_HOST}:3306/his"
    )
    env = {"PW_A": "ab", "PW_B": "${NOT_EXPANDED}", "HIS_PW": "p$w", "HIS_HOST": "10.0.0.5"}
    s = load_text(tmp_path, text, env)
    # A value coming from the environment is taken literally, never expanded again.
    assert s.upstream.password.get_secret_value() == "ab$x${NOT_EXPANDED}"
    assert s.his.url.get_secret_value() == "mysql+pymysql://u:p$w@10.0.0.5:3306/his"


def test_unset_variables_are_each_named_once(tmp_path: Path) -> None:
    text = problems_of(tmp_path, FULL, env={"CROWD_SYNC_USERNAME": "u"})
    for name, key in [
        ("CROWD_SYNC_APP_KEY", "upstream.app_key"),
        ("CROWD_SYNC_PASSWORD", "upstream.password"),
        ("HIS_DB_PASSWORD", "his.url"),
    ]:
        assert f"{key}: environment variable {name} is not set" in text
    # The empty value left behind is not reported a second time as "is empty".
    assert "is empty" not in text
    assert "3 problems" in text


def test_load_reads_the_process_environment_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CS_TEST_PW", "from-env-pw")
    path = write(tmp_path, MINIMAL.replace("pw-1234", "${CS_TEST_PW}"))
    assert load(path).upstream.password.get_secret_value() == "from-env-pw"


# --- secrets from files ------------------------------------------------------------------


def test_secrets_are_read_from_files_and_stripped(tmp_path: Path) -> None:
    pw = secret_file(tmp_path, "password", "  file-pw-1234\n")
    key = secret_file(tmp_path, "app_key", "file-key%2B1\n")
    user = secret_file(tmp_path, "username", "file-user\n")
    url = secret_file(tmp_path, "his_url", "mysql+pymysql://reader:x@h/his\n")
    outbox = secret_file(tmp_path, "outbox_url", "sqlite:///state/outbox.db\n")
    text = f"""\
upstream:
  app_key_file: {key}
  username_file: {user}
  password_file: ${{CREDENTIALS_DIRECTORY}}/password
his:
  url_file: {url}
  query: "{QUERY}"
outbox:
  url_file: {outbox}
"""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a private secret file must not warn
        s = load_text(tmp_path, text, env={"CREDENTIALS_DIRECTORY": str(pw.parent)})
    assert s.upstream.password.get_secret_value() == "file-pw-1234"
    assert s.upstream.app_key.get_secret_value() == "file-key%2B1"
    assert s.upstream.username == "file-user"
    assert s.his.url.get_secret_value() == "mysql+pymysql://reader:x@h/his"
    assert s.outbox.url.get_secret_value() == f"sqlite:///{tmp_path / 'state' / 'outbox.db'}"


def test_secret_file_problems_name_the_key_and_the_path(tmp_path: Path) -> None:
    empty = secret_file(tmp_path, "empty", " \n")
    both = secret_file(tmp_path, "key", "k-1234")
    text = f"""\
upstream:
  app_key: inline-key
  app_key_file: {both}
  username: u
  password_file: {tmp_path / "missing-password"}
his:
  url_file: {empty}
  query: "{QUERY}"
"""
    msg = problems_of(tmp_path, text)
    assert f"upstream.password_file: cannot read {tmp_path / 'missing-password'}" in msg
    assert f"his.url_file: {empty} is empty" in msg
    assert "give either upstream.app_key or upstream.app_key_file, not both" in msg
    # The unreadable file is the one problem with upstream.password; "missing" would mislead.
    assert "upstream.password: required" not in msg
    assert "3 problems" in msg


def test_file_path_built_from_an_unset_variable_is_reported_once(tmp_path: Path) -> None:
    text = MINIMAL.replace("password: pw-1234", "password_file: ${CREDENTIALS_DIRECTORY}/password")
    msg = problems_of(tmp_path, text, env={})
    assert "upstream.password_file: environment variable CREDENTIALS_DIRECTORY is not set" in msg
    assert "1 problem" in msg


def test_secret_file_readable_by_others_warns_with_the_fix(tmp_path: Path) -> None:
    pw = secret_file(tmp_path, "password", "shared-pw-1234", mode=0o644)
    text = MINIMAL.replace("password: pw-1234", f"password_file: {pw}")
    with pytest.warns(SecretFileWarning, match="chmod 600") as record:
        s = load_text(tmp_path, text)
    assert str(pw) in str(record[0].message)
    assert "shared-pw-1234" not in str(record[0].message)
    assert s.upstream.password.get_secret_value() == "shared-pw-1234"


# --- paths -------------------------------------------------------------------------------


def test_relative_sqlite_urls_are_resolved_against_the_settings_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)  # a working directory other than the settings file's
    text = (
        MINIMAL.replace("sqlite:///his.db", "sqlite:///data/his.db?mode=ro") + "outbox:\n  url: sqlite:///outbox.db\n"
    )
    s = load(write(conf_dir, text), env={})
    assert s.his.url.get_secret_value() == f"sqlite:///{conf_dir / 'data' / 'his.db'}?mode=ro"
    assert s.outbox.url.get_secret_value() == f"sqlite:///{conf_dir / 'outbox.db'}"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////var/lib/crowd-sync/outbox.db",
        "sqlite:///:memory:",
        "sqlite://",
        "mysql+pymysql://u:p@h/db",
    ],
)
def test_absolute_memory_and_server_urls_are_left_alone(url: str, tmp_path: Path) -> None:
    assert resolve_sqlite_url(url, tmp_path) == url


# --- YAML quirks -------------------------------------------------------------------------


def test_unquoted_reconcile_time_still_works(tmp_path: Path) -> None:
    # YAML 1.1 reads 02:30 unquoted as the base-60 number 150.
    s = load_text(tmp_path, MINIMAL + "schedule:\n  reconcile_at: 02:30\n")
    assert s.schedule.reconcile_at == "02:30"
    assert (s.schedule.reconcile_time.hour, s.schedule.reconcile_time.minute) == (2, 30)
    s = load_text(tmp_path, MINIMAL + "schedule:\n  reconcile_at: 23:05\n")
    assert s.schedule.reconcile_at == "23:05"


def test_unquoted_bad_time_says_how_it_was_read(tmp_path: Path) -> None:
    msg = problems_of(tmp_path, MINIMAL + "schedule:\n  reconcile_at: 25:00\n")
    assert "schedule.reconcile_at" in msg
    assert "read as 25:00" in msg


# --- broken files ------------------------------------------------------------------------

REQUIRED = ["upstream", "his", "upstream.app_key", "upstream.username", "upstream.password", "his.url", "his.query"]


@pytest.mark.parametrize("key", REQUIRED)
def test_each_required_key_missing_is_named(tmp_path: Path, key: str) -> None:
    data = yaml.safe_load(MINIMAL)
    section, _, name = key.partition(".")
    if name:
        del data[section][name]
    else:
        del data[section]
    msg = problems_of(tmp_path, yaml.safe_dump(data))
    assert f"{key}: required setting is missing" in msg
    assert "1 problem" in msg


BROKEN = [
    ("concurrency: many", "upstream:\n  concurrency: many\n", ["upstream.concurrency", "valid integer", "'many'"]),
    ("concurrency: 0", "upstream:\n  concurrency: 0\n", ["upstream.concurrency", "greater than or equal to 1"]),
    ("unknown top-level key", "uptream:\n  env: test\n", ["uptream: unknown setting"]),
    ("unknown nested key", "schedule:\n  poll_every: 60\n", ["schedule.poll_every: unknown setting"]),
    (
        "unknown timezone",
        "schedule:\n  timezone: Asia/Chengdu\n",
        ["schedule.timezone", "unknown time zone 'Asia/Chengdu'"],
    ),
    ("bad reconcile_at", 'schedule:\n  reconcile_at: "2:61"\n', ["schedule.reconcile_at", "HH:MM"]),
    ("env not test or prod", "upstream:\n  env: production\n", ["upstream.env", "'test' or 'prod'"]),
    ("base_url without scheme", "upstream:\n  base_url: 11.6.226.2:9091\n", ["upstream.base_url", "http://"]),
    (
        "retry order",
        "retry:\n  first_delay_s: 60\n  max_delay_s: 10\n",
        ["retry", "max_delay_s (10) must not be smaller than first_delay_s (60)"],
    ),
    ("metrics.listen no port", "metrics:\n  listen: localhost\n", ["metrics.listen", "HOST:PORT"]),
    ("metrics.listen bad port", "metrics:\n  listen: 127.0.0.1:70000\n", ["metrics.listen", "HOST:PORT"]),
    ("log level", "log:\n  level: verbose\n", ["log.level"]),
    ("section not a mapping", "outbox: sqlite:///x.db\n", ["outbox", "valid dictionary"]),
]


@pytest.mark.parametrize(("extra", "expected"), [(e, x) for _, e, x in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_broken_value_is_named_with_its_key(tmp_path: Path, extra: str, expected: list[str]) -> None:
    base = MINIMAL
    section = extra.split(":", 1)[0]
    if section in ("upstream",):
        # Merge into the existing section rather than repeating it.
        base = MINIMAL.replace("upstream:\n", extra)
        extra = ""
    msg = problems_of(tmp_path, base + extra)
    for part in expected:
        assert part in msg
    assert_clean(msg)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT * FROM v WHERE changed_at >= :since", "missing :until"),
        ("SELECT * FROM v WHERE changed_at >= :sinceX AND changed_at < :untilX", "missing :since, :until"),
        ("DELETE FROM v WHERE changed_at >= :since AND changed_at < :until", "must be a SELECT"),
    ],
)
def test_bad_query_is_explained(tmp_path: Path, query: str, expected: str) -> None:
    msg = problems_of(tmp_path, MINIMAL.replace(QUERY.replace("v_settled", "v"), query))
    assert "his.query" in msg
    assert expected in msg


def test_with_select_query_is_accepted(tmp_path: Path) -> None:
    query = "WITH t AS (SELECT * FROM v) SELECT * FROM t WHERE changed_at >= :since AND changed_at < :until"
    s = load_text(tmp_path, MINIMAL.replace(QUERY.replace("v_settled", "v"), query))
    assert s.his.query == query


def test_every_problem_in_one_file_is_listed_at_once(tmp_path: Path) -> None:
    text = """\
upstream:
  app_key: k-1234
  password: pw-1234
  concurrency: many
  colour: blue
his:
  url: sqlite:///his.db
  query: "SELECT 1"
schedule:
  timezone: Mars/Olympus
  reconcile_at: "99:99"
retry:
  first_delay_s: 100
  max_delay_s: 1
metrics:
  listen: "not an address"
"""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    msg = str(info.value)
    keys = [
        "upstream.username",
        "upstream.concurrency",
        "upstream.colour",
        "his.query",
        "schedule.timezone",
        "schedule.reconcile_at",
        "retry: max_delay_s",
        "metrics.listen",
    ]
    for key in keys:
        assert key in msg
    assert len(info.value.problems) == len(keys)
    assert f"{len(keys)} problems" in msg
    assert_clean(msg)


@pytest.mark.parametrize(
    "bad",
    [
        "password: [Ehr123456@, second]",
        "password: {value: Ehr123456@}",
        "password: 20240601",
        "password: Ehr123456@\n  pasword: Ehr123456@",
    ],
)
def test_a_wrongly_typed_or_misspelled_secret_is_never_echoed(tmp_path: Path, bad: str) -> None:
    msg = problems_of(tmp_path, MINIMAL.replace("password: pw-1234", bad))
    assert "upstream.pas" in msg
    assert "Ehr123456@" not in msg
    assert "20240601" not in msg
    assert_clean(msg)


def test_a_number_given_as_password_asks_for_quotes(tmp_path: Path) -> None:
    # YAML 1.1 would read 0123 as octal 83: the operator has to quote it.
    msg = problems_of(tmp_path, MINIMAL.replace("password: pw-1234", "password: 0123"))
    assert "upstream.password: must be text; put the value in quotes" in msg
    assert "83" not in msg


def test_his_url_with_a_password_is_never_echoed(tmp_path: Path) -> None:
    msg = problems_of(tmp_path, MINIMAL.replace("url: sqlite:///his.db", "url: [mysql://u:Secr3tPw@h/db]"))
    assert "his.url" in msg
    assert "Secr3tPw" not in msg


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    text = MINIMAL + "schedule:\n  timezone: Asia/Shanghai\n   poll_every_s: 60\n"
    msg = problems_of(tmp_path, text)
    assert "not valid YAML at line 10" in msg
    assert "settings.yaml" in msg
    assert_clean(msg)


def test_invalid_yaml_does_not_quote_the_offending_line(tmp_path: Path) -> None:
    text = MINIMAL.replace("password: pw-1234", 'password: "Secr3t-pw\n  broken: [')
    msg = problems_of(tmp_path, text)
    assert "not valid YAML at line" in msg
    assert "Secr3t-pw" not in msg


@pytest.mark.parametrize("top", ["- upstream\n- his\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, top: str) -> None:
    msg = problems_of(tmp_path, top)
    assert "top level must be a mapping" in msg
    assert_clean(msg)


def test_empty_file_lists_both_required_sections(tmp_path: Path) -> None:
    msg = problems_of(tmp_path, "# nothing yet\n")
    assert "upstream: required setting is missing" in msg
    assert "his: required setting is missing" in msg


def test_settings_are_immutable(tmp_path: Path) -> None:
    s = load_text(tmp_path, MINIMAL)
    with pytest.raises(ValueError, match="frozen"):
        s.upstream.concurrency = 10  # type: ignore[misc]


# --- helpers -----------------------------------------------------------------------------


def assert_clean(msg: str) -> None:
    """An operator-facing message: no traceback, no validation library internals."""
    for junk in ("Traceback", 'File "', "pydantic", "errors.pydantic.dev", "input_value", "ValidationError"):
        assert junk not in msg


@pytest.mark.parametrize(("written", "read"), [("auto", "auto"), ("true", True), ("yes", True), ("false", False)])
def test_log_priority_prefix_is_auto_or_a_yes_no(tmp_path: Path, written: str, read: object) -> None:
    assert load_text(tmp_path, MINIMAL + f"log:\n  priority_prefix: {written}\n").log.priority_prefix == read
    assert load_text(tmp_path, MINIMAL).log.priority_prefix == "auto"


def test_a_wrong_log_priority_prefix_names_the_key(tmp_path: Path) -> None:
    assert "log.priority_prefix" in problems_of(tmp_path, MINIMAL + "log:\n  priority_prefix: sometimes\n")


# --- his.query_file, the example's placeholders, retired settings ----------------------------------

MINIMAL_FILE = """\
upstream:
  app_key: k
  username: u
  password: p
his:
  url: sqlite:///his.db
  query_file: sql/his-query.sql
"""


def test_the_query_may_live_in_a_file_next_to_the_settings(tmp_path: Path) -> None:
    (tmp_path / "sql").mkdir()
    query = "-- 就诊结算\nSELECT * FROM v\nWHERE changed_at >= :since AND changed_at < :until;\n"
    (tmp_path / "sql" / "his-query.sql").write_text(query, encoding="utf-8")
    s = load_text(tmp_path, MINIMAL_FILE)
    assert s.his.query == query.strip().rstrip(";")  # validated exactly as if written inline


def test_a_query_file_that_cannot_be_read_or_competes_with_the_query_is_named(tmp_path: Path) -> None:
    msg = problems_of(tmp_path, MINIMAL_FILE)
    assert "his.query_file" in msg and str(tmp_path / "sql" / "his-query.sql") in msg
    assert "his.query: required" not in msg  # the cause is said once
    both = MINIMAL_FILE + "  query: SELECT * FROM v WHERE a >= :since AND a < :until\n"
    assert "give either his.query or his.query_file, not both" in problems_of(tmp_path, both)


def test_the_unedited_production_example_names_each_placeholder(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "settings.prod.example.yaml"
    creds = tmp_path / "credentials"
    creds.mkdir()
    for name, value in (("app_key", "k" * 40), ("password", "pw-1234"), ("his_url", "sqlite:///his.db")):
        secret_file(creds, name, value)
    with pytest.raises(ConfigError) as info:
        load(example, env={"CREDENTIALS_DIRECTORY": str(creds)})
    problems = info.value.problems
    placeholders = [p for p in problems if "still the example's placeholder" in p]
    assert {p.split(":")[0] for p in placeholders} == {"institution.name", "institution.county_code", "upstream.username"}
    assert len(problems) == len(placeholders)  # nothing else is wrong with the example


def test_a_retired_setting_draws_a_deprecation_warning(tmp_path: Path) -> None:
    from sync.settings_file import DeprecatedSettingWarning

    text = MINIMAL_FILE.replace("  query_file: sql/his-query.sql\n", '  query: "SELECT * FROM v WHERE a >= :since AND a < :until"\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_text(tmp_path, text)
        assert not [w for w in caught if issubclass(w.category, DeprecatedSettingWarning)]
        load_text(tmp_path, text + "retry:\n  give_up_after_h: 72\n")
    (warning,) = [w for w in caught if issubclass(w.category, DeprecatedSettingWarning)]
    assert "retry.give_up_after_h" in str(warning.message) and "delete this line" in str(warning.message)
