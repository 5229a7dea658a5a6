#!/usr/bin/env bash
# Checks the .deb that build-deb.sh made, with the real tools:
#   1. its contents: binary, unit, man pages usher(1) and usher.toml(5), and a postrm (and
#      no demo: the fakes are usher-sandbox's, not the product's); a maintainer that is not a placeholder;
#      a version that is the changelog's top entry;
#   2. lintian: no error and no warning (but initial-upload-closes-no-bugs, which is about
#      the Debian archive's ITP bug, not the package); skipped without lintian
#      (apt-get install lintian);
#   3. with --install, as root: dpkg -i, the user and /var/lib/usher exist, `usher validate`
#      runs from / on the packaged configuration; dpkg -r keeps the state and the user; dpkg
#      --purge removes both, and /etc/usher. This changes the machine (it installs usher
#      and purges it again); do not run it where usher is installed for real.
set -euo pipefail
cd "$(dirname "$0")/.."
# Where build-deb.sh put it: Cargo's target directory (CARGO_TARGET_DIR, else ./target).
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
deb=$(ls -t "$target"/debian/usher_*.deb | head -n1)
fail=0
ok() { echo "ok: $*"; }
bad() { echo "FAIL: $*"; fail=1; }

contents=$(dpkg-deb -c "$deb")
for path in ./usr/bin/usher ./usr/lib/systemd/system/usher.service \
    ./usr/share/man/man1/usher.1.gz ./usr/share/man/man5/usher.toml.5.gz \
    ./etc/usher/usher.toml; do
    if grep -q " $path\$" <<<"$contents"; then ok "$path"; else bad "$path missing"; fi
done
if grep -q 'usr/share/usher/demo' <<<"$contents"; then bad "the demo is shipped"; else ok "no demo shipped"; fi
ctl=$(mktemp -d)
trap 'rm -rf "$ctl"' EXIT
dpkg-deb -e "$deb" "$ctl"
if grep -q 'if \[ "$1" = "purge" \]' "$ctl/postrm" && grep -q 'rm -rf /var/lib/usher' "$ctl/postrm"; then
    ok "postrm removes the state on purge"
else
    bad "postrm without the purge step"
fi
version=$(dpkg-deb -f "$deb" Version)
top=$(sed -n '1s/^usher (\([^)]*\)).*/\1/p' packaging/debian/changelog)
if [ "$version" = "$top" ]; then
    ok "Version $version is the changelog's top entry"
else
    bad "Version $version, but the changelog's top entry is $top (set \`revision\` in Cargo.toml)"
fi
maintainer=$(dpkg-deb -f "$deb" Maintainer)
case "$maintainer" in
    *localhost*|*example*|*invalid*|"") bad "placeholder maintainer: $maintainer" ;;
    *) ok "Maintainer: $maintainer" ;;
esac
if dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/man/man5/usher.toml.5.gz | zcat | grep -q 'keep_files'; then
    ok "usher.toml(5) documents log.keep_files"
else
    bad "usher.toml(5) without log.keep_files"
fi

if command -v lintian >/dev/null 2>&1; then
    out=$(lintian --tag-display-limit 0 "$deb" 2>&1 | grep -v 'running with root privileges' |
        grep -v 'initial-upload-closes-no-bugs' || true)
    if grep -qE '^[EW]: ' <<<"$out"; then
        printf '%s\n' "$out"
        bad "lintian reports errors or warnings"
    else
        ok "lintian: no error or warning"
    fi
else
    echo "SKIPPED: lintian is not installed (apt-get install lintian)"
fi

if [ "${1:-}" = "--install" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "--install needs root"; exit 1; }
    dpkg -i "$deb" >/dev/null
    id usher >/dev/null && ok "installed: user usher" || bad "no user usher after install"
    [ -d /var/lib/usher ] && ok "installed: /var/lib/usher" || bad "no /var/lib/usher after install"
    if (cd / && usher validate >/dev/null); then ok "usher validate runs from /"; else bad "usher validate from /"; fi
    # A failed check above must not stop the script with usher installed: the remove and
    # purge below run whatever it found.
    touch /var/lib/usher/marker 2>/dev/null || bad "cannot write in /var/lib/usher"
    dpkg -r usher >/dev/null
    [ -e /var/lib/usher/marker ] && id usher >/dev/null && ok "remove keeps the state and the user" ||
        bad "remove deleted the state or the user"
    dpkg --purge usher >/dev/null
    if [ ! -e /var/lib/usher ] && [ ! -e /etc/usher ] && ! id usher >/dev/null 2>&1 &&
        ! getent group usher >/dev/null; then
        ok "purge removed /var/lib/usher, /etc/usher, the user and the group"
    else
        bad "purge left the state, the user or the group"
    fi
fi
exit "$fail"
