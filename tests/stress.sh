#!/usr/bin/env bash
# Runs the suites that start daemons and brokers ROUNDS times in a row (default 20)
# under a CPU hog on every core (`yes > /dev/null`, one per core), and prints a table of
# runs and failures per suite. What it shows: a test that waits for events rather than
# for luck passes on a loaded machine too. Not part of `cargo test`.
#
#   tests/stress.sh [ROUNDS] [SUITE...]      # e.g. tests/stress.sh 20
#   HOG=0 tests/stress.sh 5 embedded         # without the hog
#
# Failed runs' output is kept under target/stress/.
set -uo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-20}
shift || true
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(daemon embedded faults lifecycle request_response security annotate)

cargo test --no-run --quiet 2>/dev/null || cargo test --no-run || exit 1
out=target/stress
mkdir -p "$out"

hogs=()
stop_hogs() { [ ${#hogs[@]} -eq 0 ] || kill "${hogs[@]}" 2>/dev/null; }
trap stop_hogs EXIT
if [ "${HOG:-1}" != 0 ]; then
  for _ in $(seq "$(nproc)"); do
    yes >/dev/null &
    hogs+=($!)
  done
fi

echo "$(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, hogs: ${#hogs[@]}"
declare -A failures seconds
for s in "${suites[@]}"; do failures[$s]=0; seconds[$s]=0; done
for round in $(seq "$rounds"); do
  for s in "${suites[@]}"; do
    t0=$SECONDS
    if cargo test --quiet --test "$s" >"$out/$s.$round.log" 2>&1; then
      rm -f "$out/$s.$round.log"
    else
      failures[$s]=$((failures[$s] + 1))
      echo "round $round: $s FAILED (target/stress/$s.$round.log)"
    fi
    seconds[$s]=$((seconds[$s] + SECONDS - t0))
  done
done

echo
echo "| suite | runs | failures | mean s per run |"
echo "|---|---|---|---|"
total=0
for s in "${suites[@]}"; do
  echo "| $s | $rounds | ${failures[$s]} | $((seconds[$s] / rounds)) |"
  total=$((total + failures[$s]))
done
exit $((total > 0))
