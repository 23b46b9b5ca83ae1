"""The systemd units in deploy/ and the install step that picks one by `systemctl --version`.

Real systemd is not started here; a fake `systemctl` answers `--version` as each
distribution's does, and this machine's `systemd-analyze verify` checks what gets installed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install-service.sh"

# The first systemd that knows each directive (from systemd's NEWS): none may reach an older one.
SINCE = {
    "LoadCredential": 247, "ProtectProc": 247, "ProtectClock": 245, "ProtectKernelLogs": 244,
    "ProtectHostname": 242, "RestrictSUIDSGID": 242, "SystemCallFilter": 239, "StateDirectory": 235,
    "StateDirectoryMode": 235, "LockPersonality": 235, "RestrictNamespaces": 233, "ProtectKernelTunables": 232,
    "ProtectKernelModules": 232, "ProtectControlGroups": 232, "CPUWeight": 232, "MemoryMax": 231,
    "RestrictRealtime": 231, "StartLimitIntervalSec": 230,
}
# Versions as distributions print them: CentOS 7, RHEL 8, Kylin V10 / openEuler, the last without
# LoadCredential=, the first with it, Debian 12.
VERSIONS = {
    219: "systemd 219\n+PAM +AUDIT +SELINUX +IMA -APPARMOR +SMACK +SYSVINIT +UTMP +LIBCRYPTSETUP",
    239: "systemd 239 (239-74.el8_8.5)\n+PAM +AUDIT +SELINUX +IMA -APPARMOR +SMACK +SYSVINIT",
    243: "systemd 243 (243-44.ky10)\n+PAM +AUDIT +SELINUX",
    246: "systemd 246 (246.6-1)\n+PAM",
    247: "systemd 247 (247.3-7+deb11u4)\n+PAM +AUDIT",
    252: "systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT +SELINUX +APPARMOR",
}


def fake_systemctl(where: Path, version_text: str) -> Path:
    """A `systemctl` that answers --version with ``version_text`` and records every other call."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "version.txt").write_text(version_text + "\n", encoding="utf-8")
    exe = where / "systemctl"
    exe.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then cat "{where}/version.txt"; exit 0; fi\n'
        f'echo "$@" >> "{where}/calls"\n',
        encoding="utf-8",
    )
    exe.chmod(0o755)
    return exe


def install(*args: str, systemctl: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), *args], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "SYSTEMCTL": str(systemctl)},
    )


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_the_unit_installed_for_each_systemd_holds_only_what_it_knows(tmp_path: Path, version: int) -> None:
    r = install("--print", systemctl=fake_systemctl(tmp_path, VERSIONS[version]))
    assert r.returncode == 0, r.stderr
    unit = r.stdout
    found = directives(unit)
    assert not re.search(r"^#@", unit, re.M)  # every version mark resolved
    too_new = {k: SINCE[k] for k in found if SINCE.get(k, 0) > version}
    assert not too_new, f"systemd {version} does not know {too_new}"
    assert ("LoadCredential" in found) == (version >= 247)
    if version < 247:
        # No credentials copied: the settings still find the files under ${CREDENTIALS_DIRECTORY}.
        assert "CREDENTIALS_DIRECTORY=/etc/crowd-sync/credentials" in found["Environment"]

    # A configuration error stops; what may pass by itself is retried, for as long as it lasts.
    assert found["RestartPreventExitStatus"] == ["2"]
    assert found["Restart"] == ["on-failure"]
    interval = int((found.get("StartLimitIntervalSec") or found["StartLimitInterval"])[0])
    burst = int(found["StartLimitBurst"][0])
    restart_s = int(found["RestartSec"][0])
    assert burst > interval // restart_s + 1
    assert found["EnvironmentFile"] == ["-/etc/crowd-sync/crowd-sync.env"]
    assert found["ExecStart"][0].startswith("/opt/crowd-sync/.venv/bin/crowd-sync run")
    # Resources beside the HIS, and hardening as far as this systemd goes.
    assert "MemoryMax" in found or "MemoryLimit" in found
    assert "CPUWeight" in found or "CPUShares" in found
    assert found["IOSchedulingClass"] == ["best-effort"]
    expected = {"NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "CapabilityBoundingSet", "RestrictAddressFamilies", "SystemCallArchitectures"}
    expected |= {k for k, since in SINCE.items() if since <= version and k not in ("CPUWeight", "MemoryMax")}
    if version < 235:
        expected -= {"StateDirectory", "StateDirectoryMode"}
    assert expected <= set(found), expected - set(found)
    if version >= 247:
        assert found["ProtectProc"] == ["invisible"] and found["SystemCallFilter"] == ["@system-service"]
        assert unit == (ROOT / "deploy" / "crowd-sync.service").read_text(encoding="utf-8")


def test_the_oldest_systemd_makes_the_state_directory_itself(tmp_path: Path) -> None:
    unit = install("--print", systemctl=fake_systemctl(tmp_path, VERSIONS[219])).stdout
    found = directives(unit)
    assert "StateDirectory" not in found and "WorkingDirectory" not in found
    assert found["ExecStartPre"] == ["/usr/bin/install -d -o crowd-sync -g crowd-sync -m 0700 /var/lib/crowd-sync"]
    assert found["ProtectSystem"] == ["full"]  # strict arrived in 232; full leaves /var writable


def test_install_writes_the_unit_reloads_and_keeps_the_previous_one(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    systemctl = fake_systemctl(tmp_path / "bin", VERSIONS[239])
    r = install("--unit-dir", str(units), systemctl=systemctl)
    assert r.returncode == 0, r.stderr
    target = units / "crowd-sync.service"
    assert "crowd-sync-legacy.service" in r.stderr and "systemd 239" in r.stderr
    assert "chown -R crowd-sync:crowd-sync /etc/crowd-sync/credentials" in r.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert "LoadCredential" not in directives(target.read_text(encoding="utf-8"))
    assert (tmp_path / "bin" / "calls").read_text(encoding="utf-8").split() == ["daemon-reload"]

    # The same again: nothing to change. After an upgrade of systemd: the modern unit, the old one kept.
    assert "up to date" in install("--unit-dir", str(units), systemctl=systemctl).stderr
    (tmp_path / "bin" / "version.txt").write_text(VERSIONS[252] + "\n", encoding="utf-8")
    r = install("--unit-dir", str(units), systemctl=systemctl)
    assert r.returncode == 0, r.stderr
    assert "LoadCredential" in directives(target.read_text(encoding="utf-8"))
    assert "LoadCredential" not in directives((units / "crowd-sync.service.previous").read_text(encoding="utf-8"))
    assert [p.name for p in units.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize(
    ("version_text", "message"),
    [("bash: systemctl: command not found", "cannot read the systemd version"),
     ("systemd 208\n+PAM", "too old")],
)
def test_install_refuses_what_it_cannot_serve(tmp_path: Path, version_text: str, message: str) -> None:
    r = install("--print", systemctl=fake_systemctl(tmp_path, version_text))
    assert r.returncode == 2
    assert message in r.stderr and r.stdout == ""


@pytest.mark.parametrize("version", [219, 239, 252])
def test_systemd_analyze_verify_accepts_each_unit(tmp_path: Path, version: int) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if IN_CI:
            pytest.fail("CI checks the units with systemd-analyze verify")
        pytest.skip("systemd-analyze is not installed here")
    unit = install("--print", systemctl=fake_systemctl(tmp_path / "bin", VERSIONS[version])).stdout
    # The program the unit starts must exist for verify: this interpreter stands in for it.
    unit = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", unit, flags=re.M)
    (tmp_path / "crowd-sync.service").write_text(unit, encoding="utf-8")
    r = subprocess.run([analyze, "verify", "./crowd-sync.service"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    complaints = [line for line in (r.stdout + r.stderr).splitlines()
                  # This machine's systemd is newer than 231: it calls CentOS 7's names deprecated.
                  if not re.search(r"Unit uses (MemoryLimit|CPUShares)=", line)]
    assert complaints == []
    if version >= 232:
        assert not {"MemoryLimit", "CPUShares"} & set(directives(unit))
