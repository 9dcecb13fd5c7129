#!/usr/bin/env bash
# A deploy beside a program that writes: `dream deploy` of a 100-file source with one file
# changed, on a quiet filesystem and right after another program (a database, a log) left
# MB megabytes not yet written back on the same filesystem. What the deploy makes durable
# should be what it wrote, not the neighbour's data. With OLD (another dream binary) both
# builds are measured, alternated. Median of ROUNDS.
# Usage: bench/deploy-neighbour.sh [ROUNDS] [MB] [OLD]   (default 5 rounds, 1500 MB)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-5}
MB=${2:-1500}
OLD=${3:-}
mkdir -p "$WORK/src"
for i in $(seq 100); do head -c 10000 /dev/urandom > "$WORK/src/f$i"; done
builds=("$DREAM"); [ -n "$OLD" ] && builds+=("$OLD")
# Each build deploys into a root of its own: ROOT_i for builds[i].
root_of() { local i; for i in "${!builds[@]}"; do [ "${builds[$i]}" = "$1" ] && echo "$WORK/root$i"; done; }
for b in "${builds[@]}"; do mkdir -p "$(root_of "$b")"; "$b" deploy -q --root "$(root_of "$b")" "$WORK/src" >/dev/null; done
secs() { local t0 t1; t0=$(date +%s.%N); "$1" deploy -q --root "$(root_of "$1")" "$WORK/src" >/dev/null; t1=$(date +%s.%N); python3 -c "print(round($t1 - $t0, 3))"; }
declare -A quiet busy
for r in $(seq "$ROUNDS"); do
  for b in "${builds[@]}"; do
    head -c 10000 /dev/urandom > "$WORK/src/f$r"; sync
    q=$(secs "$b")
    head -c 10000 /dev/urandom > "$WORK/src/f$((r + 50))"; sync
    dd if=/dev/urandom of="$WORK/neighbour" bs=1M count="$MB" status=none
    n=$(secs "$b")
    rm -f "$WORK/neighbour"; sync
    quiet[$b]="${quiet[$b]:-} $q"; busy[$b]="${busy[$b]:-} $n"
    echo "round $r $b: quiet ${q}s, beside ${MB} MB unwritten ${n}s"
  done
done
med() { printf '%s\n' $1 | sort -n | sed -n "$(( ($(echo $1 | wc -w) + 1) / 2 ))p"; }
for b in "${builds[@]}"; do echo "median $b: quiet $(med "${quiet[$b]}")s, beside ${MB} MB unwritten $(med "${busy[$b]}")s"; done
