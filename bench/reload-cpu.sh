#!/usr/bin/env bash
# Where a reload's CPU goes: `dream serve --workers 4 -- dream static public`, idle, reloaded
# N times (dream rollback --settle 0s, alternating two releases, one every 250 ms). Prints per
# reload the supervisor's CPU, its workers' (their whole lives: start, drain, exit; counted as
# the supervisor reaps them), and the whole machine's; with PERF=1 also where the supervisor and
# its children spend it (perf record -g), by binary.
# Usage: bench/reload-cpu.sh [N]   (default 40)
source "$(dirname "$0")/lib.sh"
N=${1:-40}
mkdir -p "$WORK/a/public" "$WORK/b/public" "$WORK/root"; chmod 755 "$WORK"
printf '0123456789' > "$WORK/a/public/small"; printf '0123456789' > "$WORK/b/public/small"
"$DREAM" deploy -q --root "$WORK/root" "$WORK/a" --id a >/dev/null
"$DREAM" deploy -q --root "$WORK/root" "$WORK/b" --id b >/dev/null
"$DREAM" rollback -q --root "$WORK/root" a >/dev/null
SP=$(free_port)
"$DREAM" serve -q --root "$WORK/root" --listen 127.0.0.1:$SP --workers 4 --ready notify -- "$DREAM" static public &
SUP=$!
wait_http http://127.0.0.1:$SP/small
# utime+stime of the supervisor, and of the children it reaped, in ticks.
own_and_reaped() { awk '{print $14+$15, $16+$17}' /proc/$SUP/stat; }
machine() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat; }
read -r s0 c0 < <(own_and_reaped); m0=$(machine)
if [ "${PERF:-0}" = 1 ]; then perf record -q -g -o "$WORK/perf.data" -p $SUP 2>/dev/null & PERFPID=$!; fi
for n in $(seq "$N"); do
  if [ $((n % 2)) -eq 1 ]; then id=b; else id=a; fi
  "$DREAM" rollback -q --settle 0s --root "$WORK/root" $id >/dev/null
  sleep 0.25
done
# The last generation replaced drains and is reaped.
for _ in $(seq 40); do [ "$(pgrep -c -P $SUP)" -le 4 ] && break; sleep 0.05; done
read -r s1 c1 < <(own_and_reaped); m1=$(machine)
if [ -n "${PERFPID:-}" ]; then kill -INT $PERFPID; wait $PERFPID || true; fi
python3 -c "
t = $(getconf CLK_TCK); n = $N
print(f'per reload: supervisor {1000 * ($s1 - $s0) / t / n:.1f} ms, its workers (whole lives) {1000 * ($c1 - $c0) / t / n:.1f} ms, the machine {1000 * ($m1 - $m0) / t / n:.1f} ms (the rest: the dream rollback command, this script)')"
if [ -n "${PERFPID:-}" ]; then
  perf report -i "$WORK/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep '%' | grep -v '^#' | head -8
fi
