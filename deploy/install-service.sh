#!/usr/bin/env bash
# 安装 crowd-sync 的 systemd 单元，按本机 systemd 版本选择 / install the crowd-sync systemd unit that fits this systemd
#
#   deploy/install-service.sh            以 root 运行 / as root: write /etc/systemd/system/crowd-sync.service, daemon-reload
#   deploy/install-service.sh --print    只打印将安装的单元 / only print the unit it would install
#   deploy/install-service.sh --unit-dir DIR    安装到别处 / install somewhere else
#
# systemd >= 247: deploy/crowd-sync.service as it is (LoadCredential=, full hardening).
# systemd 219-246 (RHEL/CentOS 7 and 8, many domestic server OSes): deploy/crowd-sync-legacy.service,
# with its "#@since N" / "#@before N" lines turned on or dropped for this version, so that
# nothing this systemd does not know reaches it.
# SYSTEMCTL=/path/to/systemctl picks another systemctl (the version is read from it).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SYSTEMCTL=${SYSTEMCTL:-systemctl}
UNIT_DIR=/etc/systemd/system
PRINT=0
MODERN=247     # LoadCredential= and ProtectProc= arrived in systemd 247
OLDEST=219     # CentOS 7; older ones lack what the legacy unit needs (Type=notify watchdog, ProtectSystem=)

say() { printf '%s\n' "$*" >&2; }
die() { say "install-service.sh: $*"; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --print) PRINT=1 ;;
        --unit-dir) [ $# -ge 2 ] || die "--unit-dir needs a directory"; UNIT_DIR=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

# "systemd 239 (239-74.el8_8)" -> 239
version_line=$("$SYSTEMCTL" --version 2>/dev/null | head -n 1 || true)
VERSION=$(printf '%s\n' "$version_line" | sed -n 's/^systemd \([0-9][0-9]*\).*/\1/p')
[ -n "$VERSION" ] || die "无法读取 systemd 版本 / cannot read the systemd version from '$SYSTEMCTL --version' (got: ${version_line:-nothing}); is this a systemd system?"
[ "$VERSION" -ge "$OLDEST" ] || die "systemd $VERSION 太旧 / is too old: crowd-sync's unit needs systemd $OLDEST or newer"

# The unit for this version: the modern one as it is, or the legacy one with its
# version-marked lines resolved.
render() {
    if [ "$VERSION" -ge "$MODERN" ]; then
        cat "$HERE/crowd-sync.service"
    else
        awk -v v="$VERSION" '
            /^#@since [0-9]+ /  { if (v + 0 >= $2 + 0) { sub(/^#@since [0-9]+ /, "");  print } next }
            /^#@before [0-9]+ / { if (v + 0 <  $2 + 0) { sub(/^#@before [0-9]+ /, ""); print } next }
            { print }
        ' "$HERE/crowd-sync-legacy.service"
    fi
}

if [ "$VERSION" -ge "$MODERN" ]; then
    CHOSEN=crowd-sync.service
else
    CHOSEN=crowd-sync-legacy.service
fi

if [ "$PRINT" = 1 ]; then
    render
    exit 0
fi

[ -d "$UNIT_DIR" ] || die "$UNIT_DIR 不存在 / does not exist"
TARGET="$UNIT_DIR/crowd-sync.service"
TMP=$(mktemp "$UNIT_DIR/.crowd-sync.service.XXXXXX")
trap 'rm -f "$TMP"' EXIT
render > "$TMP"
chmod 644 "$TMP"
if [ -f "$TARGET" ] && cmp -s "$TMP" "$TARGET"; then
    say "$TARGET 已是最新 / is up to date (systemd $VERSION: $CHOSEN)"
else
    [ ! -f "$TARGET" ] || cp -p "$TARGET" "$TARGET.previous"
    mv "$TMP" "$TARGET"
    say "已安装 / installed $TARGET (systemd $VERSION: $CHOSEN)"
    [ ! -f "$TARGET.previous" ] || say "原来的单元保留为 / the previous unit is kept as $TARGET.previous"
fi
if command -v systemd-analyze >/dev/null 2>&1; then
    # Warnings about this unit only (a missing /opt/crowd-sync is said plainly below).
    systemd-analyze verify "$TARGET" 2>&1 | grep -F "$(basename "$TARGET")" >&2 || true
fi
"$SYSTEMCTL" daemon-reload

[ -x /opt/crowd-sync/.venv/bin/crowd-sync ] ||
    say "注意 / note: /opt/crowd-sync/.venv/bin/crowd-sync 不存在 / does not exist yet (ExecStart=): install the program first"
if [ "$CHOSEN" = crowd-sync-legacy.service ]; then
    say "systemd $VERSION 没有 LoadCredential=：服务直接读取 /etc/crowd-sync/credentials 下的密钥文件，请交给服务用户："
    say "systemd $VERSION has no LoadCredential=: the service reads the files in /etc/crowd-sync/credentials itself; give them to its user:"
    say "  chown -R crowd-sync:crowd-sync /etc/crowd-sync/credentials && chmod 700 /etc/crowd-sync/credentials && chmod 600 /etc/crowd-sync/credentials/*"
fi
say "下一步 / next: systemctl enable --now crowd-sync && journalctl -u crowd-sync -f"
