# Shared helpers for the bench scripts (sourced, not run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -q
DREAM=$PWD/target/release/dream
WORK=$(mktemp -d /var/tmp/dream-bench.XXXXXX)
cleanup() {
  local pids; pids=$(jobs -p); [ -n "$pids" ] && kill $pids 2>/dev/null || true
  wait 2>/dev/null || true
  chmod -R u+w "$WORK" 2>/dev/null || true; rm -rf "$WORK"
}
trap cleanup EXIT
# Installs Debian packages the comparison needs (peers are never installed by CI).
need() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1" >&2; return 1; }
# json FIELD... : read a dream check --json report on stdin, print fields.
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(*[eval("d"+a) for a in sys.argv[1:]])' "$@"; }
run() { echo "+ $*" >&2; "$@"; }
# static_nginx PORT DIR [WORKERS] [NAME]: nginx serving DIR on 127.0.0.1:PORT as issue 26
# configures it: `worker_processes 2; sendfile on;` (or WORKERS workers), everything else at
# nginx's defaults (access log on, keepalive_requests 1000, 512 connections a worker), in the
# background, its files in $WORK/NAME (default nginx).
static_nginx() {
  local d="$WORK/${4:-nginx}"
  mkdir -p "$d/logs"
  cat > "$d/nginx.conf" <<CONF
worker_processes ${3:-2};
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { }
http {
  sendfile on;
  server { listen 127.0.0.1:$1; root $2; }
}
CONF
  nginx -c "$d/nginx.conf" -p "$d" &
}
# disturb CMD: runs CMD every 250 ms for 4 s in the background; in CMD, $id is the release
# not live (for a reload: the rollback flips between a and b with no extra process).
disturb() {
  ( end=$((SECONDS + 4)); n=0
    while [ $SECONDS -lt $end ]; do
      n=$((n + 1)); if [ $((n % 2)) -eq 1 ]; then id=b; else id=a; fi
      eval "$1" >/dev/null 2>&1 || true; sleep 0.25
    done
    # Leave release a live for the next round.
    [ "$id" = a ] || eval "${1//\$id/a}" >/dev/null 2>&1 || true ) &
}
