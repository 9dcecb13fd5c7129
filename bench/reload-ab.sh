#!/usr/bin/env bash
# Two builds of dream side by side on the reload figure at a fixed rate (bench/reload-tail.sh's
# part 1b, default flags): `dream serve --workers 4 -- dream static public`, an open-loop
# client (`dream check --rate RATE --keep-alive --connections 64`, RATE 20000 unless set in the
# environment), each round 4 s steady then
# 4 s with a reload every 250 ms alternating two releases; p99 reloading / steady. The two
# builds' supervisors alternate round by round, each serving with its own `dream static`.
# Usage: bench/reload-ab.sh OLD_DREAM [ROUNDS]   (NEW is this checkout's release build;
#        NEW_WORKER=PATH runs the new supervisor with PATH's `dream static`)
source "$(dirname "$0")/lib.sh"
OLD=${1:?usage: bench/reload-ab.sh OLD_DREAM [ROUNDS]}
ROUNDS=${2:-5}
mkdir -p "$WORK/a/public" "$WORK/b/public"
chmod 755 "$WORK"
printf '0123456789' > "$WORK/a/public/small"; printf '0123456789' > "$WORK/b/public/small"
start() {  # NAME BINARY [WORKER]: a supervisor on its own root (its worker: WORKER static, default BINARY's); sets P_NAME
  local root="$WORK/root-$1" p worker=${3:-$2}
  mkdir -p "$root"
  for id in a b; do "$2" deploy -q --root "$root" "$WORK/$id" --id $id >/dev/null; done
  "$2" rollback -q --root "$root" a >/dev/null 2>&1 || "$2" rollback -q --settle 0s --root "$root" a >/dev/null
  p=$(free_port)
  "$2" serve -q --root "$root" --listen 127.0.0.1:$p --workers 4 --ready notify -- "$worker" static public &
  wait_http http://127.0.0.1:$p/small
  eval "P_$1=$p"
}
# NEW_WORKER: the new supervisor with another build's worker (to tell the two apart).
start old "$OLD"; start new "$DREAM" "${NEW_WORKER:-}"
# flip BINARY ROOT: a reload every 250 ms for 4 s (rollback between a and b; ends on a).
flip() {
  local end=$((SECONDS + 4)) n=0 id settle=()
  "$1" rollback --help | grep -q -- --settle && settle=(--settle 0s)
  while [ $SECONDS -lt $end ]; do
    if [ $((n % 2)) -eq 0 ]; then id=b; else id=a; fi
    "$1" rollback -q "${settle[@]}" --root "$2" $id >/dev/null 2>&1 || true
    n=$((n + 1)); sleep 0.25
  done
  [ $((n % 2)) -eq 1 ] && "$1" rollback -q "${settle[@]}" --root "$2" a >/dev/null 2>&1 || true
}
check() { "$DREAM" check "http://127.0.0.1:$1/small" --keep-alive --connections 64 --rate "${RATE:-20000}" --duration 4s --json 2>/dev/null || true; }
round() {  # NAME BINARY ROUND
  local port S R s d
  port=$(eval echo "\$P_$1")
  S=$(check $port); flip "$2" "$WORK/root-$1" & R=$(check $port); wait $!
  s=$(echo "$S" | jget "['latency']['p99_us']"); d=$(echo "$R" | jget "['latency']['p99_us']")
  echo "round $3 $1: steady p99 ${s}us | reloading p99 ${d}us errors $(echo "$R" | jget "['error_total']") mixed $(echo "$R" | jget "['mixed']") reconnects $(echo "$R" | jget "['reconnects']") (p50 $(echo "$R" | jget "['reconnect_latency']['p50_us']")us, p99 $(echo "$R" | jget "['reconnect_latency']['p99_us']")us) | ratio $(python3 -c "print(round($d/$s,2))")" >&2
  python3 -c "print(round($d/$s,2))"
}
old=(); new=()
# Which build goes first alternates round by round: run against itself, the slot that went
# second read 1.5x worse on a busy machine (BENCHMARKS.md, stop 31).
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then
    old+=("$(round old "$OLD" $r)"); new+=("$(round new "$DREAM" $r)")
  else
    new+=("$(round new "$DREAM" $r)"); old+=("$(round old "$OLD" $r)")
  fi
done
med() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
echo "median p99 ratio at a fixed rate: old $(med "${old[@]}"), new $(med "${new[@]}")"
