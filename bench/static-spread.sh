#!/usr/bin/env bash
# Issue 26's question: why dream static's throughput swings between identical rounds. Per round,
# dream serve --workers 2 -- dream static public and nginx (worker_processes 2, sendfile on), each
# under wrk -t2 -c64 -d3s on a 10-byte file, alternated; prints requests/s and how wrk's 64
# keep-alive connections were spread over the two worker processes (from ss, mid-run).
# Usage: bench/static-spread.sh [ROUNDS]   (default 10)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-10}
need wrk nginx-light iproute2
mkdir -p "$WORK/a/public" "$WORK/root" "$WORK/nginx"
chmod 755 "$WORK"
printf '0123456789' > "$WORK/a/public/small"
"$DREAM" deploy -q --root "$WORK/root" "$WORK/a" --id a >/dev/null
SP=$(free_port); NP=$(free_port)
"$DREAM" serve -q --root "$WORK/root" --listen 127.0.0.1:$SP --workers 2 --ready notify -- "$DREAM" static public &
static_nginx $NP "$WORK/a/public"
for p in $SP $NP; do wait_http http://127.0.0.1:$p/small; done
split() { ss -tnpH state established "( sport = :$1 )" | grep -o 'pid=[0-9]*' | sort | uniq -c | awk '{print $1}' | sort -n | paste -sd/; }
for round in $(seq "$ROUNDS"); do
  for who in dream nginx; do
    p=$SP; [ $who = nginx ] && p=$NP
    wrk -t2 -c64 -d3s http://127.0.0.1:$p/small > "$WORK/wrk.txt" 2>&1 &
    wp=$!; sleep 1.5; s=$(split $p); wait $wp
    echo "round $round $who: $(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt") req/s, connections per worker $s"
  done
done
