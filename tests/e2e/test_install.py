"""`./run.sh install`: a production .venv with the runtime dependencies and the drivers asked for, no
development tools; the demo runs in it; a missing driver is named with the command that installs it."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from sync.bundle import DEFAULT_INDEX, RegistryUnreachable, check_index
from tests.conftest import IN_CI
from tests.support import write_settings

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _clone(where: Path) -> Path:
    """The project's files as a fresh clone has them (no .venv, no var/)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    where.mkdir()
    with tarfile.open(where / "src.tar", "w") as tar:
        for name in files:
            if (ROOT / name).exists():
                tar.add(ROOT / name, arcname=name)
    with tarfile.open(where / "src.tar") as tar:
        tar.extractall(where, filter="tar")
    (where / "src.tar").unlink()
    return where


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**clean, **(env or {})})


def test_production_install_has_the_runtime_and_the_drivers_asked_for_only(tmp_path: Path) -> None:
    try:
        check_index(DEFAULT_INDEX, timeout=10)
    except RegistryUnreachable as exc:
        if IN_CI:
            pytest.fail(f"CI installs from the package index, which it must reach: {exc}")
        pytest.skip(f"installing needs the package index: {exc}")
    clone = _clone(tmp_path / "crowd-sync")

    bad = _run("./run.sh", "install", "--extras", "mysql,sqlserver", cwd=clone)
    assert bad.returncode == 2 and "sqlserver" in bad.stderr and "mssql" in bad.stderr
    assert not (clone / ".venv").exists()

    r = _run("./run.sh", "install", "--extras", "mysql", cwd=clone)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "crowd-sync" in r.stdout
    listed = _run(str(clone / ".venv" / "bin" / "python"), "-m", "pip", "list", "--format=freeze", cwd=clone)
    installed = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert {"crowd-sync", "sqlalchemy", "alembic", "structlog", "pymysql"} <= installed
    assert not {"pytest", "mypy", "ruff", "oracledb", "pymssql", "psycopg2-binary"} & installed, installed

    # A database whose driver was not asked for: said plainly, with the command that adds it.
    write_settings(tmp_path / "settings.yaml", his_url="sqlite:///his.db",
                   outbox_url="postgresql+psycopg2://crowd@127.0.0.1:5432/outbox", base_url="http://127.0.0.1:9")
    exe = clone / ".venv" / "bin" / "crowd-sync"
    r = _run(str(exe), "status", "--config", str(tmp_path / "settings.yaml"), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "./run.sh install --extras postgresql" in r.stderr and "Traceback" not in r.stderr

    # The runtime alone runs the demo (SQLite and the built-in simulator).
    r = _run(str(exe), "demo", "--dir", str(tmp_path / "demo"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
