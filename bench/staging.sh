#!/usr/bin/env bash
# Release staging: `dream deploy` of a 10,000-file, 100 MB tree with 1% of the files changed,
# versus a full copy (`cp -a`) and `rsync -a --link-dest` of the same tree, alternating,
# in one run. Reports wall time, new disk space, and dream's switch time (rename + fsync).
# Usage: bench/staging.sh [ROUNDS]   (default 3). Installs rsync from Debian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
command -v rsync >/dev/null || { apt-get update -qq && apt-get install -y -qq rsync >/dev/null; }
cargo build --release -q
DREAM=$PWD/target/release/dream
WORK=$(mktemp -d /var/tmp/dream-stage.XXXXXX)
trap 'chmod -R u+w "$WORK"; rm -rf "$WORK"' EXIT
run() { echo "+ $*" >&2; "$@"; }
now() { date +%s.%N; }
kb() { du -sk "$@" | awk '{s+=$1} END {print s}'; }

echo "building the tree: 10,000 files x 10 kB" >&2
python3 - "$WORK/src" <<'PY'
import os, sys
root = sys.argv[1]
for i in range(10000):
    d = os.path.join(root, "assets", f"{i % 100:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i}.bin"), "wb") as f:
        f.write(os.urandom(10 * 1024))
PY
mkdir -p "$WORK/root" "$WORK/copies" "$WORK/rsync"
"$DREAM" deploy -q --root "$WORK/root" "$WORK/src" --json >/dev/null
cp -a "$WORK/src" "$WORK/rsync/base"
sync
printf "%-6s %-22s %10s %14s %12s\n" round method seconds "new disk kB" "switch ms"
prev=base
for r in $(seq "$ROUNDS"); do
  # Change 1% of the files (100 of 10,000), as a new build would.
  python3 - "$WORK/src" "$r" <<'PY'
import os, sys
root, r = sys.argv[1], int(sys.argv[2])
for i in range(r, 10000, 100):
    with open(os.path.join(root, "assets", f"{i % 100:02d}", f"{i}.bin"), "wb") as f:
        f.write(os.urandom(10 * 1024))
PY
  sync
  before=$(kb "$WORK/root/releases")
  t0=$(now); out=$(run "$DREAM" deploy -q --root "$WORK/root" "$WORK/src" --json --keep 100); t1=$(now)
  after=$(kb "$WORK/root/releases")
  sw=$(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["switch_ms"],2))' "$out")
  printf "%-6s %-22s %10.3f %14s %12s\n" "$r" "dream deploy" "$(echo "$t1 - $t0" | bc)" "$((after - before))" "$sw"

  t0=$(now); run cp -a "$WORK/src" "$WORK/copies/$r"; sync -f "$WORK/copies/$r"; t1=$(now)
  printf "%-6s %-22s %10.3f %14s %12s\n" "$r" "cp -a (+sync)" "$(echo "$t1 - $t0" | bc)" "$(kb "$WORK/copies/$r")" "-"

  before=$(kb "$WORK/rsync")
  t0=$(now); run rsync -a --link-dest="$WORK/rsync/$prev" "$WORK/src/" "$WORK/rsync/r$r/"; sync -f "$WORK/rsync/r$r"; t1=$(now)
  prev=r$r
  after=$(kb "$WORK/rsync")
  printf "%-6s %-22s %10.3f %14s %12s\n" "$r" "rsync --link-dest" "$(echo "$t1 - $t0" | bc)" "$((after - before))" "-"
done
