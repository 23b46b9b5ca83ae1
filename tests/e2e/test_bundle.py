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
    normalize,
    target_platforms,
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
    """The archive unpacked on the 'server', as ``tar xzf`` does."""
    where = tmp_path_factory.mktemp("server")
    with tarfile.open(built.archive) as tar:
        tar.extractall(where, filter="tar")
    return where / f"crowd-sync-{__version__}"


@pytest.fixture(scope="module")
def prefix(unpacked: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``./install.sh PREFIX`` with the network forbidden."""
    prefix = tmp_path_factory.mktemp("opt") / "crowd-sync"
    r = _install(unpacked, prefix)
    assert r.returncode == 0, r.stdout + r.stderr
    return prefix


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
    pins = dict(line.split("==") for line in (unpacked / "requirements.txt").read_text().splitlines() if "==" in line)
    assert pins[normalize("crowd-sync")] == __version__
    # Every runtime dependency, transitively, at the version the tests ran against.
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

    # A broken bundle (a wheel missing) fails, and the working venv is put back.
    broken = tmp_path / unpacked.name
    shutil.copytree(unpacked, broken)
    next((broken / "wheelhouse").glob("structlog-*.whl")).unlink()
    r = _install(broken, prefix)
    assert r.returncode != 0
    assert "installation failed" in r.stderr
    assert _run(exe, "--version", cwd=tmp_path).stdout.strip() == f"crowd-sync {__version__}"


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
