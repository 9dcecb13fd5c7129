#!/usr/bin/env bash
# Measures the supervisor, each comparison side by side in one run:
#   1. tail latency during reloads versus steady state (same server, alternating phases);
#   2. throughput through `dream serve` versus the same worker binding its own socket;
#   3. supervisor resident memory and CPU while idle.
# Usage: bench/supervisor.sh [ROUNDS] [SECONDS]   (defaults: 3 rounds of 5 s per phase)
# Needs only a release build; uses `dream check` as the client, on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-5}
cargo build --release -q
DREAM=$PWD/target/release/dream
WORK=$(mktemp -d /tmp/dream-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; chmod -R u+w "$WORK"; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run() { echo "+ $*" >&2; "$@"; }

mkdir -p "$WORK/site/public"
echo '<p>release @RELEASE@</p>' > "$WORK/site/public/index.html"
STAMP='sed -i "s/@RELEASE@/$DREAM_RELEASE/" public/index.html'
mkdir -p "$WORK/root"
"$DREAM" deploy -q --root "$WORK/root" "$WORK/site" --build "$STAMP" >/dev/null
PORT=$(free_port)
"$DREAM" serve -q --root "$WORK/root" --listen 127.0.0.1:$PORT --workers 1 --ready notify -- "$DREAM" static &
SUP=$!
until "$DREAM" status --root "$WORK/root" >/dev/null 2>&1; do sleep 0.1; done
URL=http://127.0.0.1:$PORT/
check() { run "$DREAM" check "$URL" --duration ${SECS}s --connections 32 --json "$@"; }
p() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d$2)" "$1"; }

echo "== 1. p99 during reloads vs steady ($ROUNDS rounds x ${SECS}s each, 32 connections, new connection per request)"
for r in $(seq "$ROUNDS"); do
  S=$(check)
  ( end=$((SECONDS+SECS)); while [ $SECONDS -lt $end ]; do "$DREAM" reload --root "$WORK/root" >/dev/null; sleep 0.25; done ) &
  R=$(check); wait $!
  echo "round $r: steady p99 $(p "$S" "['latency']['p99_us']")us p99.9 $(p "$S" "['latency']['p999_us']")us errors $(p "$S" "['error_total']") | reloading p99 $(p "$R" "['latency']['p99_us']")us p99.9 $(p "$R" "['latency']['p999_us']")us errors $(p "$R" "['error_total']") mixed $(p "$R" "['mixed']") | p99 ratio $(python3 -c "print(round($(p "$R" "['latency']['p99_us']")/$(p "$S" "['latency']['p99_us']"),2))")"
done

echo "== 3. supervisor footprint"
SUPPID=$(pgrep -f "dream serve -q --root $WORK/root" | head -1)
grep VmRSS /proc/$SUPPID/status
T0=$(awk '{print $14+$15}' /proc/$SUPPID/stat); sleep 10; T1=$(awk '{print $14+$15}' /proc/$SUPPID/stat)
echo "idle CPU over 10s: $((T1-T0)) ticks"

echo "== 2. throughput: under dream serve vs the worker binding its own socket (keep-alive, 32 connections)"
DPORT=$(free_port)
(cd "$WORK/root/current" && DREAM_RELEASE=direct exec "$DREAM" static --listen 127.0.0.1:$DPORT 2>/dev/null) &
DIRECT=$!
sleep 0.5
for r in $(seq "$ROUNDS"); do
  A=$(check --keep-alive)
  B=$("$DREAM" check http://127.0.0.1:$DPORT/ --duration ${SECS}s --connections 32 --json --keep-alive --body-pattern 'release (direct)')
  echo "round $r: serve $(p "$A" "['requests_per_s']") req/s | direct $(p "$B" "['requests_per_s']") req/s | ratio $(python3 -c "print(round($(p "$A" "['requests_per_s']")/$(p "$B" "['requests_per_s']"),3))")"
done
kill $DIRECT $SUP
