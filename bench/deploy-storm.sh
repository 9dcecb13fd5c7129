#!/usr/bin/env bash
# Deploy storm: 20 deploys in 10 s under load from `dream check` (64 connections; new
# connection per request, then keep-alive), for dream and for the alternatives users would
# pick, one after the other in one run:
#   dream        dream serve + dream deploy (new generation, ready, then drain)
#   seed         the seed's chain rebuilt with dream's small tools: dream listen -> dream loop
#                -> worker, symlink switch + HUP (the worker restarts in the new release)
#   gunicorn     gunicorn (2 sync workers) with a WSGI app, symlink switch + HUP
#   naive        stop the server, switch, start it again
# Each line: errors, mixed, p50/p99/p99.9/max during the storm, and p99 steady (same server,
# just before) for the ratio. Usage: bench/deploy-storm.sh [SECONDS] (default 10)
source "$(dirname "$0")/lib.sh"
SECS=${1:-10}
need gunicorn curl
CONNS=64

# Two sites whose page names the release: stamped at deploy time.
for s in blue green; do
  mkdir -p "$WORK/src/$s/public"
  echo "<p>$s release @R@</p>" > "$WORK/src/$s/public/index.html"
  cat > "$WORK/src/$s/app.py" <<'PY'
import os
RELEASE = os.path.basename(os.path.realpath(os.environ["DREAM_BENCH_ROOT"] + "/current"))
BODY = open(os.environ["DREAM_BENCH_ROOT"] + "/current/public/index.html", "rb").read()
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html"), ("X-Dream-Release", RELEASE),
                              ("Content-Length", str(len(BODY)))])
    return [BODY]
PY
done
STAMP='sed -i "s/@R@/$DREAM_RELEASE/" public/index.html'

# Hand-rolled release store for the peers: copy, stamp, switch the symlink by rename.
peer_release() { # ROOT SITE -> prints id
  local id="r$(date +%s%N)-$2"; cp -a "$WORK/src/$2" "$1/releases/$id"
  sed -i "s/@R@/$id/" "$1/releases/$id/public/index.html"
  ln -sfn "releases/$id" "$1/current.tmp" && mv -T "$1/current.tmp" "$1/current"; echo "$id"
}

# The site the i-th deploy of a storm ships: green, blue, green, …
site_for() { if [ $(( $1 % 2 )) -eq 1 ]; then echo green; else echo blue; fi; }

storm() { # NAME URL DEPLOY_FN
  local name=$1 url=$2 fn=$3 mode
  for mode in "" "--keep-alive"; do
    local steady during
    steady=$(run "$DREAM" check "$url" --duration ${SECS}s --connections $CONNS --json $mode || true)
    ( end=$(( $(date +%s%N) + SECS*1000000000 )); i=0
      while [ $(date +%s%N) -lt $end ] && [ $i -lt 20 ]; do
        i=$((i+1)); $fn $i >/dev/null 2>&1 || true; sleep $(python3 -c "print($SECS/20)")
      done ) &
    local deployer=$!
    during=$(run "$DREAM" check "$url" --duration ${SECS}s --connections $CONNS --json $mode || true)
    wait $deployer
    local sp dp
    sp=$(echo "$steady" | jget "['latency']['p99_us']")
    echo "$during" | python3 bench/storm_line.py "$name" "${mode:---new-conn}" "$sp"
  done
}

echo "== deploy storm: 20 deploys in ${SECS}s, $CONNS connections"

# dream
D=$WORK/dream; mkdir -p "$D"; P=$(free_port)
"$DREAM" deploy -q --root "$D" "$WORK/src/blue" --build "$STAMP" >/dev/null
"$DREAM" serve -q --root "$D" --listen 127.0.0.1:$P --workers 2 --ready notify -- "$DREAM" static &
wait_http http://127.0.0.1:$P/
dream_deploy() { "$DREAM" deploy -q --root "$D" "$WORK/src/$(site_for "$1")" --build "$STAMP" --keep 3; }
storm dream http://127.0.0.1:$P/ dream_deploy
kill %1; wait %1 2>/dev/null || true

# seed: listen -> loop -> worker; switch + HUP to the loop
S=$WORK/seed; mkdir -p "$S/releases"; P=$(free_port); peer_release "$S" blue >/dev/null
cat > "$WORK/seed-worker.sh" <<SH
#!/bin/sh
cd "$S/current" && DREAM_RELEASE=\$(basename "\$(pwd -P)") exec "$DREAM" static --drain-grace 100ms
SH
chmod +x "$WORK/seed-worker.sh"
"$DREAM" listen 127.0.0.1:$P "$DREAM" loop 0.1 "$WORK/seed-worker.sh" &
SEEDPID=$!
wait_http http://127.0.0.1:$P/
seed_deploy() { peer_release "$S" "$(site_for "$1")"; kill -HUP $SEEDPID; }
storm seed http://127.0.0.1:$P/ seed_deploy
kill $SEEDPID; wait $SEEDPID 2>/dev/null || true

# gunicorn: switch + HUP (new workers import the app from the new release)
G=$WORK/gunicorn; mkdir -p "$G/releases"; P=$(free_port); peer_release "$G" blue >/dev/null
DREAM_BENCH_ROOT=$G gunicorn --chdir "$G/current" --pythonpath "$G/current" --bind 127.0.0.1:$P --workers 2 --backlog 4096 --graceful-timeout 10 --log-level warning app:app &
GPID=$!
wait_http http://127.0.0.1:$P/
gunicorn_deploy() { peer_release "$G" "$(site_for "$1")"; kill -HUP $GPID; }
storm gunicorn http://127.0.0.1:$P/ gunicorn_deploy
kill $GPID; wait $GPID 2>/dev/null || true

# naive: stop, switch, start
N=$WORK/naive; mkdir -p "$N/releases"; P=$(free_port); peer_release "$N" blue >/dev/null
naive_start() { (cd "$N/current" && DREAM_RELEASE=$(basename "$(pwd -P)") exec "$DREAM" static --listen 127.0.0.1:$P 2>/dev/null) & echo $! > "$WORK/naive.pid"; }
naive_stop() { local pid; pid=$(cat "$WORK/naive.pid"); kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done; }
naive_start; wait_http http://127.0.0.1:$P/
naive_deploy() { naive_stop; peer_release "$N" "$(site_for "$1")"; naive_start; }
storm naive http://127.0.0.1:$P/ naive_deploy
naive_stop
