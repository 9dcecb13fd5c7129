#!/usr/bin/env bash
# A paused deploy around a 5 s migration, as clients see it.
#
#   bench/pause.sh [ROUNDS]      (default 3)
#
# dream serve --workers 2 -- dream static (default flags); a pre-switch hook
# that sleeps 5 s; per round, `dream check` (16 connections, a new connection
# per request, 12 s) and `dream deploy --pause` of a new release 3 s in.
# Reported: errors, the worst and p99 latency, and how long the deploy took.
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
ROOT=$WORK/root
SITE=$WORK/site
mkdir -p "$ROOT/.dream/hooks" "$SITE/public"
printf '#!/bin/sh\nsleep 5\n' > "$ROOT/.dream/hooks/pre-switch"
chmod +x "$ROOT/.dream/hooks/pre-switch"
echo '<p>release @R@</p>' > "$SITE/public/index.html"
printf '#!/bin/sh\nexec %s static\n' "$DREAM" > "$SITE/run"; chmod +x "$SITE/run"
STAMP='sed -i "s/@R@/$DREAM_RELEASE/" public/index.html'
$DREAM deploy --root "$ROOT" "$SITE" --id r0 --build "$STAMP" --no-hooks -q
PORT=$(free_port)
$DREAM serve --root "$ROOT" --listen 127.0.0.1:$PORT --workers 2 -- ./run 2> "$WORK/serve.log" &
wait_http "http://127.0.0.1:$PORT/"
printf '%-6s %8s %8s %10s %10s %9s\n' round answers errors p99_ms max_ms deploy_s
for r in $(seq "$ROUNDS"); do
  $DREAM check "http://127.0.0.1:$PORT/" --duration 12s --connections 16 --timeout 30s --json > "$WORK/check.json" 2>/dev/null &
  cp=$!
  sleep 3
  start=$(date +%s.%N)
  $DREAM deploy --root "$ROOT" "$SITE" --id "p$r" --build "$STAMP" --pause -q
  end=$(date +%s.%N)
  wait $cp || true
  python3 - "$WORK/check.json" "$r" "$start" "$end" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
took = float(sys.argv[4]) - float(sys.argv[3])
print(f"{sys.argv[2]:<6} {d['responses']:>8} {d['error_total']:>8} {d['latency']['p99_us']/1000:>10.1f} {d['latency']['max_us']/1000:>10.1f} {took:>9.2f}")
PY
done
