#!/usr/bin/env bash
# Footprint of the long-lived process: dream serve's supervisor versus a gunicorn master,
# each with one worker, side by side: resident memory (VmRSS, and its anonymous part) and
# CPU ticks used over 10 s of idleness. Usage: bench/footprint.sh
source "$(dirname "$0")/lib.sh"
need gunicorn curl
mkdir -p "$WORK/root/releases/a/public" "$WORK/app"
echo "<p>release a</p>" > "$WORK/root/releases/a/public/index.html"
ln -s releases/a "$WORK/root/current"
printf 'def app(e, s):\n    s("200 OK", [("Content-Length", "2")])\n    return [b"ok"]\n' > "$WORK/app/app.py"
DP=$(free_port); GP=$(free_port)
echo "+ $DREAM serve -q --root $WORK/root --listen 127.0.0.1:$DP --workers 1 -- $DREAM static" >&2
"$DREAM" serve -q --root "$WORK/root" --listen 127.0.0.1:$DP --workers 1 -- "$DREAM" static &
DPID=$!
echo "+ gunicorn --chdir $WORK/app --bind 127.0.0.1:$GP --workers 1 app:app" >&2
gunicorn --chdir "$WORK/app" --bind 127.0.0.1:$GP --workers 1 --log-level warning app:app &
GPID=$!
wait_http http://127.0.0.1:$DP/; wait_http http://127.0.0.1:$GP/
sleep 1
mem() { awk '/^VmRSS/ {r=$2} /^RssAnon/ {a=$2} END {printf "%d kB (anonymous %d kB)", r, a}' /proc/$1/status; }
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
d0=$(ticks $DPID); g0=$(ticks $GPID); sleep 10; d1=$(ticks $DPID); g1=$(ticks $GPID)
echo "dream serve supervisor: RSS $(mem $DPID), idle CPU over 10 s: $((d1-d0)) ticks"
echo "gunicorn master:        RSS $(mem $GPID), idle CPU over 10 s: $((g1-g0)) ticks"
