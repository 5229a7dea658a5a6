#!/usr/bin/env bash
# Builds target/debian/usher_*.deb with cargo-deb: the binary, the systemd unit, sysusers
# and tmpfiles entries, a default /etc/usher/usher.toml (valid as it is: no streams yet),
# man pages and shell completions generated from the CLI. The product only: the fakes, the
# demo and the benchmarks are the workspace's other package (usher-sandbox), not shipped.
# Needs cargo-deb: `cargo install cargo-deb --locked`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Cargo's target directory (CARGO_TARGET_DIR, else ./target): the binary and the .deb are
# there. The generated assets stay in ./target/assets, where Cargo.toml's
# [package.metadata.deb] takes them from (cargo-deb maps only `target/release/` to it).
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
cargo build --release --locked -p usher
rm -rf target/assets && mkdir -p target/assets
"$target/release/usher" generate-assets target/assets
gzip -9n target/assets/man/*.1 target/assets/man5/*.5
# The packaged config: daemon and log settings active, every example connection and stream
# commented out, so that `systemctl enable --now usher` starts cleanly right after install.
awk '/^# ---- Connections/ {c=1} { if (c && $0 !~ /^#/ && $0 != "") print "# " $0; else print }' \
    config/usher.toml > target/assets/usher.toml
"$target/release/usher" --config target/assets/usher.toml --state-dir target/assets/state validate
rm -rf target/assets/state
cargo deb -p usher --no-build --locked
deb=$(ls -t "$target"/debian/usher_*.deb | head -n1)
echo "built $deb ($(du -h "$deb" | cut -f1))"
dpkg-deb -c "$deb"
