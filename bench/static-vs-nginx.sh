#!/usr/bin/env bash
# dream static versus nginx, both one worker process, serving the same files with
# keep-alive, wrk as the client; alternating, ROUNDS times, in one run:
#   small: a 1 kB file; large: a 10 MB file.
# Also the data path for a deploy setup: dream serve (worker on the shared socket) versus
# a proxy-based blue/green (nginx upstream in front of the same worker).
# Usage: bench/static-vs-nginx.sh [ROUNDS] [SECONDS]   (default 3 rounds of 5 s)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
SECS=${2:-5}
need nginx-light wrk curl
mkdir -p "$WORK/www/public" "$WORK/nginx"
chmod 755 "$WORK"  # nginx workers run as www-data
head -c 1024 /dev/urandom > "$WORK/www/public/small.bin"
head -c $((10*1024*1024)) /dev/urandom > "$WORK/www/public/large.bin"
echo "<p>release bench</p>" > "$WORK/www/public/index.html"
NP=$(free_port); DP=$(free_port); SP=$(free_port); PP=$(free_port)
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000;
  types { application/octet-stream bin; text/html html; }
  server { listen 127.0.0.1:$NP; root $WORK/www/public; }
  upstream worker { server 127.0.0.1:$DP; keepalive 64; }
  server {
    listen 127.0.0.1:$PP;
    location / { proxy_pass http://worker; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
(cd "$WORK/www" && DREAM_RELEASE=bench exec "$DREAM" static --listen 127.0.0.1:$DP 2>/dev/null) &
mkdir -p "$WORK/root/releases"; cp -a "$WORK/www" "$WORK/root/releases/bench"; ln -s releases/bench "$WORK/root/current"
"$DREAM" serve -q --root "$WORK/root" --listen 127.0.0.1:$SP --workers 1 --ready notify -- "$DREAM" static &
for p in $NP $DP $SP $PP; do wait_http http://127.0.0.1:$p/index.html; done

rps() { run wrk -t2 -c"$2" -d${SECS}s "$1" | awk '/Requests\/sec/ {print $2} /Transfer\/sec/ {t=$2} /Socket errors/ {e=$0} END {if (e) print e > "/dev/stderr"}'; }
tps() { run wrk -t2 -c"$2" -d${SECS}s "$1" | awk '/Transfer\/sec/ {print $2}'; }
echo "== static files: dream static vs nginx (1 process each, keep-alive, wrk -t2)"
for r in $(seq "$ROUNDS"); do
  a=$(rps http://127.0.0.1:$DP/small.bin 64); b=$(rps http://127.0.0.1:$NP/small.bin 64)
  c=$(tps http://127.0.0.1:$DP/large.bin 8); d=$(tps http://127.0.0.1:$NP/large.bin 8)
  echo "round $r: 1 kB: dream $a req/s, nginx $b req/s, ratio $(python3 -c "print(round($a/$b,2))") | 10 MB: dream $c, nginx $d"
done
echo "== data path: dream serve vs the worker alone vs nginx proxy in front of the worker (index.html, 64 connections)"
for r in $(seq "$ROUNDS"); do
  a=$(rps http://127.0.0.1:$SP/index.html 64); b=$(rps http://127.0.0.1:$DP/index.html 64); c=$(rps http://127.0.0.1:$PP/index.html 64)
  echo "round $r: dream serve $a req/s, direct $b req/s, nginx proxy $c req/s | serve/direct $(python3 -c "print(round($a/$b,3))"), serve/proxy $(python3 -c "print(round($a/$c,2))")"
done
