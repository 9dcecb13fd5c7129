#!/usr/bin/env bash
# A canary's share of new connections, measured against the share asked
# for, and the judge's time to a verdict on a failing release.
#
#   bench/canary.sh [ROUNDS]      (default 3)
#
# dream serve --workers 4 -- ./run (dream static) with default flags; for
# each share (1 worker = 25%, 10%, 50%), ROUNDS canary reloads of a new
# release with `--canary SHARE --judge-for 8s`; during each window
# `dream check` (16 connections, a new connection per request, 5 s) counts
# the answers of each release by their X-Dream-Release header. Then ROUNDS
# canaries of a release answering 500 to 20% of requests (the test probe,
# `--fail-percent 20`) with `--judge-path /judge` and default thresholds:
# the time from the canary taking its share to its revert.
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
cargo build --release -q -p dream-testkit --examples
PROBE=$PWD/target/release/examples/dream-probe
ROOT=$WORK/root
mkdir -p "$ROOT/releases"
release() { # ID SCRIPT
  mkdir -p "$ROOT/releases/$1/public"
  echo "<p>release $1</p>" > "$ROOT/releases/$1/public/index.html"
  printf '#!/bin/sh\n%s\n' "$2" > "$ROOT/releases/$1/run"; chmod +x "$ROOT/releases/$1/run"
}
switch() { ln -sfn "releases/$1" "$ROOT/.current.tmp" && mv -T "$ROOT/.current.tmp" "$ROOT/current"; }
STATIC="exec $DREAM static"
release r0 "$STATIC"; switch r0
PORT=$(free_port)
$DREAM serve --root "$ROOT" --listen 127.0.0.1:$PORT --workers 4 -- ./run 2> "$WORK/serve.log" &
wait_http "http://127.0.0.1:$PORT/index.html"
wait_canary() { # until status shows a canary taking its share
  for _ in $(seq 400); do
    $DREAM status --root "$ROOT" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(g["state"]=="canary" for g in d["pool"]["generations"]) else 1)' && return 0
    sleep 0.05
  done; return 1
}
n=0
printf '%-8s %-6s %8s %8s %8s\n' share round canary live measured
for share in 1 10% 50%; do
  for r in $(seq "$ROUNDS"); do
    n=$((n+1)); release "s$n" "$STATIC"; switch "s$n"
    $DREAM reload --root "$ROOT" --canary "$share" --judge-for 8s > "$WORK/reload.out" 2>&1 &
    rp=$!
    wait_canary
    $DREAM check "http://127.0.0.1:$PORT/index.html" --duration 5s --connections 16 --json > "$WORK/check.json" || true
    wait $rp
    python3 - "$WORK/check.json" "s$n" "$share" "$r" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); new = sys.argv[2]
c = d["releases"].get(new, 0); l = sum(v for k, v in d["releases"].items() if k != new)
print(f"{sys.argv[3]:<8} {sys.argv[4]:<6} {c:>8} {l:>8} {c / max(c + l, 1):>8.3f}")
PY
  done
done
echo
echo "time to a verdict: a release failing 20% of /judge, --canary 1, default thresholds"
for r in $(seq "$ROUNDS"); do
  n=$((n+1)); release "f$n" "exec $PROBE --serve --fail-percent 20"; switch "f$n"
  $DREAM check "http://127.0.0.1:$PORT/index.html" --duration 60s --connections 16 --json > "$WORK/load.json" 2>/dev/null &
  cp=$!
  start=$(date +%s.%N)
  $DREAM reload --root "$ROOT" --canary 1 --judge-path /judge > "$WORK/reload.out" 2>&1 && echo "round $r: promoted?!" || true
  end=$(date +%s.%N)
  kill $cp 2>/dev/null; wait $cp 2>/dev/null || true
  live=$(grep -E "canary: generation .* takes" "$WORK/serve.log" | tail -1 | cut -c1-23)
  reverted=$(grep -E "canary generation .* reverted" "$WORK/serve.log" | tail -1 | cut -c1-23)
  python3 - "$live" "$reverted" "$start" "$end" "$r" <<'PY'
import sys, datetime
f = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
live, rev, start, end, r = sys.argv[1:]
print(f"round {r}: share taken to revert {f(rev) - f(live):.2f}s; reload command {float(end) - float(start):.2f}s")
PY
  grep -o "error rate[^:]*" "$WORK/reload.out" | head -1
done
