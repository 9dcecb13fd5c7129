#!/usr/bin/env bash
# One release onto HOSTS hosts (4 unless given), side by side in one run (needs root: each host is a network
# namespace with its own sshd, deploy root and `dream serve`, joined to this one by a veth):
#   dream:    `dream fleet deploy` (the manifest, then only the content each host lacks);
#   rsync:    the Capistrano way: `rsync -a --link-dest=../current` over ssh to every host in
#             parallel, then `ln -s` + `mv -T` on each, then a reload, then the releases beyond
#             the newest five removed (both tools keep five: pruning shows from round 5 on);
#   tar|ssh:  the whole tree to every host in parallel, then the same switch and reload.
# A tree of FILES files (BYTES in all), FRACTION of them rewritten each round (same sizes, new
# random content). Per round and per tool: wall time, bytes sent over the links (the veths'
# counters), and for dream the switch skew (first host live to last, from the supervisors' logs).
# dream's own progress gives each round's slowest host per phase (connect, prepare, switch).
# Usage: bench/fleet.sh [ROUNDS] [FILES] [MB] [HOSTS]   (default 3 rounds, 10000 files, 100 MB,
# 1%, 4 hosts; TAR=0 leaves the tar|ssh baseline out, which sends the whole tree to every host)
# (The hosts share this machine's disk and CPUs: the links are real, the disks are not apart.)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
FILES=${2:-10000}
MB=${3:-100}
HOSTS=${4:-4}
TAR=${TAR:-1}
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)"; exit 1; }
need openssh-server openssh-client rsync iproute2 time
mkdir -p /run/sshd "$WORK/src"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id"
cp "$WORK/id.pub" "$WORK/authorized_keys"
: > "$WORK/known_hosts"
LAB=$(( $$ % 200 ))
addr() { echo "10.$((200 + LAB / 250)).$((LAB % 250)).$((4 * $1 + 2))"; }
ours() { echo "10.$((200 + LAB / 250)).$((LAB % 250)).$((4 * $1 + 1))"; }
teardown() {
  for i in $(seq 0 $((HOSTS - 1))); do
    [ -f "$WORK/h$i/sshd.pid" ] && kill "$(cat "$WORK/h$i/sshd.pid")" 2>/dev/null || true
    ip link del "dbf$LAB-$i" 2>/dev/null || true
    ip netns del "dbf$LAB-$i" 2>/dev/null || true
  done
  cleanup
}
trap teardown EXIT
for i in $(seq 0 $((HOSTS - 1))); do
  ns=dbf$LAB-$i; v=dbf$LAB-$i; h=$WORK/h$i
  mkdir -p "$h"
  ip netns add $ns
  ip link add $v type veth peer name ${v}p
  ip link set ${v}p netns $ns
  ip addr add "$(ours $i)/30" dev $v; ip link set $v up
  ip netns exec $ns ip addr add "$(addr $i)/30" dev ${v}p
  ip netns exec $ns ip link set ${v}p up; ip netns exec $ns ip link set lo up
  ssh-keygen -q -t ed25519 -N '' -f "$h/hostkey"
  cat > "$h/sshd_config" <<CONF
ListenAddress $(addr $i)
HostKey $h/hostkey
PidFile $h/sshd.pid
AuthorizedKeysFile $WORK/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
CONF
  ip netns exec $ns /usr/sbin/sshd -f "$h/sshd_config"
  echo "$(addr $i) $(cat "$h/hostkey.pub")" >> "$WORK/known_hosts"
done
SSH="ssh -F /dev/null -i $WORK/id -o UserKnownHostsFile=$WORK/known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes"
for i in $(seq 0 $((HOSTS - 1))); do until $SSH root@"$(addr $i)" true 2>/dev/null; do sleep 0.1; done; done

# The tree: FILES files of random content, sizes around BYTES/FILES, in 100 directories.
python3 - "$WORK/src" "$FILES" "$MB" <<'PY'
import os, random, sys
root, n, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
avg = mb * 1024 * 1024 // n
rnd = random.Random(7)
for i in range(n):
    d = os.path.join(root, "public", f"d{i % 100:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
        f.write(os.urandom(max(1, int(rnd.uniform(0.5, 1.5) * avg))))
PY
printf '#!/bin/sh\nexec "$DREAM_BIN" static --drain-grace 200ms\n' > "$WORK/src/run"; chmod +x "$WORK/src/run"
echo "<p>release x</p>" > "$WORK/src/public/index.html"
change() {  # rewrite FRACTION (1%) of the files: same size, new bytes
  python3 - "$WORK/src" "$FILES" "$1" <<'PY'
import os, random, sys
root, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
for i in rnd.sample(range(n), max(1, n // 100)):
    p = os.path.join(root, "public", f"d{i % 100:02d}", f"f{i:05d}.bin")
    size = os.path.getsize(p)
    with open(p, "wb") as f:
        f.write(os.urandom(size))
PY
}
# The machine's CPU ticks, busy and all (from /proc/stat): how much of the two cores a phase kept
# busy, since the hosts share them (a deploy that keeps them busy is bound by them here).
cpu_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
hosts_csv() { local s=""; for i in $(seq 0 $((HOSTS - 1))); do s="$s${s:+,}root@$(addr $i)"; done; echo "$s"; }
sent() { local t=0; for i in $(seq 0 $((HOSTS - 1))); do t=$((t + $(cat /sys/class/net/dbf$LAB-$i/statistics/tx_bytes))); done; echo $t; }
# The hosts share this machine's filesystem, so each has its own roots: $WORK/hI/{dream,rsync,tar}.
{ echo "[fleet]"; echo "hosts = ["
  for i in $(seq 0 $((HOSTS - 1))); do echo "  { host = \"root@$(addr $i)\", root = \"$WORK/h$i/dream\" },"; done
  echo "]"; } > "$WORK/fleet.toml"
FLEET=("$DREAM" fleet deploy "$WORK/src" --config "$WORK/fleet.toml" --ssh "$SSH" --remote-dream "$DREAM" --canary 0)
fleet() { "${FLEET[@]}" "$@"; }
port() { case $1 in dream) echo 8081 ;; rsync) echo 8082 ;; tar) echo 8083 ;; esac; }

# First releases everywhere (dream's and the baselines' roots), then the supervisors.
fleet >/dev/null 2>&1
for i in $(seq 0 $((HOSTS - 1))); do
  h=$WORK/h$i; a=$(addr $i)
  mkdir -p "$h/rsync/releases" "$h/tar/releases"
  rsync -a -e "$SSH" "$WORK/src/" root@$a:"$h/rsync/releases/r0/"
  ln -sfn releases/r0 "$h/rsync/current"
  baselines="dream rsync"
  if [ "$TAR" != 0 ]; then
    cp -a "$h/rsync/releases/r0" "$h/tar/releases/r0"; ln -sfn releases/r0 "$h/tar/current"
    baselines="$baselines tar"
  fi
  for r in $baselines; do
    ip netns exec dbf$LAB-$i env DREAM_BIN="$DREAM" "$DREAM" serve --root "$h/$r" --listen "$a:$(port $r)" --workers 1 --ready notify -- ./run >"$h/serve-$r.log" 2>&1 &
  done
done
sleep 2

# (`wait` alone would also wait for the supervisors: each waits for its own jobs.)
switch_and_reload() {  # on every host: current -> releases/$2 in its $1 root, reload
  local pids=()
  for i in $(seq 0 $((HOSTS - 1))); do
    # ...and then, as Capistrano's deploy:cleanup (keep_releases 5, as dream's --keep), the
    # releases beyond the newest five go.
    $SSH root@"$(addr $i)" "cd $WORK/h$i/$1 && ln -s releases/$2 current.tmp && mv -T current.tmp current && $DREAM reload --root $WORK/h$i/$1 >/dev/null && ls -1 releases | sort -V | head -n -5 | sed 's|^|releases/|' | xargs -r rm -rf" </dev/null &
    pids+=($!)
  done
  wait "${pids[@]}"
}
CHANGED_BYTES=0
echo "== $HOSTS hosts, $FILES files, ${MB} MB, 1% rewritten per round; $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
  change "$r"
  CHANGED=$(python3 -c "import os,random,sys; n=$FILES; rnd=random.Random($r); print(sum(os.path.getsize(os.path.join('$WORK/src','public',f'd{i%100:02d}',f'f{i:05d}.bin')) for i in rnd.sample(range(n), max(1,n//100))))")
  # Each tool starts on a clean filesystem: the hosts share this machine's one, and what the
  # last tool left unwritten (rsync does not sync) would otherwise be flushed by the next one's
  # sync, dream's in this order (its prepare moved 1.3-3.1 s from round to round).
  sync
  # dream
  c0=$(cpu_ticks); b0=$(sent); t0=$(date +%s.%N)
  # The coordinator's CPU (its own and its ssh clients'): what a larger fleet costs it.
  /usr/bin/time -f "%Us user %Ss system" -o "$WORK/cpu" "${FLEET[@]}" --id "d$r" >/dev/null 2>"$WORK/d$r.log"
  t1=$(date +%s.%N); b1=$(sent); c1=$(cpu_ticks)
  phases=$(python3 - "$WORK/d$r.log" <<'PY'
import re, sys
def secs(v):
    return float(v[:-2]) / 1000 if v.endswith("ms") else float(v[:-1])
slowest = {}
for line in open(sys.argv[1]):
    m = re.search(r": (connected|prepared|switched) in ([0-9.]+m?s)", line)
    if m:
        slowest[m[1]] = max(slowest.get(m[1], 0), secs(m[2]))
print(" ".join(f"{k} {slowest.get(k, 0):.2f}s" for k in ("connected", "prepared", "switched")))
PY
)
  skew=$(python3 - "$WORK" "$HOSTS" <<'PY'
import re, sys, datetime
work, n = sys.argv[1], int(sys.argv[2])
ts = []
for i in range(n):
    lines = [l for l in open(f"{work}/h{i}/serve-dream.log") if "reload finished" in l]
    t = lines[-1].split()[0]
    ts.append(datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp())
print(round((max(ts) - min(ts)) * 1000, 1))
PY
)
  # rsync --link-dest
  sync
  b2=$(sent); t2=$(date +%s.%N)
  pids=()
  for i in $(seq 0 $((HOSTS - 1))); do
    rsync -a --delete --link-dest=../r$((r - 1)) -e "$SSH" "$WORK/src/" root@"$(addr $i)":"$WORK/h$i/rsync/releases/r$r/" &
    pids+=($!)
  done
  wait "${pids[@]}"
  switch_and_reload rsync "r$r"
  t3=$(date +%s.%N); b3=$(sent)
  # tar | ssh
  sync
  b4=$(sent); t4=$(date +%s.%N)
  if [ "$TAR" != 0 ]; then
    pids=()
    for i in $(seq 0 $((HOSTS - 1))); do
      tar -C "$WORK/src" -cf - . | $SSH root@"$(addr $i)" "mkdir $WORK/h$i/tar/releases/r$r && tar -C $WORK/h$i/tar/releases/r$r -xf -" &
      pids+=($!)
    done
    wait "${pids[@]}"
    switch_and_reload tar "r$r"
  fi
  t5=$(date +%s.%N); b5=$(sent)
  busy=$(python3 -c "b0, a0 = map(int, '$c0'.split()); b1, a1 = map(int, '$c1'.split()); t = $(getconf CLK_TCK); print(f'cores busy {100 * (b1 - b0) / max(1, a1 - a0):.0f}% ({(b1 - b0) / t:.1f} CPU-s)')")
  python3 - "$r" "$t0" "$t1" "$t2" "$t3" "$t4" "$t5" "$b0" "$b1" "$b2" "$b3" "$b4" "$b5" "$CHANGED" "$HOSTS" "$skew" "$phases" "$(cat "$WORK/cpu"); $busy" <<'PY'
import sys
r, t0, t1, t2, t3, t4, t5, b0, b1, b2, b3, b4, b5, changed, hosts, skew, phases, cpu = sys.argv[1:]
t = [float(x) for x in (t0, t1, t2, t3, t4, t5)]
b = [int(x) for x in (b0, b1, b2, b3, b4, b5)]
d, rs, tr = t[1] - t[0], t[3] - t[2], t[5] - t[4]
bd, brs, btr = b[1] - b[0], b[3] - b[2], b[5] - b[4]
goal = int(changed) * int(hosts)
tar = f" | tar|ssh {tr:.2f}s {btr/1e6:.1f} MB" if btr else ""
print(f"round {r}: dream {d:.2f}s {bd/1e6:.1f} MB (skew {skew} ms; slowest host: {phases}; coordinator CPU {cpu}) | rsync {rs:.2f}s {brs/1e6:.1f} MB{tar} "
      f"| dream/rsync time {d/rs:.2f} | dream bytes / (changed x hosts) {bd/goal:.2f}")
PY
done
