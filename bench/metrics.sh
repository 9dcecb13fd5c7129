#!/usr/bin/env bash
# The supervisor with --metrics: resident and anonymous memory, and CPU ticks over 10 s
# idle, then over 10 s with a scraper fetching /metrics every second (goal: nothing
# between scrapes; the figure is ticks per scrape). With BEFORE=/path/to/an/older/dream,
# that build's supervisor (without --metrics) is measured alongside, for memory.
# Usage: bench/metrics.sh     (BEFORE=... bench/metrics.sh)
source "$(dirname "$0")/lib.sh"
mkdir -p "$WORK/root/releases/a/public"
echo "<p>release a</p>" > "$WORK/root/releases/a/public/index.html"
ln -s releases/a "$WORK/root/current"
SP=$(free_port); MP=$(free_port)
echo "+ $DREAM serve -q --root $WORK/root --listen 127.0.0.1:$SP --metrics 127.0.0.1:$MP --workers 1 -- $DREAM static" >&2
"$DREAM" serve -q --root "$WORK/root" --listen 127.0.0.1:$SP --metrics 127.0.0.1:$MP --workers 1 -- "$DREAM" static &
PID=$!
wait_http http://127.0.0.1:$SP/; wait_http http://127.0.0.1:$MP/metrics
if [ -n "${BEFORE:-}" ]; then
  mkdir -p "$WORK/root2"; cp -a "$WORK/root/releases" "$WORK/root2/"; ln -s releases/a "$WORK/root2/current"
  BP=$(free_port)
  "$BEFORE" serve -q --root "$WORK/root2" --listen 127.0.0.1:$BP --workers 1 -- "$BEFORE" static &
  BPID=$!
  wait_http http://127.0.0.1:$BP/
fi
sleep 1
mem() { awk '/^VmRSS/ {r=$2} /^RssAnon/ {a=$2} END {printf "%d kB (anonymous %d kB)", r, a}' /proc/$1/status; }
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
curl -s http://127.0.0.1:$MP/metrics > /dev/null
t0=$(ticks $PID); sleep 10; t1=$(ticks $PID)
for i in $(seq 10); do curl -s -o /dev/null http://127.0.0.1:$MP/metrics; sleep 1; done
t2=$(ticks $PID)
echo "supervisor with --metrics: RSS $(mem $PID)"
echo "idle 10 s, no scrapes: $((t1 - t0)) ticks; 10 s, a scrape a second: $((t2 - t1)) ticks ($(python3 -c "print(round(($t2 - $t1) / 10, 2))") per scrape)"
[ -n "${BEFORE:-}" ] && echo "before (${BEFORE}): RSS $(mem $BPID)"
exit 0
