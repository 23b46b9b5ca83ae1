#!/usr/bin/env bash
# crowd-sync launcher.
#   ./run.sh demo      install into .venv on first use, then run the end-to-end demo
#   ./run.sh test      lint (ruff), type-check (mypy) and the test suite (pytest)
#   ./run.sh install [--extras mysql,oracle]
#                      production: .venv with the runtime dependencies and the named database
#                      drivers only (mysql, oracle, cx_oracle, mssql, postgresql, all), no
#                      development tools; also CROWD_SYNC_EXTRAS=mysql ./run.sh install
#   ./run.sh bundle    (see docs) build the offline install archive
#   ./run.sh ARGS...   any other arguments go to `crowd-sync`
#   ./run.sh           the daemon with ./settings.yaml
# pip reads its index from PIP_INDEX_URL or pip.conf, e.g. a mirror:
#   PIP_INDEX_URL=https://pypi.tuna.tsinghua.edu.cn/simple ./run.sh install --extras mysql
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
STAMP="$VENV/.crowd-sync-installed"
KNOWN_EXTRAS="mysql oracle cx_oracle mssql postgresql all"

pick_python() {
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "crowd-sync needs Python 3.11 or newer (python3.11 not found)" >&2
    return 1
}

# The extras the last installation asked for ("dev", or a list such as "mysql,oracle", or "").
installed_extras() {
    [ -f "$STAMP" ] && sed -n 's/^extras=//p' "$STAMP"
}

# install EXTRAS: .venv with the project and those extras (dev: the tests' tools and every driver).
install() {
    local extras=$1 py spec=.
    py=$(pick_python)
    if [ ! -x "$VENV/bin/python" ]; then
        echo "首次使用：正在创建 $VENV 并安装依赖 / first use: creating $VENV and installing dependencies..." >&2
        "$py" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    fi
    [ -z "$extras" ] || spec=".[$extras]"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
    printf 'extras=%s\n' "$extras" > "$STAMP"
}

# Fast and silent when already installed: reinstall only when the project's
# declared dependencies changed since the last install (or the command needs the dev tools).
ensure_installed() {
    local need=${1:-}
    if [ ! -x "$VENV/bin/crowd-sync" ] || [ ! -f "$STAMP" ]; then
        install dev      # a fresh checkout: everything `./run.sh test` and the demo need
    elif [ -n "$need" ] && [ "$(installed_extras)" != "$need" ]; then
        install "$need"
    elif [ pyproject.toml -nt "$STAMP" ]; then
        install "$(installed_extras)"
    fi
}

# ./run.sh install [--extras LIST]: runtime only, plus the drivers named.
production_install() {
    local extras=${CROWD_SYNC_EXTRAS:-} name
    while [ $# -gt 0 ]; do
        case "$1" in
            --extras) [ $# -ge 2 ] || { echo "--extras needs a list, e.g. --extras mysql,oracle" >&2; exit 2; }; extras=$2; shift ;;
            --extras=*) extras=${1#--extras=} ;;
            *) echo "./run.sh install: unknown argument $1; usage: ./run.sh install [--extras mysql,oracle]" >&2; exit 2 ;;
        esac
        shift
    done
    extras=$(printf '%s' "$extras" | tr -d ' ')
    for name in ${extras//,/ }; do
        case " $KNOWN_EXTRAS " in
            *" $name "*) ;;
            *) echo "./run.sh install: 未知的数据库驱动 / unknown extra '$name'; choose from: ${KNOWN_EXTRAS// /, }" >&2; exit 2 ;;
        esac
    done
    if [ -d "$VENV" ] && [ "$(installed_extras)" != "$extras" ]; then
        # A .venv with other extras (the development tools, another driver): start afresh, so
        # that it holds exactly what was asked for.
        echo "重建 / recreating $VENV (it had: $(installed_extras || true))" >&2
        rm -rf "$VENV"
    fi
    install "$extras"
    "$VENV/bin/crowd-sync" --version
    echo "已安装 / installed: $VENV/bin/crowd-sync, database drivers: ${extras:-none (SQLite only)}" >&2
}

case "${1:-}" in
    install)
        shift
        production_install "$@"
        exit 0
        ;;
    test | bundle)
        ensure_installed dev
        ;;
    *)
        ensure_installed
        ;;
esac

export PATH="$PWD/$VENV/bin:$PATH"

case "${1:-}" in
    test)
        shift
        lint_dirs=(sync tests migrations)
        [ -d bench ] && lint_dirs+=(bench)
        ruff check "${lint_dirs[@]}"
        mypy sync
        set +e
        pytest "$@"
        rc=$?
        set -e
        exit $rc
        ;;
    demo)
        shift
        exec crowd-sync demo "$@"
        ;;
    bundle)
        shift
        exec "$VENV/bin/python" -m sync.bundle "$@"
        ;;
    "")
        exec crowd-sync run --config settings.yaml
        ;;
    *)
        exec crowd-sync "$@"
        ;;
esac
