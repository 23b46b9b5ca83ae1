"""What an operator's terminal and journal receive: no credential and no unmasked ID
number, at debug level, through faults, tracebacks and every command."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus

import pytest
from urllib3.exceptions import InsecureRequestWarning

from sync.errors import ConfigError
from sync.logs import mask_id
from sync.settings import Upstream
from sync.upstream.client import Client
from sync.upstream.simulator import (
    TEST_APP_KEY,
    TEST_APP_KEY_ENCODED,
    TEST_IDS,
    TEST_PASSWORD,
    SimConfig,
    Simulator,
)
from sync.upstream.tokens import MemoryTokenStore
from tests.e2e.test_cli import ROOT, closed_port_fixture, crowd_sync  # noqa: F401 - a fixture
from tests.support import His, his_now, make_visit, write_settings

ID_X = "51010419800101009X"  # check digit X; the HIS holds it with a lower-case x
ID15 = "510100850602003"
ID_IN_TEXT = "510104199001011233"  # typed into a diagnosis by a clerk
WRONG_PASSWORD = "Wrong-Pass-4242!"
DB_PASSWORD = "His-Db-Secret-8812"


def _past(minutes: float) -> dt.datetime:
    return his_now() - dt.timedelta(minutes=minutes)


@dataclass
class Capture:
    """Everything the commands printed, stdout and stderr, labelled by command."""

    parts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        self.parts.append((f"{label} stdout", r.stdout))
        self.parts.append((f"{label} stderr", r.stderr))
        return r

    @property
    def text(self) -> str:
        return "\n".join(text for _, text in self.parts)

    def where(self, needle: str) -> list[str]:
        """The labels of the outputs holding ``needle``, with the line, for a readable failure."""
        hits: list[str] = []
        for label, text in self.parts:
            for line in text.splitlines():
                if needle in line:
                    hits.append(f"{label}: {line[:300]}")
        return hits


def _spawn_to_files(args: list[str], cwd: Path, name: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    # Files, not pipes: a debug-level daemon writes more than a pipe buffer holds while we wait.
    out, err = cwd / f"{name}.out", cwd / f"{name}.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sync", *args], cwd=cwd, stdout=fo, stderr=fe,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return proc, out, err


def _wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


def test_a_faulty_debug_run_prints_no_secret_and_no_unmasked_id_number(
    tmp_path: Path, sim: Simulator, closed_port: int
) -> None:
    his_url = f"sqlite:///{tmp_path / 'his.db'}"
    his = His(his_url)
    labelled = [*TEST_IDS, ID_X, ID15]
    sim.add_person(ID_X, xm="孙七", jjxBq=[{"code": "J01.02", "name": "农村低保对象", "remark": None,
                                            "attr1": "1", "attr2": None}])
    sim.add_person(ID15, xm="周八", jjxBq=[{"code": "J01.03", "name": "孤儿", "remark": None,
                                           "attr1": "0", "attr2": None}])
    visits = [
        make_visit(1, changed=_past(90), id_no=TEST_IDS[0]),
        make_visit(2, changed=_past(89), id_no=TEST_IDS[1], diag_name=f"复诊 {ID_IN_TEXT} 随访"),
        make_visit(3, changed=_past(88), id_no=TEST_IDS[2]),
        make_visit(4, changed=_past(87), id_no=ID_X.lower()),
        make_visit(5, changed=_past(86), id_no=ID15),
        # Invalid: a negative fee, and an over-long diagnosis that starts with an ID number.
        make_visit(6, changed=_past(85), id_no=TEST_IDS[0], total=Decimal("-1.00"),
                   diag_name=f"{ID_IN_TEXT}" + "咳" * 200),
        *(make_visit(n, changed=_past(80 - n)) for n in range(7, 13)),  # not in the key population
    ]
    his.insert(visits)
    overrides: dict[str, dict[str, Any]] = {
        "key_crowd": {"source": "lookup"},
        "log": {"format": "json", "level": "debug"},
        "schedule": {"poll_every_s": 5},
        "retry": {"first_delay_s": 1, "max_delay_s": 2},
    }
    write_settings(tmp_path / "settings.yaml", his_url=his_url, outbox_url="sqlite:///outbox.db",
                   base_url=sim.url, overrides=overrides)
    write_settings(tmp_path / "wrong.yaml", his_url=his_url, outbox_url="sqlite:///outbox.db", base_url=sim.url,
                   overrides={**overrides, "upstream": {"password": WRONG_PASSWORD}})
    # An outbox file that is no database, and a HIS that refuses connections.
    (tmp_path / "garbage.db").write_text(f"not a database {TEST_IDS[0]} " * 200, encoding="utf-8")
    write_settings(tmp_path / "broken.yaml", his_url=f"mysql+pymysql://reader:{DB_PASSWORD}@127.0.0.1:{closed_port}/his",
                   outbox_url="sqlite:///garbage.db", base_url=sim.url, overrides=overrides)
    write_settings(tmp_path / "no-his.yaml", his_url=f"mysql+pymysql://reader:{DB_PASSWORD}@127.0.0.1:{closed_port}/his",
                   outbox_url="sqlite:///other.db", base_url=sim.url, overrides=overrides)
    cap = Capture()

    def cli(label: str, *args: str) -> subprocess.CompletedProcess[str]:
        return cap.add(label, crowd_sync(*args, cwd=tmp_path))

    # A wrong password first (a valid shared token would make check skip the login).
    assert cli("check wrong password", "check", "--config", "wrong.yaml").returncode == 2
    assert cli("check", "check", "--config", "settings.yaml").returncode == 0

    # The app key is revoked: sending pauses with a configuration error.
    sim.faults.app_key_revoked = True
    assert cli("once revoked", "once", "--config", "settings.yaml").returncode == 2
    assert "sending paused" in cli("status paused", "status", "--config", "settings.yaml").stdout
    cli("status paused json", "status", "--json", "--config", "settings.yaml")

    # Restored, and now the network misbehaves and the session is pushed out.
    sim.faults.app_key_revoked = False
    sim.faults.next_504 = 3
    sim.faults.next_reset = 2
    sim.kick()
    cli("once faulty", "once", "--config", "settings.yaml")

    cli("lookup", "lookup", TEST_IDS[1], "--config", "settings.yaml")
    cli("lookup json", "lookup", ID_X.lower(), "--json", "--config", "settings.yaml")
    sim.faults.next_504 = 1
    cli("lookup 504", "lookup", ID15, "--config", "settings.yaml")
    # An outbox file that is no database: one paragraph, no traceback.
    assert cli("once on a broken outbox", "once", "--config", "broken.yaml").returncode == 2
    # An unexpected error (a table dropped by hand): the traceback goes to the log, through the same masking.
    tampered = sqlite3.connect(tmp_path / "tampered.db")
    try:
        source = sqlite3.connect(tmp_path / "outbox.db")
        source.backup(tampered)
        source.close()
        tampered.execute("DROP TABLE sync_run")
        tampered.commit()
    finally:
        tampered.close()
    write_settings(tmp_path / "tampered.yaml", his_url=his_url, outbox_url="sqlite:///tampered.db",
                   base_url=sim.url, overrides=overrides)
    assert cli("once on a tampered outbox", "once", "--config", "tampered.yaml").returncode == 1
    assert cli("check unreachable HIS", "check", "--config", "no-his.yaml").returncode == 75
    assert cli("once unreachable HIS", "once", "--config", "no-his.yaml").returncode == 75

    # The daemon, with more faults, until every labelled visit has arrived; then SIGTERM.
    his.insert([make_visit(20, changed=_past(1), id_no=TEST_IDS[2])])
    his.dispose()
    sim.faults.next_504 = 2
    sim.faults.next_reset = 1
    sim.kick()
    proc, out, err = _spawn_to_files(["run", "--config", "settings.yaml"], tmp_path, "run")
    try:
        _wait_for(lambda: {"LSH000001", "LSH000002", "LSH000003", "LSH000004", "LSH000005", "LSH000020"}
                  <= set(sim.records))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    cap.parts.append(("run stdout", out.read_text(encoding="utf-8")))
    cap.parts.append(("run stderr", err.read_text(encoding="utf-8")))
    assert proc.returncode == 0, cap.parts[-1][1][-2000:]

    final = json.loads(cli("status json", "status", "--json", "--config", "settings.yaml").stdout)
    cli("status", "status", "--config", "settings.yaml")

    # -- what was there to leak
    db = sqlite3.connect(tmp_path / "outbox.db")
    try:
        stored_token = db.execute("SELECT token FROM sync_token").fetchone()[0]
    finally:
        db.close()
    used_tokens = {r.headers["accesstoken"] for r in sim.requests_log if r.headers.get("accesstoken")}
    # Every token the simulator issued, used or not (it keeps them as its session keys).
    with sim._lock:
        issued_tokens = set(sim._sessions)
    tokens = {stored_token, *used_tokens, *issued_tokens}
    secrets = {
        parse_qs(r.raw_query)["hie_secret"][0] for r in sim.requests_log if "hie_secret=" in r.raw_query
    }
    card_numbers = {v["id_no"] for v in visits} | {ID_X, ID_IN_TEXT} | set(labelled)

    # The run did what the scenario says, so the capture holds every kind of line.
    assert sim.counters["logins"] >= 3 and len(tokens) >= 3
    assert sim.faults.next_504 == 0 and sim.faults.next_reset == 0  # every injected fault was met
    assert final["counts"].get("invalid") == 1 and final["counts"].get("skipped") == 6
    assert final["config_error"] is None
    text = cap.text
    for needed in ("urllib3", "Traceback", "sending_paused", "token_refused", "upstream_error", "label_lookup",
                   "unexpected_error", "his_unreachable", "login_succeeded"):
        assert needed in text, needed
    for number in labelled:
        assert mask_id(number.upper()) in text, number  # ID numbers do appear, masked
    # The one typed into a diagnosis reached the log only as a SQL parameter: no longer at all.
    assert mask_id(ID_IN_TEXT) not in text

    # -- and none of it may appear
    forbidden: dict[str, str] = {
        "password": TEST_PASSWORD,
        "wrong password": WRONG_PASSWORD,
        "app key (decoded)": TEST_APP_KEY,
        "app key (encoded)": TEST_APP_KEY_ENCODED,
        "app key (form-encoded)": quote_plus(TEST_APP_KEY),
        "app key (JSON-escaped)": json.dumps(TEST_APP_KEY)[1:-1],
        "app key (a middle piece)": TEST_APP_KEY[40:64],
        "password (percent-encoded)": quote(TEST_PASSWORD, safe=""),
        "HIS database password": DB_PASSWORD,
    }
    forbidden |= {f"token {t[:6]}…": t for t in tokens}
    forbidden |= {f"hie_secret {s[:6]}…": s for s in secrets}
    for number in card_numbers:
        forbidden[f"ID number {mask_id(number)}"] = number
        forbidden[f"ID number {mask_id(number)} (lower x)"] = number.lower()
    leaks = {name: cap.where(value)[:3] for name, value in forbidden.items() if value in text}
    assert not leaks, json.dumps(leaks, ensure_ascii=False, indent=1)
    signed = re.findall(r"hie_(?:app_key|secret)=(?!\[secret\])[^&\s\"',]+", text)
    assert not signed, signed[:5]
    assert len(secrets) >= 10


# -- secrets handling ---------------------------------------------------------------------


def test_a_secret_file_readable_by_others_draws_a_warning_naming_chmod(tmp_path: Path, sim: Simulator) -> None:
    secret = tmp_path / "password"
    secret.write_text(TEST_PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o644)
    path = tmp_path / "settings.yaml"
    write_settings(path, his_url="sqlite:///his.db", outbox_url="sqlite:///o.db", base_url=sim.url)
    text = path.read_text(encoding="utf-8").replace(f"password: {TEST_PASSWORD}", f"password_file: {secret}")
    assert "password_file" in text
    path.write_text(text, encoding="utf-8")

    loose = crowd_sync("migrate", "--config", "settings.yaml", cwd=tmp_path)
    secret.chmod(0o600)
    tight = crowd_sync("status", "--config", "settings.yaml", cwd=tmp_path)

    assert loose.returncode == 0, loose.stderr
    warning = next(json.loads(line) for line in loose.stderr.splitlines()
                   if "secret_file_readable_by_others" in line)
    assert warning["level"] == "warning"
    assert f"chmod 600 {secret}" in warning["detail"]
    assert "secret_file_readable_by_others" not in tight.stderr
    assert TEST_PASSWORD not in loose.stdout + loose.stderr


def test_verify_tls_false_with_https_is_warned_at_start_of_every_command(tmp_path: Path) -> None:
    write_settings(
        tmp_path / "settings.yaml", his_url="sqlite:///his.db", outbox_url="sqlite:///o.db",
        base_url="https://127.0.0.1:9", overrides={"upstream": {"verify_tls": False}},
    )
    His(f"sqlite:///{tmp_path / 'his.db'}").dispose()

    status = crowd_sync("status", "--config", "settings.yaml", cwd=tmp_path)
    proc, _out, err = _spawn_to_files(["run", "--config", "settings.yaml"], tmp_path, "run")
    try:
        _wait_for(lambda: "tls_verification_disabled" in err.read_text(encoding="utf-8"), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    for stderr in (status.stderr, err.read_text(encoding="utf-8")):
        line = next(json.loads(x) for x in stderr.splitlines() if "tls_verification_disabled" in x)
        assert line["level"] == "warning"
        assert line["setting"] == "upstream.verify_tls"


# A real TLS server with a self-signed certificate: the client must refuse it by default.


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class _LoginOnly(BaseHTTPRequestHandler):
    """Answers any POST like a successful platform login; enough to see TLS succeed or fail."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"code": 200, "data": {"token": "tls-test-token"}, "success": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def https_url(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LoginOnly)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", cert
    finally:
        server.shutdown()
        server.server_close()


def _upstream(base_url: str, **extra: Any) -> Upstream:
    return Upstream(
        base_url=base_url, app_key=TEST_APP_KEY, username="ceshi-rybq", password=TEST_PASSWORD,  # type: ignore[arg-type]
        timeout_s=5, **extra,
    )


def test_tls_is_verified_by_default(https_url: tuple[str, Path]) -> None:
    url, cert = https_url
    assert _upstream(url).verify_tls is True

    with Client(_upstream(url), MemoryTokenStore()) as client, pytest.raises(ConfigError) as refused:
        client.login()
    assert "TLS verification" in refused.value.message
    assert "upstream.ca_bundle" in refused.value.hint

    # The hospital's own CA file makes the same server trusted; switching verification off does too.
    with Client(_upstream(url, ca_bundle=str(cert)), MemoryTokenStore()) as client:
        assert client.login().value == "tls-test-token"
    with (
        Client(_upstream(url, verify_tls=False), MemoryTokenStore()) as client,
        pytest.warns(InsecureRequestWarning),
    ):
        assert client.login().value == "tls-test-token"
