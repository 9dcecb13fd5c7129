#!/usr/bin/env bash
# The two figures of issue 16, measured as a user would, side by side in one run:
#   1. reloads under keep-alive load: `dream serve --workers 4 -- dream static public`,
#      `wrk -t2 -c64 --latency` on a small file; each round 4 s steady, then 4 s with a
#      reload every 250 ms alternating two releases; p99 during / steady, errors;
#   1b. the same reloads with an open-loop client at a fixed rate (dream check --rate, a sixth
#       of the capacity measured at the start), which leaves the machine headroom, so the
#       figure is the reload's, not the saturation's; beside it the machine's floor for the
#       same: four /bin/true started every 250 ms instead of a reload, nothing else changing;
#       the p99 of the requests a reload did not make reconnect (each reload moves every
#       keep-alive connection once); and nginx with 4 workers under `nginx -s reload`.
#   Both side by side for dream as it is ("now": workers start under SCHED_IDLE while others
#   serve, the drain spreads its closes over 150 ms) and as it was ("before":
#   --start-priority normal, dream static --drain-spread 0s), alternated round by round;
#   2. dream static against nginx, 2 workers each (nginx worker_processes 2, sendfile on),
#      `wrk -t2 -c64 -d3s` on a 10-byte file, alternated; requests per second.
# The median of ROUNDS rounds of each. Usage: bench/reload-tail.sh [ROUNDS]   (default 3)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
need wrk nginx-light curl
mkdir -p "$WORK/a/public" "$WORK/b/public" "$WORK/root" "$WORK/root1" "$WORK/root2" "$WORK/nginx"
chmod 755 "$WORK"
printf '0123456789' > "$WORK/a/public/small"; printf '0123456789' > "$WORK/b/public/small"
"$DREAM" deploy -q --root "$WORK/root" "$WORK/a" --id a >/dev/null
"$DREAM" deploy -q --root "$WORK/root" "$WORK/b" --id b >/dev/null
"$DREAM" rollback -q --root "$WORK/root" a >/dev/null
for id in a b; do "$DREAM" deploy -q --root "$WORK/root1" "$WORK/$id" --id $id >/dev/null; done
"$DREAM" rollback -q --root "$WORK/root1" a >/dev/null
SP=$(free_port); S1=$(free_port); S2=$(free_port); NP=$(free_port); N4=$(free_port)
"$DREAM" serve -q --root "$WORK/root" --listen 127.0.0.1:$SP --workers 4 --ready notify -- "$DREAM" static public &
# The same, configured as dream was before issue 16's changes, measured in turn with it.
"$DREAM" serve -q --root "$WORK/root1" --listen 127.0.0.1:$S1 --workers 4 --ready notify --start-priority normal -- "$DREAM" static --drain-spread 0s public &
# The static comparison's own root: one supervisor per root.
"$DREAM" deploy -q --root "$WORK/root2" "$WORK/a" --id a >/dev/null
"$DREAM" serve -q --root "$WORK/root2" --listen 127.0.0.1:$S2 --workers 2 --ready notify -- "$DREAM" static public &
static_nginx $NP "$WORK/a/public"
# The peer for the fixed-rate reloads: nginx with as many workers as dream's, otherwise as
# static_nginx, reloaded as its users reload it (`nginx -s reload`: new workers, the old ones
# finish their requests and close their keep-alive connections).
static_nginx $N4 "$WORK/a/public" 4 nginx4
for p in $SP $S1 $S2 $NP $N4; do wait_http http://127.0.0.1:$p/small; done

# wrk's p99 in microseconds, its requests/s, and its error count.
wrk_run() { run wrk -t2 -c64 -d"$2" --latency "$1" 2>/dev/null; }
p99_us() { awk '/ 99%/ {v=$2; if (v ~ /ms$/) {sub(/ms$/,"",v); v*=1000} else if (v ~ /us$/) {sub(/us$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000000}; print v}'; }
rps() { awk '/Requests\/sec/ {print $2}'; }
errs() { awk '/Socket errors/ {gsub(/,/,""); print $4+$6+$8+$10; f=1} /Non-2xx/ {n=$5} END {if (!f) print 0+n}'; }

# reloads ROOT: the command `disturb` (lib.sh) runs every 250 ms to reload ROOT, alternating
# releases b and a (dream rollback; --settle 0s: the reload's cost is measured, not the wait
# after it); a is live again afterwards.
reloads() { echo "$DREAM rollback -q --settle 0s --root $1 \$id"; }
# The peer's: `nginx -s reload`.
NGINX_RELOAD="nginx -c $WORK/nginx4/nginx.conf -p $WORK/nginx4 -s reload"
# The floor of anything that starts four processes every 250 ms on this machine (a reload
# starts four workers), with nothing else changing.
STARTS='for i in 1 2 3 4; do /bin/true & done; wait'

echo "== 1. p99 during reloads / steady (wrk -t2 -c64, 4 workers, a reload every 250 ms; now and before, in turn)"
# One round of one server: steady, then reloading; prints the p99 ratio.
reload_round() {  # PORT ROOT LABEL ROUND
  local S R s d ratio w
  S=$(wrk_run http://127.0.0.1:$1/small 4s)
  disturb "$(reloads "$2")"; w=$!
  R=$(wrk_run http://127.0.0.1:$1/small 4s); wait $w
  s=$(echo "$S" | p99_us); d=$(echo "$R" | p99_us)
  ratio=$(python3 -c "print(round($d/$s,2))")
  echo "round $4 $3: steady p99 ${s}us $(echo "$S" | rps) req/s | reloading p99 ${d}us $(echo "$R" | rps) req/s errors $(echo "$R" | errs) | ratio $ratio" >&2
  echo "$ratio"
}
all=(); obo=()
for r in $(seq "$ROUNDS"); do
  all+=("$(reload_round $SP "$WORK/root" now $r)")
  obo+=("$(reload_round $S1 "$WORK/root1" before $r)")
done
med() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
echo "median p99 ratio: now $(med "${all[@]}"), before $(med "${obo[@]}")"

# The fixed rate is a sixth of what the server answers closed-loop on this machine today (set
# RATE to override): the 20,000 req/s this figure was first measured at were a sixth of a quiet
# day's capacity, and the same 20,000 on a machine four times slower ran at 70% of it, where the
# figure measured the machine's day rather than the reload.
CAPACITY=$(wrk_run http://127.0.0.1:$SP/small 3s | rps)
RATE=${RATE:-$(python3 -c "print(max(1000, int($CAPACITY / 6 / 1000) * 1000))")}
echo "== 1b. the same reloads under a fixed request rate (dream check --rate $RATE --keep-alive, 64 connections: an open loop at a sixth of the $CAPACITY req/s measured closed-loop); now and before, in turn"
rate_check() { run "$DREAM" check "$1" --keep-alive --connections 64 --rate "$RATE" --duration 4s --json 2>/dev/null || true; }
# Each round of each server: a steady window, a reloading one, a second steady one. Besides the
# per-round ratio, the figure is the ratio of medians over the rounds (reloading p99 / first
# steady p99), and beside it the same ratio for the two steady windows: the machine's own noise
# between identical windows, the band any reload figure of the run has to be read against.
rate_round() {  # PORT LABEL ROUND RELOAD; prints "steady reloading steady2 starts kept" p99s in us
  local S R B P s d b p k w
  S=$(rate_check http://127.0.0.1:$1/small)
  disturb "$4"; w=$!
  R=$(rate_check http://127.0.0.1:$1/small); wait $w
  B=$(rate_check http://127.0.0.1:$1/small)
  disturb "$STARTS"; w=$!
  P=$(rate_check http://127.0.0.1:$1/small); wait $w
  s=$(echo "$S" | jget "['latency']['p99_us']"); d=$(echo "$R" | jget "['latency']['p99_us']"); b=$(echo "$B" | jget "['latency']['p99_us']"); p=$(echo "$P" | jget "['latency']['p99_us']"); k=$(echo "$R" | jget "['kept_latency']['p99_us']")
  echo "round $3 $2: steady p99 ${s}us | reloading p99 ${d}us errors $(echo "$R" | jget "['error_total']") mixed $(echo "$R" | jget "['mixed']") reconnects $(echo "$R" | jget "['reconnects']") (their p50 $(echo "$R" | jget "['reconnect_latency']['p50_us']")us, p90 $(echo "$R" | jget "['reconnect_latency']['p90_us']")us, p99 $(echo "$R" | jget "['reconnect_latency']['p99_us']")us; the others' p99 ${k}us) | steady again ${b}us | 4 x /bin/true every 250 ms ${p}us | ratio $(python3 -c "print(round($d/$s,2))")" >&2
  echo "$s $d $b $p $k"
}
# figures LABEL "s d b p k"...: ratio of medians, reloading/steady, steady-again/steady,
# process-starts/steady, and reloading/steady for the requests sent on a connection already open.
figures() {
  local label=$1; shift
  printf '%s\n' "$@" | python3 -c '
import statistics, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
s, d, b, p, k = (statistics.median(c) for c in zip(*rows))
per = sorted(round(r[1] / r[0], 2) for r in rows)
print(f"'"$label"': p99 reloading / steady {d / s:.2f} (median p99s {d:.0f} / {s:.0f} us; per round {per}); steady again / steady {b / s:.2f}; 4 process starts every 250 ms / steady {p / s:.2f}; the requests a reload did not make reconnect: p99 reloading / steady {k / s:.2f}")'
}
now=(); before=(); ngx=()
for r in $(seq "$ROUNDS"); do
  now+=("$(rate_round $SP now $r "$(reloads "$WORK/root")")")
  before+=("$(rate_round $S1 before $r "$(reloads "$WORK/root1")")")
  ngx+=("$(rate_round $N4 nginx $r "$NGINX_RELOAD")")
done
echo "at a fixed rate, ratio of the median p99s over $ROUNDS rounds:"
figures now "${now[@]}"
figures before "${before[@]}"
figures nginx "${ngx[@]}"

echo "== 2. dream static vs nginx, 2 workers each (wrk -t2 -c64 -d3s, a 10-byte file)"
ratios=()
for r in $(seq "$ROUNDS"); do
  a=$(wrk_run http://127.0.0.1:$S2/small 3s | rps); b=$(wrk_run http://127.0.0.1:$NP/small 3s | rps)
  ratio=$(python3 -c "print(round($a/$b,2))"); ratios+=("$ratio")
  echo "round $r: dream $a req/s | nginx $b req/s | ratio $ratio"
done
echo "median dream/nginx: $(printf '%s\n' "${ratios[@]}" | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p")"
