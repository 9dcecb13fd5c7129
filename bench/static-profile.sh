#!/usr/bin/env bash
# Issue 26, item 1: where each server's time goes on the static method (a 10-byte file,
# `wrk -t2 -c64`), dream serve --workers 2 -- dream static public (default flags) against nginx
# (worker_processes 2; sendfile on; otherwise default). Per server, alternated, ROUNDS rounds:
#   - requests/s, and each worker process's CPU (user and system, from /proc) and connections;
#   - CPU cycles, context switches and migrations per request (perf stat on the workers);
#   - system calls per request by name (strace -c on the workers, a separate shorter run:
#     strace slows the server, so its throughput is not quoted).
# Usage: bench/static-profile.sh [ROUNDS] [SECONDS]   (default 3 rounds of 5 s)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
SECS=${2:-5}
need wrk nginx-light iproute2 strace linux-perf
mkdir -p "$WORK/a/public" "$WORK/root"
chmod 755 "$WORK"
printf '0123456789' > "$WORK/a/public/small"
"$DREAM" deploy -q --root "$WORK/root" "$WORK/a" --id a >/dev/null
SP=$(free_port); NP=$(free_port)
"$DREAM" serve -q --root "$WORK/root" --listen 127.0.0.1:$SP --workers 2 -- "$DREAM" static public &
SUP=$!
static_nginx $NP "$WORK/a/public"
for p in $SP $NP; do wait_http http://127.0.0.1:$p/small; done
# The worker processes serving PORT (the ones holding its connections or listener).
workers() {
  case $1 in
    dream) pgrep -P "$SUP" | sort -n | paste -sd, ;;
    nginx) pgrep -f "nginx: worker process" | sort -n | paste -sd, ;;
  esac
}
cpu() {  # PID...: user and system ticks of each
  for p in ${1//,/ }; do awk '{print $14, $15}' /proc/$p/stat; done
}
conns() { ss -tnpH state established "( sport = :$1 )" | grep -o 'pid=[0-9]*' | sort | uniq -c | awk '{print $1}' | sort -n | paste -sd/; }
HZ=$(getconf CLK_TCK)
for round in $(seq "$ROUNDS"); do
  for who in dream nginx; do
    p=$SP; [ $who = nginx ] && p=$NP
    pids=$(workers $who)
    before=$(cpu "$pids")
    perf stat -x, -e task-clock,cycles,context-switches,cpu-migrations -p "$pids" -o "$WORK/perf.txt" -- sleep "$SECS" &
    perfpid=$!
    wrk -t2 -c64 -d${SECS}s http://127.0.0.1:$p/small > "$WORK/wrk.txt" 2>&1 &
    wp=$!; sleep $((SECS / 2)); c=$(conns $p); wait $wp; wait $perfpid || true
    after=$(cpu "$pids")
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt")
    python3 - "$who" "$round" "$rps" "$c" "$HZ" "$SECS" "$WORK/perf.txt" <<PY
import sys
who, rnd, rps, conns, hz, secs, perf = sys.argv[1:]
rps, hz, secs = float(rps), int(hz), float(secs)
b = [list(map(int, l.split())) for l in """$before""".splitlines()]
a = [list(map(int, l.split())) for l in """$after""".splitlines()]
per = [f"{(a[i][0]-b[i][0])/hz/secs*100:.0f}%us+{(a[i][1]-b[i][1])/hz/secs*100:.0f}%sy" for i in range(len(a))]
ev = {}
for line in open(perf):
    f = line.strip().split(",")
    if len(f) > 2 and f[0] and f[0][0].isdigit():
        ev[f[2]] = float(f[0])
n = rps * secs
cycles = f"{ev['cycles']/n:.0f} cycles, " if ev.get("cycles") else ""
print(f"round {rnd} {who}: {rps:.0f} req/s | workers {' '.join(per)} | connections {conns} | per request: "
      f"{cycles}{ev.get('task-clock', 0)*1e3/n:.1f} us CPU, "
      f"{ev.get('context-switches', 0)/n:.3f} switches, {ev.get('cpu-migrations', 0)/n:.4f} migrations")
PY
  done
done
echo "== system calls per request (strace -c -f on the workers, ${SECS} s, throughput not quoted)"
for who in dream nginx; do
  p=$SP; [ $who = nginx ] && p=$NP
  args=(); for pid in $(workers $who | tr , ' '); do args+=(-p "$pid"); done
  strace -c -f -o "$WORK/strace.txt" "${args[@]}" &
  sp=$!; sleep 0.5
  wrk -t2 -c64 -d${SECS}s http://127.0.0.1:$p/small > "$WORK/wrk.txt" 2>&1
  kill -INT $sp; wait $sp 2>/dev/null || true
  n=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
  echo "$who ($n requests):"
  awk -v n="$n" '$1 ~ /^[0-9.]+$/ && NF >= 5 {name=$NF; calls=$4; if (calls+0 > 0) printf "  %-16s %.2f per request\n", name, calls/n}' "$WORK/strace.txt" | sort -k2 -nr | head -12
done
