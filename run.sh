#!/usr/bin/env bash
# crowd-sync launcher.
#   ./run.sh demo      install into .venv on first use, then run the end-to-end demo
#   ./run.sh test      lint (ruff), type-check (mypy) and the test suite (pytest)
#   ./run.sh bundle    (see docs) build the offline install archive
#   ./run.sh ARGS...   any other arguments go to `crowd-sync`
#   ./run.sh           the daemon with ./settings.yaml
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
STAMP="$VENV/.crowd-sync-installed"

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

install() {
    local py
    py=$(pick_python)
    if [ ! -x "$VENV/bin/python" ]; then
        echo "首次使用：正在创建 $VENV 并安装依赖 / first use: creating $VENV and installing dependencies..." >&2
        "$py" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    touch "$STAMP"
}

# Fast and silent when already installed: reinstall only when the project's
# declared dependencies changed since the last install.
if [ ! -x "$VENV/bin/crowd-sync" ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    install
fi

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
