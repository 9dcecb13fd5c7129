#!/usr/bin/env bash
# Two builds of dream static side by side with nginx, on issue 26's static method and on new
# connections: `dream serve --workers 2 -- dream static public` (default flags) for OLD and for
# this checkout, nginx `worker_processes 2; sendfile on;`, the same 10-byte file. Alternated,
# ROUNDS rounds:
#   1. keep-alive: `wrk -t2 -c64 -d3s`, requests/s and the spread of the 64 connections over
#      the two workers;
#   2. a new connection per request at a fixed rate (`dream check --rate RATE`, 64 clients,
#      4 s, default 3000/s): p50 and p99 (what reconnects during reloads cost).
# Usage: bench/static-ab.sh OLD_DREAM [ROUNDS] [RATE]
source "$(dirname "$0")/lib.sh"
OLD=${1:?usage: bench/static-ab.sh OLD_DREAM [ROUNDS] [RATE]}
ROUNDS=${2:-5}
RATE=${3:-3000}
need wrk nginx-light iproute2
mkdir -p "$WORK/a/public" "$WORK/nginx"
chmod 755 "$WORK"
printf '0123456789' > "$WORK/a/public/small"
start() {  # NAME BINARY: a supervisor on its own root; sets P_NAME
  local root="$WORK/root-$1" p
  mkdir -p "$root"
  "$2" deploy -q --root "$root" "$WORK/a" --id a >/dev/null
  p=$(free_port)
  "$2" serve -q --root "$root" --listen 127.0.0.1:$p --workers 2 -- "$2" static public &
  wait_http http://127.0.0.1:$p/small
  eval "P_$1=$p"
}
start old "$OLD"; start new "$DREAM"
P_nginx=$(free_port)
static_nginx "$P_nginx" "$WORK/a/public"
wait_http http://127.0.0.1:$P_nginx/small
split() { ss -tnpH state established "( sport = :$1 )" | grep -o 'pid=[0-9]*' | sort | uniq -c | awk '{print $1}' | sort -n | paste -sd/; }
declare -A RPS NEWC
for r in $(seq "$ROUNDS"); do
  line="round $r:"
  for who in old new nginx; do
    p=P_$who; p=${!p}
    wrk -t2 -c64 -d3s http://127.0.0.1:$p/small > "$WORK/wrk.txt" 2>&1 &
    wp=$!; sleep 1.5; s=$(split "$p"); wait $wp
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt")
    lat=$("$DREAM" check http://127.0.0.1:$p/small --connections 64 --rate "$RATE" --duration 4s --json 2>/dev/null | jget "['latency']['p50_us']" "['latency']['p99_us']" "['error_total']")
    RPS[$who]+="$rps "; NEWC[$who]+="$(echo "$lat" | cut -d' ' -f2) "
    line="$line $who ${rps} req/s (${s}), new connections p50/p99/errors ${lat// //} us |"
  done
  echo "$line"
done
python3 - "${RPS[old]}" "${RPS[new]}" "${RPS[nginx]}" "${NEWC[old]}" "${NEWC[new]}" "${NEWC[nginx]}" <<'PY'
import statistics, sys
o, n, x, co, cn, cx = ([float(v) for v in a.split()] for a in sys.argv[1:])
m = statistics.median
print(f"median req/s: old {m(o):.0f}, new {m(n):.0f}, nginx {m(x):.0f}; new/old {m(b/a for a, b in zip(o, n)):.2f}, "
      f"new/nginx {m(b/a for a, b in zip(x, n)):.2f}, old/nginx {m(b/a for a, b in zip(x, o)):.2f}")
print(f"median new-connection p99: old {m(co):.0f} us, new {m(cn):.0f} us, nginx {m(cx):.0f} us")
PY
