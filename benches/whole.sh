#!/usr/bin/env bash
# Whole processes side by side (not a test): `anotador annotate`, onnxruntime +
# tokenizers in Python (benches/ort_annotate.py) and rten 0.27 + tokenizers
# (benches/rten-annotate), each on one core (`taskset -c 0`, one thread), over the
# same lines, runs alternated; prints the CPU, each run's wall seconds, the medians
# and the ratios to onnxruntime and rten.
#
#   benches/whole.sh LINES_FILE [MODEL_DIR]
#
# The README's figures used the 1,915 sentences of CoNLL-2002 esp.testa, words joined
# (shared data, not in the repo; ../shared/data/conll2002_es/esp.testa):
#
#   awk '/^-DOCSTART-/{next} NF==0{if(s!="")print s; s=""; next}
#        {s=(s==""?$1:s" "$1)} END{if(s!="")print s}' esp.testa > testa.txt
#
# Environment: ROUNDS (5), PYTHON (with onnxruntime, numpy, tokenizers; default
# python3), ANOTADOR (default target/release/anotador, built if missing), KERNELS
# (anotador candidates to time, comma list; default "auto").
set -euo pipefail
cd "$(dirname "$0")/.."

LINES=${1:?usage: benches/whole.sh LINES_FILE [MODEL_DIR]}
MODEL=${2:-models/ner-es}
ROUNDS=${ROUNDS:-5}
PYTHON=${PYTHON:-python3}
BIN=${ANOTADOR:-target/release/anotador}
KERNELS=${KERNELS:-auto}
[ -x "$BIN" ] || cargo build --release --locked
RTEN=benches/rten-annotate/target/release/rten-annotate
[ -x "$RTEN" ] || (cd benches/rten-annotate && cargo build --release --locked)
"$PYTHON" -c "import onnxruntime, numpy, tokenizers" || {
  echo "benches/whole.sh: $PYTHON lacks onnxruntime/numpy/tokenizers (models/requirements.txt)" >&2
  exit 1
}

"$BIN" bench --model "$MODEL" --kernel dequantize --seconds 0.1 2>/dev/null | head -2
echo "lines: $(grep -c . "$LINES") from $LINES; model $MODEL; $ROUNDS rounds, alternated, taskset -c 0"

declare -A times
engines=()
IFS=, read -r -a kernels <<<"$KERNELS"
for k in "${kernels[@]}"; do engines+=("anotador:$k"); done
engines+=(onnxruntime rten)
for round in $(seq "$ROUNDS"); do
  for e in "${engines[@]}"; do
    case "$e" in
      anotador:*) cmd=("$BIN" annotate --model "$MODEL" --threads 1 --quiet --kernel "${e#anotador:}") ;;
      onnxruntime) cmd=("$PYTHON" benches/ort_annotate.py "$MODEL") ;;
      rten) cmd=(env RAYON_NUM_THREADS=1 "$RTEN" "$MODEL") ;;
    esac
    t0=$(date +%s.%N)
    taskset -c 0 "${cmd[@]}" < "$LINES" > /dev/null
    t=$(echo "$(date +%s.%N) - $t0" | bc -l)
    times[$e]="${times[$e]:-} $t"
    printf 'round %d %-24s %.2f s\n' "$round" "$e" "$t"
  done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
ort=$(echo "${times[onnxruntime]}" | median)
rten=$(echo "${times[rten]}" | median)
echo
echo "| engine | median s | vs onnxruntime | vs rten |"
echo "|---|---|---|---|"
for e in "${engines[@]}"; do
  m=$(echo "${times[$e]}" | median)
  printf '| %s | %.2f | %.2f | %.2f |\n' "$e" "$m" "$(echo "$m / $ort" | bc -l)" "$(echo "$m / $rten" | bc -l)"
done
