#!/usr/bin/env bash
# Upgrading the server's own program under load, side by side in one run:
#   dream:    `dream upgrade` (exec in place; same pid, sockets, workers), alternating two builds;
#   nginx:    binary upgrade (USR2, then WINCH + QUIT to the old master);
#   gunicorn: USR2, then TERM to the old master.
# Each round, per server and per client mode (new connection per request, keep-alive):
# S seconds steady, then S seconds with an upgrade every 0.5 s (dream) or a whole
# upgrade cycle back to back (nginx, gunicorn); the client is `dream check`, 32 connections.
# Also: how long dream's control socket does not answer during an upgrade (a status
# request sent every millisecond or so, its slowest answer during upgrades vs steady).
# Usage: bench/upgrade.sh [ROUNDS] [SECONDS]   (default 3 rounds of 4 s)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
SECS=${2:-4}
need nginx-light curl
VENV=${DREAM_EXAMPLE_VENV:-$PWD/target/example-venv}
[ -x "$VENV/bin/gunicorn" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q gunicorn; }

mkdir -p "$WORK/site/public" "$WORK/nginx" "$WORK/gunicorn" "$WORK/root"
chmod 755 "$WORK"
echo '<p>release @RELEASE@</p>' > "$WORK/site/public/index.html"
STAMP='sed -i "s/@RELEASE@/$DREAM_RELEASE/" public/index.html'
"$DREAM" deploy -q --root "$WORK/root" "$WORK/site" --build "$STAMP" >/dev/null
cp "$DREAM" "$WORK/dream-b"
DP=$(free_port); NP=$(free_port); GP=$(free_port)
"$DREAM" serve -q --root "$WORK/root" --listen 127.0.0.1:$DP --workers 2 --ready notify -- "$DREAM" static &

cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; sendfile on; tcp_nodelay on; keepalive_requests 1000000;
  types { text/html html; }
  server { listen 127.0.0.1:$NP; root $WORK/site/public; }
}
CONF
# Started by its absolute path: its binary upgrade execs argv[0] again.
run "$(command -v nginx)" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx"

cat > "$WORK/gunicorn/app.py" <<'APP'
def app(environ, start_response):
    body = b"<p>release gunicorn</p>\n"
    start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(body))), ("X-Dream-Release", "gunicorn")])
    return [body]
APP
(cd "$WORK/gunicorn" && exec "$VENV/bin/gunicorn" --bind 127.0.0.1:$GP --workers 2 --pid "$WORK/gunicorn/pid" --log-level warning app:app) &
for p in $DP $NP $GP; do wait_http http://127.0.0.1:$p/; done
cleanup_servers() {
  [ -f "$WORK/nginx/nginx.pid" ] && kill -QUIT "$(cat "$WORK/nginx/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/nginx/nginx.pid.oldbin" ] && kill -QUIT "$(cat "$WORK/nginx/nginx.pid.oldbin")" 2>/dev/null || true
  [ -f "$WORK/gunicorn/pid" ] && kill -TERM "$(cat "$WORK/gunicorn/pid")" 2>/dev/null || true
  cleanup
}
trap cleanup_servers EXIT

# One nginx binary upgrade, start to end: USR2 starts a new master beside the old one,
# WINCH makes the old one's workers finish, QUIT ends the old master.
nginx_upgrade() {
  local old; old=$(cat "$WORK/nginx/nginx.pid")
  kill -USR2 "$old"
  for _ in $(seq 200); do [ -f "$WORK/nginx/nginx.pid.oldbin" ] && [ -f "$WORK/nginx/nginx.pid" ] && [ "$(cat "$WORK/nginx/nginx.pid")" != "$old" ] && break; sleep 0.01; done
  kill -WINCH "$old"; kill -QUIT "$old"
  while kill -0 "$old" 2>/dev/null; do sleep 0.01; done
}
# One gunicorn upgrade: USR2 execs a new master beside the old one, TERM ends the old.
gunicorn_upgrade() {
  local old; old=$(cat "$WORK/gunicorn/pid")
  kill -USR2 "$old"
  for _ in $(seq 500); do [ -f "$WORK/gunicorn/pid" ] && [ "$(cat "$WORK/gunicorn/pid" 2>/dev/null)" != "$old" ] && break; sleep 0.01; done
  sleep 1  # gunicorn says nothing when the new master's workers are up; its docs wait too
  kill -TERM "$old"
  while kill -0 "$old" 2>/dev/null; do sleep 0.01; done
}
dream_upgrade() {
  local to=$1
  "$DREAM" upgrade --root "$WORK/root" --binary "$to" >/dev/null
  sleep 0.5
}
# dream check exits 1 when it saw an error: the report says how many.
check() { run "$DREAM" check "$1" --duration ${SECS}s --connections 32 --json $2 2>/dev/null || true; }
p99() { jget "['latency']['p99_us']"; }
errs() { jget "['error_total']"; }

# Upgrades of SERVER, back to back, for SECS seconds.
upgrading() {
  local server=$1 end=$((SECONDS+SECS)) n=0 to
  while [ $SECONDS -lt $end ]; do
    case $server in
      dream) if [ $((n % 2)) -eq 0 ]; then to=$WORK/dream-b; else to=$DREAM; fi; dream_upgrade "$to" ;;
      nginx) nginx_upgrade ;;
      gunicorn) gunicorn_upgrade ;;
    esac
    n=$((n+1))
  done
  echo $n > "$WORK/upgrades-$server"
}

echo "== p99 during upgrades vs steady ($ROUNDS rounds x ${SECS}s per phase, 32 connections)"
for r in $(seq "$ROUNDS"); do
  for mode in "" "--keep-alive"; do
    for server in dream nginx gunicorn; do
      case $server in dream) url=http://127.0.0.1:$DP/ ;; nginx) url=http://127.0.0.1:$NP/index.html ;; gunicorn) url=http://127.0.0.1:$GP/ ;; esac
      S=$(check "$url" "$mode")
      upgrading $server & up=$!
      U=$(check "$url" "$mode"); wait $up
      sp=$(echo "$S" | p99); up99=$(echo "$U" | p99)
      echo "round $r ${mode:-new-conn} $server: $(cat "$WORK/upgrades-$server") upgrades | steady p99 ${sp}us errors $(echo "$S" | errs) | upgrading p99 ${up99}us errors $(echo "$U" | errs) | p99 ratio $(python3 -c "print(round($up99/$sp,2))")"
    done
  done
done

echo "== dream's control socket during upgrades: slowest status answer, steady vs upgrading"
python3 - "$WORK/root/.dream/control.sock" "$DREAM" "$WORK/dream-b" "$WORK/root" "$SECS" <<'PY'
import json, socket, subprocess, sys, threading, time
sock, a, b, root, secs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
def ask(req):
    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sock)
    s.sendall((json.dumps(req) + "\n").encode()); f = s.makefile(); line = f.readline(); s.close()
    return json.loads(line)
def poll(stop, out):
    while not stop.is_set():
        t = time.monotonic(); ask({"cmd": "status"}); out.append(time.monotonic() - t)
        time.sleep(0.001)
for phase in ("steady", "upgrading"):
    stop, out, ups = threading.Event(), [], []
    th = threading.Thread(target=poll, args=(stop, out)); th.start()
    end = time.monotonic() + secs; n = 0
    while time.monotonic() < end:
        if phase == "upgrading":
            t = time.monotonic()
            r = ask({"cmd": "upgrade", "binary": b if n % 2 == 0 else a})
            assert r.get("ok"), r
            ups.append(time.monotonic() - t); n += 1
        time.sleep(0.25)
    stop.set(); th.join()
    out.sort()
    line = f"{phase}: {len(out)} status answers, median {out[len(out)//2]*1000:.2f} ms, slowest {out[-1]*1000:.2f} ms"
    if ups:
        ups.sort()
        line += f" | {len(ups)} upgrades, answered in median {ups[len(ups)//2]*1000:.1f} ms, slowest {ups[-1]*1000:.1f} ms"
    print(line)
PY
