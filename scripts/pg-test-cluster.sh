#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests and benchmarks: its own directory and port,
# the server running as the `postgres` user when started as root (CI runs as root), trust
# authentication on 127.0.0.1 only. Prints the URL to put in USHER_TEST_POSTGRES.
#
#   scripts/pg-test-cluster.sh start     # → postgres://usher@127.0.0.1:55432/usher
#   scripts/pg-test-cluster.sh stop
#
# Needs Debian's `postgresql` package (any version): `apt-get install -y postgresql`.
# PGTEST_DIR (default /tmp/usher-pg-test) and PGTEST_PORT (default 55432) move it.
set -euo pipefail
DIR=${PGTEST_DIR:-/tmp/usher-pg-test}
PORT=${PGTEST_PORT:-55432}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
    echo "no PostgreSQL server found under /usr/lib/postgresql: apt-get install -y postgresql" >&2
    exit 1
fi
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "${1:-start}" in
start)
    if [ -f "$DIR/data/postmaster.pid" ] && as_owner "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
        echo "postgres://usher@127.0.0.1:$PORT/usher"
        exit 0
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR"
    if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; fi
    as_owner "$BIN/initdb" -D "$DIR/data" -U usher --auth=trust -E UTF8 --locale=C >"$DIR/initdb.log"
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=128MB" >/dev/null
    as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U usher usher
    echo "postgres://usher@127.0.0.1:$PORT/usher"
    ;;
stop)
    if [ -d "$DIR/data" ]; then as_owner "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null || true; fi
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
