#!/usr/bin/env bash
# Where a reload's tail latency comes from, part by part, for `dream serve --workers 4 --
# dream static public` under an open-loop client (dream check --rate 20000 --keep-alive,
# 64 connections) with a reload every 250 ms:
#   1. what one worker start costs: spawn -> READY=1 (wall) and CPU (start + drain + exit),
#      beside the floor of any process here (/bin/true);
#   2. the tail that process starts alone make: p99 while starting 4 x /bin/true, 4 x
#      `dream --version`, or reloading, every 250 ms (nothing else changes);
#   3. who has the CPUs in the 5 ms windows after each reload starts (perf's sched_switch
#      trace: new workers, old workers, the client, the supervisor), workers started at
#      normal priority vs under SCHED_IDLE (--start-priority);
#   4. how keep-alive clients move: reconnects per reload and their first request's latency,
#      with the drain's Connection: close all at once vs spread over 150 ms.
# Needs root (perf, SCHED_IDLE restore). Usage: bench/reload-cost.sh [ROUNDS]   (default 3)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
need linux-perf curl
mkdir -p "$WORK/a/public" "$WORK/b/public" "$WORK/bin"
chmod 755 "$WORK"
printf '0123456789' > "$WORK/a/public/small"; printf '0123456789' > "$WORK/b/public/small"
# Worker commands: the defaults, and the drain spread off.
printf '#!/bin/sh\nexec %s static "$@"\n' "$DREAM" > "$WORK/bin/spread"
printf '#!/bin/sh\nexec %s static --drain-spread 0s "$@"\n' "$DREAM" > "$WORK/bin/burst"
chmod +x "$WORK/bin/"*
# serve NAME PRIORITY WORKER: a supervisor on its own root ROOT, port P, pid S.
serve() {
  ROOT="$WORK/root-$1"; mkdir -p "$ROOT"
  for id in a b; do "$DREAM" deploy -q --root "$ROOT" "$WORK/$id" --id $id >/dev/null; done
  "$DREAM" rollback -q --root "$ROOT" a >/dev/null
  P=$(free_port)
  "$DREAM" serve --root "$ROOT" --listen 127.0.0.1:$P --workers 4 --ready notify \
    --start-priority "$2" -- "$WORK/bin/$3" public 2>"$WORK/log-$1" &
  S=$!
  wait_http http://127.0.0.1:$P/small
}
flip() { echo "$DREAM rollback -q --settle 0s --root $ROOT \$id"; }
check() { "$DREAM" check "http://127.0.0.1:$1/small" --keep-alive --connections 64 --rate 20000 --duration "${2:-4s}" --json 2>/dev/null || true; }
med() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }

echo "== 1. one worker start: spawn -> READY=1, and its CPU (start + drain + exit); 50 starts"
python3 - "$DREAM" "$WORK/a" <<'PY'
import os, resource, socket, statistics, subprocess, sys, time
dream, site = sys.argv[1], sys.argv[2]
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(128)
path = os.path.join(site, "..", "notify.sock"); ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); ns.bind(path)
def cost(argv, ready):
    walls, cpus = [], []
    for _ in range(50):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN); t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=ls.fileno(), stdout=subprocess.DEVNULL, cwd=site,
                             env={"NOTIFY_SOCKET": path, "PATH": os.environ["PATH"]})
        if ready:
            while b"READY=1" not in ns.recv(4096): pass
            walls.append((time.perf_counter() - t0) * 1000)
            p.send_signal(15)
        p.wait()
        if not ready: walls.append((time.perf_counter() - t0) * 1000)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) * 1000)
    return statistics.median(walls), statistics.median(cpus)
for name, argv, ready in (("dream static public", [dream, "static", "public"], True),
                          ("dream --version", [dream, "--version"], False),
                          ("/bin/true", ["/bin/true"], False)):
    w, c = cost(argv, ready)
    print(f"{name:22s} wall {w:.2f} ms (to READY=1 or exit), CPU {c:.2f} ms (median of 50)")
PY

serve cost auto spread
echo "== 1b. the supervisor's own work per reload (no load; 20 reloads): CPU from /proc, system calls from strace -c"
ticks() { cat /proc/$S/task/*/schedstat | awk '{n += $1} END {print n}'; }
t0=$(ticks)
for n in $(seq 20); do "$DREAM" rollback -q --root "$ROOT" $([ $((n % 2)) -eq 1 ] && echo b || echo a) >/dev/null; sleep 0.1; done
t1=$(ticks)
echo "supervisor CPU: $(( (t1 - t0) / 20 / 1000 )) us per reload (schedstat)"
strace -c -p $S -o "$WORK/strace" & T=$!
sleep 0.5
for n in $(seq 20); do "$DREAM" rollback -q --root "$ROOT" $([ $((n % 2)) -eq 1 ] && echo b || echo a) >/dev/null; sleep 0.1; done
kill -INT $T; wait $T 2>/dev/null || true
awk 'NR > 2 && $1 ~ /^[0-9.]+$/ && NF >= 5 {calls[$NF] = $4} /^-+/ {next} END {for (c in calls) if (c != "total") printf "%s %d\n", c, calls[c]}' "$WORK/strace" \
  | sort -k2 -nr | head -12 | awk '{printf "  %-16s %6.1f per reload\n", $1, $2 / 20}'
echo "== 2. p99 (us) under 4 s at a fixed rate, with a disturbance every 250 ms; $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
  line="round $r:"
  for what in none true version reload; do
    case $what in
      none) cmd=true ;;
      true) cmd='for i in 1 2 3 4; do /bin/true & done; wait' ;;
      version) cmd="for i in 1 2 3 4; do $DREAM --version & done; wait" ;;
      reload) cmd=$(flip) ;;
    esac
    disturb "$cmd"; d=$!
    v=$(check $P | jget "['latency']['p99_us']"); wait $d
    line="$line $what $v"
  done
  echo "$line"
done
kill $S; wait $S 2>/dev/null || true

echo "== 3. CPU share in the 5 ms windows after each reload starts (perf sched_switch, 8 reloads)"
for prio in normal idle; do
  serve sched-$prio $prio spread
  ( sleep 0.5; for n in $(seq 8); do "$DREAM" rollback -q --root "$ROOT" $([ $((n % 2)) -eq 1 ] && echo b || echo a) >/dev/null 2>&1; sleep 0.25; done ) & R=$!
  OFF=$(python3 -c 'import time; print(time.time() * 1000 - time.monotonic() * 1000)')
  run perf record -q -a -k mono -e sched:sched_switch -o "$WORK/perf-$prio.data" -- \
    "$DREAM" check http://127.0.0.1:$P/small --keep-alive --connections 64 --rate 20000 --duration 3s --json >/dev/null 2>&1 || true
  wait $R
  perf script -i "$WORK/perf-$prio.data" --ns 2>/dev/null > "$WORK/sched-$prio.txt"
  echo "-- workers started with --start-priority $prio"
  python3 - "$WORK/log-sched-$prio" "$WORK/sched-$prio.txt" "$OFF" "$S" <<'PY'
import collections, datetime, re, sys
log, trace, off, sup = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
def t(line):
    return datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp() * 1000
starts = [t(l.lstrip("\x00")) for l in open(log) if "reload: starting generation" in l]
last, runs, first = {}, [], {}
for line in open(trace):
    m = re.search(r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:\s+prev_comm=(.*?) prev_pid=(\d+) ", line)
    if not m: continue
    cpu, ts, comm, pid = int(m.group(1)), float(m.group(2)) * 1000 + off, m.group(3), int(m.group(4))
    first.setdefault(pid, ts)
    if cpu in last: runs.append((last[cpu], ts, comm, pid))
    last[cpu] = ts
def who(comm, pid, start):
    if comm.startswith("swapper"): return "idle"
    if pid == sup: return "supervisor"
    if comm.startswith("tokio-rt"): return "client"
    if comm in ("dream", "spread", "sh") or comm.startswith("dream-"):
        return "new workers" if first[pid] >= start - 2 else "old workers"
    return "other"
for lo in (-5, 0, 5, 10, 15, 20, 40):
    acc = collections.Counter()
    for s in starts:
        a, b = s + lo, s + lo + 5
        for r0, r1, comm, pid in runs:
            o = min(r1, b) - max(r0, a)
            if o > 0: acc[who(comm, pid, s)] += o
    n = max(1, len(starts))
    print(f"  {lo:+3d}..{lo + 5:+3d} ms: " + ", ".join(f"{k} {v / n / 10 * 100:.0f}%" for k, v in acc.most_common()))
PY
  kill $S; wait $S 2>/dev/null || true
done

echo "== 4. keep-alive clients moved by reloads: reconnects and their first request, drain all at once vs spread"
for mode in burst spread; do
  serve move-$mode auto $mode
  for r in $(seq "$ROUNDS"); do
    disturb "$(flip)"; d=$!
    R=$(check $P); wait $d
    echo "$mode round $r: p99 $(echo "$R" | jget "['latency']['p99_us']") us | reconnects $(echo "$R" | jget "['reconnects']") | their first request p50 $(echo "$R" | jget "['reconnect_latency']['p50_us']") us, p90 $(echo "$R" | jget "['reconnect_latency']['p90_us']") us"
  done
  kill $S; wait $S 2>/dev/null || true
done
