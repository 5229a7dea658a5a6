#!/bin/sh
# Static checks for the systemd files in this folder; needs no running systemd.
#
#   1. systemd-analyze verify usher.service must succeed and print nothing
#      about usher (it exits 0 on warnings such as unknown keys, so its output
#      is checked too).
#   2. systemd-analyze security --offline=yes must rate the unit at 2.0 or
#      lower (--threshold takes tenths: 20 means 2.0).
#   3. usher.sysusers and usher.tmpfiles must apply cleanly to a scratch root
#      (only as root, since tmpfiles chowns; skipped otherwise).
#
# verify checks that ExecStart's binary exists. So that this works without
# usher installed, it checks a temporary copy of the unit whose ExecStart
# points at /bin/true (same arguments); nothing outside a temp dir is touched.
#
# Exits 0 with a message when systemd-analyze is not installed
# (apt-get install systemd).
set -u

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check.sh: SKIP: systemd-analyze not installed (apt-get install systemd)"
    exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
unit="$here/usher.service"
max_exposure_tenths=20

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM
fail=0

# The copy keeps the name usher.service: verify and security report by name.
sed 's#^\(Exec[A-Za-z]*\)=/usr/bin/usher #\1=/bin/true #' "$unit" >"$tmp/usher.service"
if ! grep -q '^ExecStart=/bin/true run ' "$tmp/usher.service"; then
    echo "check.sh: FAIL: ExecStart=/usr/bin/usher ... not found in $unit"
    exit 1
fi
# A reload must report the daemon's verdict: `usher reload` waits for it, a bare
# signal (kill -HUP) would make `systemctl reload` succeed on a refused config.
if ! grep -q '^ExecReload=/bin/true reload ' "$tmp/usher.service"; then
    echo "check.sh: FAIL: ExecReload must run /usr/bin/usher reload (it waits for the daemon's verdict)"
    exit 1
fi

echo "== systemd-analyze verify (ExecStart -> /bin/true in a temp copy)"
# --man=no: the man pages in Documentation= are installed by the package, not here.
out=$(cd "$tmp" && systemd-analyze verify --man=no ./usher.service 2>&1)
rc=$?
[ -n "$out" ] && printf '%s\n' "$out"
if [ "$rc" -ne 0 ] || printf '%s\n' "$out" | grep -q usher; then
    echo "verify: FAIL (exit $rc)"
    fail=1
else
    echo "verify: OK"
fi

echo "== systemd-analyze security --offline=yes (exposure must be <= 2.0)"
if systemd-analyze security --help 2>&1 | grep -q -- '--threshold'; then
    out=$(cd "$tmp" && systemd-analyze security --offline=yes \
        --threshold="$max_exposure_tenths" ./usher.service 2>&1)
    rc=$?
    printf '%s\n' "$out" | grep 'Overall exposure level'
    if [ "$rc" -ne 0 ]; then
        printf '%s\n' "$out" | grep '✗'
        echo "security: FAIL (exit $rc; exposure must be <= 2.0)"
        fail=1
    else
        echo "security: OK"
    fi
else
    # Older systemd without --threshold: parse the score ourselves.
    out=$(cd "$tmp" && systemd-analyze security --offline=yes ./usher.service 2>&1)
    line=$(printf '%s\n' "$out" | grep 'Overall exposure level')
    echo "$line"
    score=$(printf '%s\n' "$line" | sed -n 's/.*: *\([0-9][0-9]*\.[0-9]\).*/\1/p')
    if [ -z "$score" ]; then
        printf '%s\n' "$out"
        echo "security: FAIL (no exposure level found)"
        fail=1
    elif awk -v s="$score" 'BEGIN { exit !(s > 2.0) }'; then
        printf '%s\n' "$out" | grep '✗'
        echo "security: FAIL ($score > 2.0)"
        fail=1
    else
        echo "security: OK"
    fi
fi

echo "== sysusers + tmpfiles on a scratch root"
if [ "$(id -u)" -ne 0 ]; then
    echo "sysusers/tmpfiles: SKIP (needs root to chown in the scratch root)"
elif command -v systemd-sysusers >/dev/null 2>&1 && command -v systemd-tmpfiles >/dev/null 2>&1; then
    root="$tmp/root"
    mkdir -p "$root/etc"
    if systemd-sysusers --root="$root" "$here/usher.sysusers" >"$tmp/log" 2>&1 &&
        systemd-tmpfiles --create --root="$root" "$here/usher.tmpfiles" >>"$tmp/log" 2>&1 &&
        [ "$(stat -c %a "$root/var/lib/usher/control")" = 700 ]; then
        echo "sysusers/tmpfiles: OK"
    else
        cat "$tmp/log"
        echo "sysusers/tmpfiles: FAIL"
        fail=1
    fi
else
    echo "sysusers/tmpfiles: SKIP (systemd-sysusers or systemd-tmpfiles missing)"
fi

exit "$fail"
