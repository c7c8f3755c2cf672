#!/usr/bin/env bash
# Batch benchmark of `anotador annotate` (not a test): lines/s with 1 and 2 worker
# threads on the same file, runs alternated, best-of; RSS of each run; and peak RSS
# for a 10k- and a 100k-line input (bounded memory).
#
#   benches/annotate.sh [MODEL_DIR] [LINES_FILE]
#
# MODEL_DIR defaults to models/ner-es; LINES_FILE (one text per line, repeated to
# the sizes below) to benches/messages-es.txt. The README's table used the
# sentences of CoNLL-2002 esp.testa, words joined (shared data, not in the repo):
#
#   awk '/^-DOCSTART-/{next} NF==0{if(s!="")print s; s=""; next}
#        {s=(s==""?$1:s" "$1)} END{if(s!="")print s}' esp.testa > testa.txt
#
# Environment: ANOTADOR (the binary; default target/release/anotador, built if
# missing), ROUNDS (3), LINES (5000: the 1-vs-2-thread file), BIG ("10000 100000"),
# BIG_THREADS (2). Each run reads its input through a FIFO: the model is loaded
# (and its RSS sampled: "loaded") before the first line is written, so lines/s
# leaves loading out, and "peak" is the largest VmRSS sampled every 50 ms while
# lines flow (VmHWM would report the load's transient peak instead).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-models/ner-es}
SOURCE=${2:-benches/messages-es.txt}
ROUNDS=${ROUNDS:-3}
LINES=${LINES:-5000}
BIG=${BIG:-"10000 100000"}
BIG_THREADS=${BIG_THREADS:-2}
BIN=${ANOTADOR:-target/release/anotador}
if [ ! -x "$BIN" ]; then
  cargo build --release --locked
fi

TMP=$(mktemp -d /tmp/anotador-bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

# N lines: the source's non-empty lines, cycled.
make_input() {
  awk -v n="$1" 'NF { a[c++] = $0 } END { for (i = 0; i < n; i++) print a[i % c] }' \
    "$SOURCE" > "$2"
}

# VmRSS of a live process in KiB; empty once it has exited (a zombie has none).
rss_kib() {
  local key value _
  {
    while read -r key value _; do
      if [ "$key" = "VmRSS:" ]; then echo "$value"; return; fi
    done < "/proc/$1/status"
  } 2>/dev/null || true
}

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# One run: threads, input file. Prints "threads lines seconds lines/s loaded_kib peak_kib load".
run_one() {
  local threads=$1 input=$2 fifo="$TMP/fifo" out="$TMP/out.jsonl"
  rm -f "$fifo" "$out"
  mkfifo "$fifo"
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  "$BIN" annotate --model "$MODEL" --threads "$threads" -i "$fifo" -o "$out" --overwrite -q &
  local pid=$!
  # Loaded and blocked opening the FIFO: RSS settles.
  sleep 2
  local loaded
  loaded=$(rss_kib "$pid")
  local t0 t1 peak=0 now
  t0=$(date +%s.%N)
  cat "$input" > "$fifo" &
  while now=$(rss_kib "$pid"); [ -n "$now" ]; do
    if [ "$now" -gt "$peak" ]; then peak=$now; fi
    sleep 0.05
  done
  t1=$(date +%s.%N)
  wait "$pid"
  local lines
  lines=$(wc -l < "$out")
  if [ "$lines" -ne "$(wc -l < "$input")" ]; then
    echo "run with $threads threads wrote $lines lines" >&2
    exit 1
  fi
  awk -v t="$threads" -v n="$lines" -v a="$t0" -v b="$t1" -v l="$loaded" -v p="$peak" -v ld="$load" \
    'BEGIN { printf "%s %d %.2f %.1f %d %d %s\n", t, n, b - a, n / (b - a), l, p, ld }'
}

echo "# $(date -u +%FT%TZ) $(uname -m), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "# model $MODEL, lines from $SOURCE, binary $BIN"
echo

make_input "$LINES" "$TMP/scale.txt"
echo "## 1 vs 2 threads, $LINES lines, $ROUNDS rounds alternated"
echo
echo "| round | threads | seconds | lines/s | RSS loaded | peak RSS while running | load avg (1 min) before |"
echo "|---|---|---|---|---|---|---|"
results="$TMP/scale.tsv"
: > "$results"
for round in $(seq 1 "$ROUNDS"); do
  # Alternate which goes first, so that a change of load hits both alike.
  if [ $((round % 2)) -eq 1 ]; then order="1 2"; else order="2 1"; fi
  for t in $order; do
    read -r threads n secs rate loaded peak load < <(run_one "$t" "$TMP/scale.txt")
    echo "$round $threads $secs $rate $loaded $peak $load" >> "$results"
    echo "| $round | $threads | $secs | $rate | $(mib "$loaded") MiB | $(mib "$peak") MiB | $load |"
  done
done
echo
awk '
  { rate[$2] = ($4 > rate[$2]) ? $4 : rate[$2]
    if (!($2 in peak) || $6 < peak[$2]) peak[$2] = $6
    if (!($2 in loaded) || $5 < loaded[$2]) loaded[$2] = $5
    r[$1, $2] = $4; rounds = ($1 > rounds) ? $1 : rounds }
  END {
    printf "best of %d: 1 thread %.1f lines/s, 2 threads %.1f lines/s: %.2fx (target >= 1.8x)\n",
      rounds, rate[1], rate[2], rate[2] / rate[1]
    printf "per round:"
    for (i = 1; i <= rounds; i++) printf " %.2fx", r[i, 2] / r[i, 1]
    printf "\n"
    state = peak[1] - loaded[1]
    printf "RSS (lowest peak of the rounds): 1 thread %.1f MiB, 2 threads %.1f MiB; loaded %.1f MiB;\n",
      peak[1] / 1024, peak[2] / 1024, loaded[1] / 1024
    printf "one engine state at work (1-thread peak - loaded) %.1f MiB; 2 threads - 1 thread = %.1f MiB: %s\n",
      state / 1024, (peak[2] - peak[1]) / 1024,
      (peak[2] <= peak[1] + state) ? "met (2 threads <= 1 thread + one state)" : "MISSED"
  }' "$results"
echo

echo "## Bounded memory: $BIG_THREADS threads"
echo
echo "| lines | seconds | lines/s | RSS loaded | peak RSS while running | load avg before |"
echo "|---|---|---|---|---|---|"
for n in $BIG; do
  make_input "$n" "$TMP/big.txt"
  read -r threads lines secs rate loaded peak load < <(run_one "$BIG_THREADS" "$TMP/big.txt")
  echo "| $lines | $secs | $rate | $(mib "$loaded") MiB | $(mib "$peak") MiB | $load |"
done
