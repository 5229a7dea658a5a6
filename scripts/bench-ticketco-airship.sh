#!/usr/bin/env bash
# Benchmark of the Ticket Co → Airship daily run (issue 5): BOOKINGS bookings across EVENTS
# events. The fakes run in a separate process (`usher-sandbox serve` with seeding flags); usher
# is measured with /usr/bin/time -v: the first run (everything new), then a second run the
# same day with nothing changed (aim: zero writes, under 10% of the first run's cost), and a
# third after a cursor reset (every line checked against the ledger, no page digests).
#
# "Today" is set with libfaketime (`apt-get install faketime`): a release usher reads no
# test clock. DONT_FAKE_MONOTONIC leaves tokio's timers on the real monotonic clock.
#
#   cargo build --release && scripts/bench-ticketco-airship.sh [BOOKINGS] [EVENTS]
set -euo pipefail
BOOKINGS=${1:-100000}
EVENTS=${2:-2000}
USHER=${USHER:-target/release/usher}
SANDBOX=${SANDBOX:-target/release/usher-sandbox}
WORK=$(mktemp -d)
trap 'kill "$SANDBOX_PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT

"$SANDBOX" serve --listen 127.0.0.1:0 --contacts 0 \
  --ticketco-events "$EVENTS" --ticketco-bookings "$BOOKINGS" \
  --ticketco-first-day 2026-06-09 --ticketco-days 30 \
  --ticketco-venues "Oslo Golf,Bergen Bowling,Stavanger Spa,Trondheim Padel" \
  --ticketco-token bench-tc-token --airship-token bench-air-token --airship-account 1 \
  > "$WORK/sandbox.out" 2>/dev/null &
SANDBOX_PID=$!
for _ in $(seq 1 600); do grep -q '^airship-stats ' "$WORK/sandbox.out" 2>/dev/null && break; sleep 0.1; done
TC=$(awk '/^ticketco /{print $2}' "$WORK/sandbox.out")
AIR=$(awk '/^airship /{print $2}' "$WORK/sandbox.out")
STATS=$(awk '/^airship-stats /{print $2}' "$WORK/sandbox.out")
echo bench-tc-token > "$WORK/tc-token"
echo bench-air-token > "$WORK/air-token"
cat > "$WORK/usher.toml" <<TOML
[daemon]
state_dir = "$WORK/state"
[log]
level = "warn"
[connections.tc]
kind = "ticketco"
base_url = "$TC"
api_token_file = "$WORK/tc-token"
[connections.air]
kind = "airship"
base_url = "$AIR"
access_token_file = "$WORK/air-token"
account_id = 1
[streams.bench]
source = "tc"
target = "air"
timezone = "Europe/Oslo"
[streams.bench.airship]
venues = ["Oslo Golf", "Bergen Bowling", "Stavanger Spa", "Trondheim Padel"]
event_tags = ["Golf"]
TOML

fake_ticks() { awk '{print $14 + $15}' "/proc/$SANDBOX_PID/stat"; }
measure() { # label now
  local t0; t0=$(fake_ticks)
  /usr/bin/time -v env TZ=UTC DONT_FAKE_MONOTONIC=1 faketime -f "@$(date -u -d "$2" '+%Y-%m-%d %H:%M:%S')" \
    "$USHER" --config "$WORK/usher.toml" trigger bench \
    > "$WORK/$1.out" 2> "$WORK/$1.time" || true
  local wall user sys rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/{print $2}' "$WORK/$1.time")
  user=$(awk -F': ' '/User time/{print $2}' "$WORK/$1.time")
  sys=$(awk -F': ' '/System time/{print $2}' "$WORK/$1.time")
  rss=$(awk -F': ' '/Maximum resident set size/{print $2}' "$WORK/$1.time")
  local cpu; cpu=$(echo "$user + $sys" | bc)
  local fake; fake=$(echo "scale=2; ($(fake_ticks) - $t0) / $(getconf CLK_TCK)" | bc)
  echo "$1: wall ${wall}  cpu ${cpu}s (user ${user} + sys ${sys})  peak RSS $((rss / 1024)) MiB  (fakes' CPU ${fake}s)"
  echo "  $(head -1 "$WORK/$1.out")"
  echo "  airship after: $(curl -s "$STATS")"
  echo "$cpu" > "$WORK/$1.cpu"
  echo "$wall" > "$WORK/$1.wall"
}
echo "bookings $BOOKINGS, events $EVENTS, usher $($USHER --version)"
echo "airship before: $(curl -s "$STATS")"
measure first-run  2026-06-10T01:00:00Z
measure second-run 2026-06-10T01:30:00Z
# For comparison: a cursor reset forgets the page digests, so this run checks every booking
# line against the ledger (what the first run after an upgrade or a mapping change does).
"$USHER" --config "$WORK/usher.toml" cursor reset bench > /dev/null
measure after-reset 2026-06-10T02:00:00Z
secs() { awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }' "$1"; }
echo "second/first: wall $(echo "scale=3; $(secs "$WORK/second-run.wall") / $(secs "$WORK/first-run.wall")" | bc)," \
  "cpu $(echo "scale=3; $(cat "$WORK/second-run.cpu") / $(cat "$WORK/first-run.cpu")" | bc)"
