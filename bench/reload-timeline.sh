#!/usr/bin/env bash
# Where a reload's time goes, from the supervisor's own timestamped log lines (ms): for
# `dream serve --workers 4 -- dream static public`, N reloads with no load and N under
# `wrk -t2 -c64` keep-alive load on a 10-byte file; per reload, the time from its start to
# each new worker's start (fork+exec), to each READY=1, to the generation going live, and
# from the drain signal to the old generation's last exit.
# Usage: bench/reload-timeline.sh [N]   (default 20)
source "$(dirname "$0")/lib.sh"
N=${1:-20}
need wrk
mkdir -p "$WORK/a/public" "$WORK/root"
printf '0123456789' > "$WORK/a/public/small"
"$DREAM" deploy -q --root "$WORK/root" "$WORK/a" --id a >/dev/null
PORT=$(free_port)
"$DREAM" serve --root "$WORK/root" --listen 127.0.0.1:$PORT --workers 4 --ready notify -- "$DREAM" static public 2>>"$WORK/log" &
wait_http http://127.0.0.1:$PORT/small
reloads() { for _ in $(seq "$N"); do "$DREAM" reload --root "$WORK/root" >/dev/null; sleep 0.25; done; }
echo "== $N reloads, no load"
: > "$WORK/log"; reloads; cp "$WORK/log" "$WORK/idle.log"
echo "== $N reloads under wrk -t2 -c64 (keep-alive)"
: > "$WORK/log"
run wrk -t2 -c64 -d"$((N / 4 + 3))"s http://127.0.0.1:$PORT/small >/dev/null &
W=$!; sleep 1; reloads; wait $W; cp "$WORK/log" "$WORK/load.log"
python3 - "$WORK/idle.log" "$WORK/load.log" <<'PY'
import re, sys, datetime, statistics
def t(line):
    line = line.lstrip("\x00")
    return datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp() * 1000
def phases(path):
    out = {"to spawn": [], "to ready": [], "to live": [], "drain": []}
    gen = start = None; drain = {}
    for line in open(path):
        m = re.search(r"reload: starting generation (\d+)", line)
        if m: gen, start = int(m.group(1)), t(line); continue
        m = re.search(r"worker (\d+)\.\d+ started", line)
        if m and start is not None and int(m.group(1)) == gen: out["to spawn"].append(t(line) - start)
        m = re.search(r"worker (\d+)\.\d+ ready", line)
        if m and start is not None and int(m.group(1)) == gen: out["to ready"].append(t(line) - start)
        m = re.search(r"reload finished: generation (\d+)", line)
        if m and start is not None: out["to live"].append(t(line) - start)
        m = re.search(r"draining generation (\d+)", line)
        if m: drain[int(m.group(1))] = [t(line), None]
        m = re.search(r"worker (\d+)\.\d+ exited", line)
        if m and int(m.group(1)) in drain: drain[int(m.group(1))][1] = t(line)
    out["drain"] = [e - s for s, e in drain.values() if e]
    return out
def q(v, p):
    v = sorted(v); return v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")
for name, path in (("no load", sys.argv[1]), ("under load", sys.argv[2])):
    ph = phases(path)
    print(f"{name}: " + " | ".join(f"{k} median {statistics.median(v):.1f} ms, p90 {q(v, .9):.1f} ms" for k, v in ph.items() if v))
PY
