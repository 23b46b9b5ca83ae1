"""Build the offline install bundle (``./run.sh bundle``, ``python -m sync.bundle``).

Hospital servers on the health private network have no internet, so everything
pip needs travels in one archive::

    crowd-sync-<version>/
      install.sh          verifies everything, then creates <prefix>/.venv and installs from
                          wheelhouse/ with --no-index --require-hashes
      requirements.txt    every wheel in wheelhouse/, pinned (name==version --hash=sha256:...)
      SHA256SUMS          the sha256 of every other file of the bundle (sha256sum -c format)
      BUNDLE-INFO.txt     what it was built for: Python, platform, lowest glibc
      wheelhouse/         the project wheel, its runtime dependencies with every database
                          driver that installs from a wheel, pip, setuptools, wheel
      README*.md, settings.yaml, deploy/, docs/

Runtime dependencies are pinned to what is installed in the virtualenv running
this module (the versions the test suite ran against), for this interpreter's
Python version and platform. Only wheels go in: installing never builds anything.
The build needs the package index; the installation never does.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sync.errors import SyncError

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "crowd-sync"
DEFAULT_INDEX = "https://pypi.org/simple"

# What setuptools needs to build the wheel; copied to a scratch directory so the
# build leaves no build/ or egg-info behind in the checkout.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "sync", "migrations")
# The database drivers the bundle carries (pyproject extras): a server on the private network
# cannot fetch one later. cx_Oracle is left out: it needs Oracle's client libraries.
BUNDLE_EXTRAS = ("mysql", "oracle", "mssql", "postgresql")
# Shipped beside install.sh for the operator (install.sh copies them into the prefix,
# where the systemd unit's Documentation= expects the READMEs).
SHIPPED = ("README.md", "README.zh-CN.md", "settings.yaml", "deploy", "docs")
_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.db", "*.egg-info")

# pip settings that only say how to reach the index (proxy, CA, timeouts) are kept;
# everything else from the builder's environment and pip.conf is dropped, so a
# local mirror, find-links or constraint of this machine cannot leak into the bundle.
_PIP_ENV_KEPT = frozenset(
    {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_CACHE_DIR"}
)


class BundleError(SyncError):
    """The bundle could not be built; ``hint`` says what to do."""


class RegistryUnreachable(BundleError):
    """The package index cannot be reached: the build needs it, the installation does not."""


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """The archive written and what went into it."""

    archive: Path
    sha256_file: Path
    sha256: str
    size: int
    pins: tuple[str, ...]
    glibc: str | None


def normalize(name: str) -> str:
    """PEP 503 name: what pip compares (``PyYAML`` == ``pyyaml``, ``typing_extensions`` == ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_metadata(root: Path = ROOT) -> tuple[str, list[str]]:
    """The project's version and its build-system requirements, from pyproject.toml."""
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    return str(data["project"]["version"]), [str(r) for r in data["build-system"]["requires"]]


def installed_pins() -> dict[str, str]:
    """``pip freeze`` of the running interpreter's environment, without the project itself."""
    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) != PROJECT:
            pins[normalize(name)] = dist.version
    return pins


def target_tag(glibc: str | None = None) -> str:
    """``py311-linux_x86_64`` (or ``py311-manylinux_2_28_x86_64``): what the wheels are chosen for."""
    if glibc is None:
        plat = re.sub(r"[-.]", "_", sysconfig.get_platform())
    else:
        plat = f"manylinux_{glibc.replace('.', '_')}_{platform.machine()}"
    return f"py{sys.version_info.major}{sys.version_info.minor}-{plat}"


def wheel_name_version(filename: str) -> tuple[str, str]:
    """Name and version from a wheel's file name (``PyYAML-6.0.2-cp311-...whl``)."""
    parts = filename[: -len(".whl")].split("-")
    return normalize(parts[0]), parts[1]


_GLIBC_TAG = re.compile(r"manylinux_(\d+)_(\d+)_")
# The legacy manylinux names and the glibc each stands for (PEP 600).
_LEGACY_GLIBC = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def glibc_floor(filenames: Sequence[str]) -> str | None:
    """Lowest glibc on which every wheel installs, or None when all are pure Python.

    A wheel may carry several platform tags (``manylinux2014_x86_64.manylinux_2_28_x86_64``);
    it installs where any one of them does, so the least demanding tag counts.
    """
    floor: tuple[int, int] | None = None
    for name in filenames:
        platforms = name[: -len(".whl")].split("-")[-1].split(".")
        needs: list[tuple[int, int]] = []
        for tag in platforms:
            m = _GLIBC_TAG.match(tag)
            if m:
                needs.append((int(m.group(1)), int(m.group(2))))
            for legacy, version in _LEGACY_GLIBC.items():
                if tag.startswith(legacy + "_"):
                    needs.append(version)
        if needs:
            least = min(needs)
            floor = least if floor is None else max(floor, least)
    return None if floor is None else f"{floor[0]}.{floor[1]}"


def target_platforms(glibc: str, arch: str) -> list[str]:
    """pip ``--platform`` tags for a server with this glibc, most preferred first.

    pip does not widen ``manylinux_2_28`` to the older tags a 2.28 system also runs,
    so every one is listed (PEP 600, and the legacy names PEP 600 maps to).
    """
    m = re.fullmatch(r"2\.(\d+)", glibc)
    if not m or int(m.group(1)) < 5:
        raise BundleError(f"--glibc {glibc!r} is not a glibc version", hint="give it as 2.17, 2.28, ... (ldd --version on the server)")
    minor = int(m.group(1))
    tags = [f"manylinux_2_{n}_{arch}" for n in range(minor, 4, -1)]
    tags += [f"{legacy}_{arch}" for legacy, (_, n) in _LEGACY_GLIBC.items() if n <= minor]
    return tags


def check_index(index_url: str, *, timeout: float = 15) -> None:
    """Raise RegistryUnreachable unless the index answers at all (any HTTP status will do)."""
    probe = index_url.rstrip("/") + "/pip/"
    try:
        with urllib.request.urlopen(probe, timeout=timeout):  # noqa: S310 - the operator's index URL, http(s)
            pass
    except urllib.error.HTTPError:
        return  # it answered: pip will say what is wrong with it
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryUnreachable(
            f"the package index {index_url} is not reachable ({reason})",
            hint="building the bundle downloads the wheels once: run it on a machine with internet access, "
            "or give a reachable mirror with --index-url",
        ) from exc


def pip_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for pip at build time: no pip.conf, no local mirrors, only transport settings."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("PIP_") or k in _PIP_ENV_KEPT}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(args: Sequence[str], *, what: str, index_url: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--index-url", index_url, "--progress-bar", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=pip_env(), check=False)  # noqa: S603 - our own argv
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BundleError(
            f"{what} failed (pip exit {proc.returncode}):\n{tail}",
            hint="a version pinned from .venv may have no wheel for the target (with --glibc: for that glibc) "
            "or be missing from the index, or the network dropped: read pip's message above",
        )


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=_JUNK)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Unpacked as root, the archive must not hand the files to whatever uid built it.
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if info.isdir() or info.name.endswith(".sh"):
        info.mode = 0o755
    else:
        info.mode = 0o644
    return info


# The installer shipped in the archive. @VERSION@, @PYTHON@ and @GLIBC@ are filled in
# by install_script(); everything else is plain bash for the operator to read.
INSTALL_SH = """\
#!/usr/bin/env bash
# crowd-sync @VERSION@ 离线安装 / offline installer: no network, no compiler, no ensurepip needed.
#   ./install.sh [PREFIX]      PREFIX 默认 / defaults to /opt/crowd-sync
# 程序装在 PREFIX/.venv，deploy/crowd-sync.service 的 ExecStart 即 /opt/crowd-sync/.venv/bin/crowd-sync。
# The program goes to PREFIX/.venv: deploy/crowd-sync.service runs /opt/crowd-sync/.venv/bin/crowd-sync.
#   PYTHON=/usr/local/bin/python@PYTHON@ ./install.sh     choose the interpreter
# 安装前先核对：安装包旁的 @ARCHIVE@.sha256（如在），以及 SHA256SUMS 中每个文件的 sha256；
# pip 只安装 requirements.txt 中 sha256 相符的 wheel（--require-hashes）。
# Before installing it verifies @ARCHIVE@ against its .sha256 (when they are beside the
# unpacked directory) and every file against SHA256SUMS; pip installs only wheels whose sha256
# matches requirements.txt (--require-hashes).
# 已有的 PREFIX/.venv 保留为 PREFIX/.venv.previous（回退见 docs/offline-install.md）。
# An existing PREFIX/.venv is kept as PREFIX/.venv.previous (rollback: docs/offline-install.md).
set -Eeuo pipefail
umask 022   # the service user (crowd-sync) must be able to read the program

HERE=$(cd "$(dirname "$0")" && pwd)
VERSION='@VERSION@'
NEED_PYTHON='@PYTHON@'
NEED_GLIBC='@GLIBC@'
ARCHIVE='@ARCHIVE@'
PREFIX=${1:-/opt/crowd-sync}
case "$PREFIX" in
    /*) ;;
    *) PREFIX="$PWD/$PREFIX" ;;   # a venv's scripts name their interpreter by absolute path
esac
PREFIX=${PREFIX%/}
VENV="$PREFIX/.venv"
WHEELHOUSE="$HERE/wheelhouse"

say() { printf '%s\\n' "$*" >&2; }
die() { say "install.sh: $*"; exit 2; }

# -- verify before anything is touched ---------------------------------------------------
command -v sha256sum >/dev/null 2>&1 || die "需要 sha256sum（coreutils）/ needs sha256sum (coreutils) to verify the bundle"
BESIDE=$(cd "$HERE/.." && pwd)
if [ -f "$BESIDE/$ARCHIVE" ] && [ -f "$BESIDE/$ARCHIVE.sha256" ]; then
    (cd "$BESIDE" && sha256sum --check --status "$ARCHIVE.sha256") ||
        die "安装包与其 .sha256 不符（传输中损坏或被替换），拒绝安装；请重新拷贝两个文件、sha256sum -c 通过后重新解压 / $BESIDE/$ARCHIVE does not match its .sha256 (damaged in transit, or replaced): refusing to install; copy both files again, check them with sha256sum -c, and unpack again"
    say "已核对 / verified: $ARCHIVE matches its .sha256"
else
    say "注意 / note: $ARCHIVE 及其 .sha256 不在 $BESIDE，只核对解压出的文件 / $ARCHIVE and its .sha256 are not in $BESIDE: verifying the unpacked files only (check the archive with sha256sum -c where it is)"
fi
[ -f "$HERE/SHA256SUMS" ] || die "$HERE/SHA256SUMS 缺失，安装包不完整 / is missing: the bundle is incomplete, unpack the whole archive again"
if ! bad=$(cd "$HERE" && sha256sum --check --quiet --strict SHA256SUMS 2>&1); then
    die "以下文件与 SHA256SUMS 不符（损坏、缺失或被改动），拒绝安装；请重新完整解压安装包 / these files do not match SHA256SUMS (damaged, missing or changed): refusing to install; unpack the whole archive again:
$bad"
fi
say "已核对 / verified: every file of the bundle matches SHA256SUMS"

python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

if [ -n "${PYTHON:-}" ]; then
    [ "$(python_version "$PYTHON")" = "$NEED_PYTHON" ] ||
        die "PYTHON=$PYTHON 不是 Python $NEED_PYTHON / is not Python $NEED_PYTHON (the wheels are built for it)"
    PY=$("$PYTHON" -c 'import sys; print(sys.executable)')
else
    PY=""
    for c in "python$NEED_PYTHON" python3; do
        if command -v "$c" >/dev/null 2>&1 && [ "$(python_version "$c")" = "$NEED_PYTHON" ]; then
            # the interpreter itself, not a wrapper (pyenv shim) that the venv would otherwise point at
            PY=$("$c" -c 'import sys; print(sys.executable)')
            break
        fi
    done
    [ -n "$PY" ] || die "需要 Python $NEED_PYTHON（wheel 为它编译），请从操作系统安装介质安装，或设置 PYTHON=... / needs Python $NEED_PYTHON (the wheels are built for it): install it from the OS's media, or set PYTHON=/path/to/python$NEED_PYTHON"
fi

if [ -n "$NEED_GLIBC" ]; then
    HAVE_GLIBC=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}' || true)
    if [ -n "$HAVE_GLIBC" ] && ! printf '%s\\n%s\\n' "$NEED_GLIBC" "$HAVE_GLIBC" | sort -V -C; then
        die "本机 glibc $HAVE_GLIBC 低于安装包要求的 $NEED_GLIBC，请用 --glibc $HAVE_GLIBC 重新打包 / this system's glibc $HAVE_GLIBC is older than the $NEED_GLIBC the wheels need: build the bundle again with ./run.sh bundle --glibc $HAVE_GLIBC"
    fi
fi

[ -f "$WHEELHOUSE/crowd_sync-$VERSION-py3-none-any.whl" ] || die "$WHEELHOUSE 不完整 / is incomplete: unpack the whole archive again"

mkdir -p "$PREFIX"
PREVIOUS=""
if [ -e "$VENV" ]; then
    rm -rf "$VENV.previous"
    mv "$VENV" "$VENV.previous"
    PREVIOUS="$VENV.previous"
fi
rollback() {
    say "install.sh: 安装失败，请重新完整解压安装包并核对 sha256 / installation failed: unpack the whole archive again and verify its sha256"
    rm -rf "$VENV"
    if [ -n "$PREVIOUS" ]; then
        mv "$PREVIOUS" "$VENV"
        say "install.sh: 已恢复原来的 / restored the previous $VENV"
    fi
}
trap rollback ERR

say "安装 / installing crowd-sync $VERSION into $VENV ($PY)"
"$PY" -m venv --without-pip "$VENV"
# Only the wheels beside this script, each checked against its sha256 in requirements.txt:
# no index, and no pip.conf of this machine.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# A pip wheel can run itself: it puts pip into the venv without ensurepip (python3-venv) or a network.
# (SHA256SUMS has vouched for it above, before it runs.)
PIP_WHEEL=$(find "$WHEELHOUSE" -maxdepth 1 -name 'pip-*.whl' | head -n 1)
"$VENV/bin/python" "$PIP_WHEEL/pip" install --quiet --no-index --find-links "$WHEELHOUSE" --only-binary=:all: \\
    --require-hashes --requirement "$HERE/requirements.txt"
"$VENV/bin/python" -m pip check >&2
"$VENV/bin/crowd-sync" --version >&2
trap - ERR

# The documents go beside the program (the unit's Documentation= points there);
# a settings.yaml already in PREFIX is the operator's and is never overwritten.
for item in README.md README.zh-CN.md BUNDLE-INFO.txt deploy docs; do
    if [ -e "$HERE/$item" ]; then
        cp -R "$HERE/$item" "$PREFIX/"
    fi
done
if [ -f "$HERE/settings.yaml" ] && [ ! -e "$PREFIX/settings.yaml" ]; then
    cp "$HERE/settings.yaml" "$PREFIX/settings.yaml"
fi

say "完成 / done: $VENV/bin/crowd-sync"
[ -z "$PREVIOUS" ] || say "旧版本保留在 / the previous version is kept in $PREVIOUS"
say "下一步 / next: $PREFIX/docs/offline-install.md"
"""


def install_script(*, version: str, python: str, glibc: str | None, archive: str) -> str:
    """install.sh, with the Python version, glibc floor and archive name of this bundle written in."""
    return (
        INSTALL_SH.replace("@VERSION@", version).replace("@PYTHON@", python).replace("@GLIBC@", glibc or "")
        .replace("@ARCHIVE@", archive)
    )


def hashed_requirements(wheelhouse: Path, *, header: str) -> str:
    """requirements.txt for ``pip install --require-hashes``: every wheel pinned by version and sha256."""
    lines = []
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name, version = wheel_name_version(wheel.name)
        lines.append(f"{name}=={version} --hash=sha256:{_sha256(wheel)}")
    return f"# {header}\n" + "\n".join(lines) + "\n"


def manifest(stage: Path) -> str:
    """SHA256SUMS: every file under ``stage`` but itself, as ``sha256sum -c`` reads it."""
    files = sorted(p for p in stage.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    return "".join(f"{_sha256(p)}  {p.relative_to(stage).as_posix()}\n" for p in files)


def build(*, out_dir: Path, index_url: str = DEFAULT_INDEX, glibc: str | None = None, root: Path = ROOT) -> Bundle:
    """Build the archive in ``out_dir`` and its ``.sha256`` beside it.

    ``glibc`` (``"2.28"``) picks wheels for servers with that glibc or newer; by default
    pip picks the best wheels for this machine, which may need a newer glibc than the server has.
    """
    version, build_requires = project_metadata(root)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    top = f"{PROJECT}-{version}"
    name = f"{PROJECT}-{version}-{target_tag(glibc)}"
    # Wheels for another glibc than this machine's: name the target explicitly.
    target: list[str] = []
    if glibc is not None:
        target = ["--implementation", sys.implementation.name[:2], "--python-version", python]
        for tag in target_platforms(glibc, platform.machine()):
            target += ["--platform", tag]
    check_index(index_url)

    pins = installed_pins()
    build_tools = {normalize(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in build_requires}
    with tempfile.TemporaryDirectory(prefix="crowd-sync-bundle-") as scratch_dir:
        scratch = Path(scratch_dir)
        stage, wheelhouse, src = scratch / top, scratch / top / "wheelhouse", scratch / "src"
        wheelhouse.mkdir(parents=True)
        for item in WHEEL_SOURCES:
            _copy(root / item, src / item)
        runtime_constraints = scratch / "runtime-constraints.txt"
        runtime_constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())), encoding="utf-8")
        # The build tools follow pyproject's [build-system] floor, not .venv's (often older) setuptools;
        # their own dependencies stay pinned to .venv.
        tool_constraints = scratch / "tool-constraints.txt"
        tool_constraints.write_text(
            "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()) if n not in build_tools), encoding="utf-8"
        )

        _pip(["wheel", "--no-deps", "--wheel-dir", str(wheelhouse), str(src)], what="building the project wheel", index_url=index_url)
        project_wheels = [p for p in wheelhouse.glob("*.whl") if wheel_name_version(p.name)[0] == normalize(PROJECT)]
        if len(project_wheels) != 1:
            raise BundleError(f"expected one {PROJECT} wheel, found {[p.name for p in project_wheels]}")
        _pip(
            ["download", "--only-binary=:all:", "--dest", str(wheelhouse),
             "--constraint", str(runtime_constraints), *target, f"{project_wheels[0]}[{','.join(BUNDLE_EXTRAS)}]"],
            what="downloading the runtime dependencies", index_url=index_url,
        )
        # pip bootstraps the new venv from its own wheel (no ensurepip needed); setuptools and
        # wheel come along for anyone who has to build something on the offline server.
        _pip(
            ["download", "--only-binary=:all:", "--dest", str(wheelhouse),
             "--constraint", str(tool_constraints), *target, f"pip=={pins['pip']}" if "pip" in pins else "pip", *build_requires],
            what="downloading pip and the build tools", index_url=index_url,
        )

        wheels = sorted(p.name for p in wheelhouse.glob("*.whl"))
        found = dict(wheel_name_version(w) for w in wheels)
        # The constraints make pip fail rather than drift; this catches a dependency .venv lacks
        # (it would come unpinned, at whatever version the index has today).
        drift = [
            f"{n} {v} (.venv has {pins.get(n, 'none')})"
            for n, v in found.items()
            if n not in build_tools and n != normalize(PROJECT) and pins.get(n) != v
        ]
        if drift:
            raise BundleError(
                f"wheelhouse versions differ from .venv: {', '.join(drift)}",
                hint="reinstall .venv (./run.sh), run the tests, and build again",
            )
        pinned = tuple(f"{n}=={v}" for n, v in sorted(found.items()))
        floor = glibc_floor(wheels)

        (stage / "requirements.txt").write_text(
            hashed_requirements(wheelhouse, header=f"every wheel in wheelhouse/, as installed in the build's .venv ({name})"),
            encoding="utf-8",
        )
        (stage / "BUNDLE-INFO.txt").write_text(
            f"{PROJECT} {version}\npython: {python} ({sys.implementation.name})\ntarget: {target_tag(glibc)}\n"
            f"glibc: {floor or 'any'} or newer\nwheels: {len(wheels)}\n",
            encoding="utf-8",
        )
        script = stage / "install.sh"
        script.write_text(
            install_script(version=version, python=python, glibc=floor, archive=f"{name}.tar.gz"), encoding="utf-8"
        )
        script.chmod(0o755)
        for item in SHIPPED:
            if (root / item).exists():
                _copy(root / item, stage / item)
        # Last: the sha256 of everything above, which install.sh checks before it runs anything.
        (stage / "SHA256SUMS").write_text(manifest(stage), encoding="utf-8")

        archive = _write_archive(stage, out_dir / f"{name}.tar.gz", top=top)

    digest = _sha256(archive)
    sha_file = archive.with_name(archive.name + ".sha256")
    # The format of sha256sum, so `sha256sum -c` checks it on the server.
    sha_file.write_text(f"{digest}  {archive.name}\n", encoding="utf-8")
    return Bundle(archive=archive, sha256_file=sha_file, sha256=digest, size=archive.stat().st_size, pins=pinned, glibc=floor)


def _write_archive(stage: Path, archive: Path, *, top: str) -> Path:
    """``stage`` as ``archive`` (tar.gz, everything under ``top/``), written whole or not at all."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    try:
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(stage, arcname=top, filter=_tar_filter)
        partial.replace(archive)  # never a half-written archive under the final name
    finally:
        partial.unlink(missing_ok=True)
    return archive


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(io.DEFAULT_BUFFER_SIZE * 16), b""):
            h.update(chunk)
    return h.hexdigest()


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./run.sh bundle",
        description="Build the offline install archive: the project wheel, every runtime dependency "
        "pinned to .venv, install.sh, example settings, deploy/ and docs/.",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="directory for the archive (default: dist/)")
    parser.add_argument(
        "--glibc", metavar="X.Y",
        help="oldest glibc of the servers (ldd --version), e.g. 2.17 or 2.28; default: wheels for this machine",
    )
    parser.add_argument("--index-url", default=DEFAULT_INDEX, help=f"package index to download from (default: {DEFAULT_INDEX})")
    args = parser.parse_args(argv)
    try:
        bundle = build(out_dir=args.out.resolve(), index_url=args.index_url, glibc=args.glibc)
    except BundleError as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 2
    print(f"{bundle.archive}  {_size(bundle.size)}  ({len(bundle.pins)} wheels)")
    print(f"{bundle.sha256_file}  sha256 {bundle.sha256}")
    if bundle.glibc:
        print(f"needs Python {sys.version_info.major}.{sys.version_info.minor} and glibc {bundle.glibc} or newer on the server")
    print("安装步骤 / how to install: docs/offline-install.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
