#!/usr/bin/env bash
# Issue 25's table, measured: each example server under `dream serve --workers 2` with the
# README's command and readiness, reloads for 14 s (alternating two releases; each `dream
# reload --settle 0s` waits for its generation to go live, then 0.3 s pass before the next),
# while `dream check` (16 connections) watches: once with a new connection per request, once
# with keep-alive clients. Prints errors by kind and mixed responses per server and client.
# Needs the servers' runtimes (what .ci/run installs) and target/example-venv (gunicorn,
# uvicorn). Usage: bench/servers.sh [SECONDS]   (default 14)
source "$(dirname "$0")/lib.sh"
SECS=${1:-14}
EX=$PWD/examples
VENV=${DREAM_EXAMPLE_VENV:-$PWD/target/example-venv/bin}
export PATH="$VENV:$PATH" HOME=${HOME:-/root}
mkdir -p "$WORK/go"
(cd "$WORK/go" && GOCACHE="$WORK/go/cache" CGO_ENABLED=0 GOTOOLCHAIN=local go build -o server "$EX/go/server.go")
# one NAME READY FILES... -- COMMAND...
one() {
  local name=$1 ready=$2; shift 2
  local files=(); while [ "$1" != "--" ]; do files+=("$1"); shift; done; shift
  for ka in 0 1; do
    local root; root=$(mktemp -d "$WORK/root.XXXX")
    for id in a b; do mkdir -p "$root/releases/$id"; cp "${files[@]}" "$root/releases/$id/"; done
    ln -s releases/a "$root/current"
    local port; port=$(free_port)
    "$DREAM" serve -q --root "$root" --listen 127.0.0.1:$port --workers 2 --ready "$ready" \
      --ready-timeout 60s -- "$@" 2>"$root/serve.log" &
    local sp=$!
    wait_http http://127.0.0.1:$port/
    local kaflag=(); [ $ka = 1 ] && kaflag=(--keep-alive)
    "$DREAM" check http://127.0.0.1:$port/ --connections 16 --duration ${SECS}s "${kaflag[@]}" --json > "$root/check.json" 2>/dev/null &
    local cp=$!
    local end=$((SECONDS + SECS - 1)) n=0 reloads=0
    while [ $SECONDS -lt $end ]; do
      if [ $((n % 2)) -eq 0 ]; then id=b; else id=a; fi
      ln -sfn "releases/$id" "$root/current.new" && mv -T "$root/current.new" "$root/current"
      "$DREAM" reload --settle 0s --root "$root" >/dev/null 2>&1 && reloads=$((reloads + 1))
      n=$((n + 1)); sleep 0.3
    done
    wait $cp || true
    kill $sp; wait $sp 2>/dev/null || true
    local client=new-connection; [ $ka = 1 ] && client=keep-alive
    python3 - "$root/check.json" "$name" "$client" "$reloads" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); e = d["errors"]
print(f"{sys.argv[2]:<16} {sys.argv[3]:<15} reloads {sys.argv[4]:>3}  responses {d['responses']:>7}  "
      f"errors {d['error_total']} (refused {e['connect_refused']}, reset {e['connect_reset'] + e['read_reset']}, "
      f"timeout {e['connect_timeout'] + e['read_timeout']}, other {e['connect_other'] + e['read_other']}, "
      f"status {e['bad_status']})  mixed {d['mixed']}")
PY
  done
}
one python notify "$EX/python/server.py" -- python3 server.py
one gunicorn notify "$EX/gunicorn/app.py" -- gunicorn --bind fd://0 --workers 1 --no-control-socket --log-level warning app:app
one gunicorn-gthread notify "$EX/gunicorn/app.py" -- gunicorn --bind fd://0 --workers 1 --worker-class gthread --threads 4 --no-control-socket --log-level warning app:app
one uvicorn auto:1s "$EX/uvicorn/app.py" -- uvicorn --fd 0 --log-level warning app:app
one node auto:500ms "$EX/node/server.js" -- node server.js
one go notify "$WORK/go/server" -- ./server
one puma notify "$EX/puma/config.ru" "$EX/puma/puma.rb" -- puma -C puma.rb --quiet config.ru
one uwsgi notify "$EX/uwsgi/app.py" "$EX/uwsgi/uwsgi.ini" -- uwsgi --ini uwsgi.ini
