#!/usr/bin/env bash
# Functional check of one ARM target under qemu-user (what CI runs):
#   cross/check.sh TARGET [--native BIN] [--cpus "CPU[:VAR=VALUE,...] ..."] [--profile P]
# 1. builds the engine test (tests/goldens.rs) and anotador for TARGET in one cargo
#    run (profile ci-arm: no LTO; cross/build.sh --tests);
# 2. for each qemu CPU model: runs the goldens test binary (all of it under the first
#    model, its tract test under the others), then `anotador annotate`
#    of cross/samples.txt with each shipped model (models/ner-es, pos-es, emotion-es),
#    and compares the JSON with what the native BIN printed (default
#    target/debug/anotador, which `cargo test` builds): labels, words, offsets and
#    every other field exactly, `score` within 1e-3, `timings_ms` ignored (cross/compare.jq).
#    Why 1e-3: activations are quantized to int8 per row, so a last-bit difference in an
#    f32 value before quantization (armv7 NEON has no fused multiply-add) can move it one
#    quantum, seen as up to 2.7e-4 on a softmax score; labels and offsets stay exact.
# VAR=VALUE pairs are set for that CPU's runs: tract reads /proc/cpuinfo to pick
# kernels and qemu-user shows the host's there, so TRACT_CPU_AARCH64_KIND /
# TRACT_CPU_ARM32_NEON stand in for what a real Pi reports (cross/README.md).
# 3. every int8 kernel the target has (aarch64: tract and rten; armv7: tract) annotates
#    models/ner-es the same as native (the goldens test already runs each kernel);
# 4. `anotador bench` runs to the end under the first CPU model (its figures are
#    meaningless under qemu: it is run to show it works, and the table is printed).
# Under qemu inference is 18-600x slower: nothing here is a timing.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:?usage: cross/check.sh TARGET [--native BIN] [--cpus LIST] [--profile P]}"; shift
native=target/debug/anotador
profile=ci-arm
cpus=""
while [ $# -gt 0 ]; do
  case "$1" in
    --native) native="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    *) echo "cross/check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
. cross/env.sh "$target"
if [ -z "$cpus" ]; then
  case "$target" in
    # Pi 3 / Zero 2 (Cortex-A53: tract's a53 f32 kernels, SMLAL int8; rten-gemm's MLAL),
    # Pi 5 (Cortex-A76: SDOT int8 in both), and qemu's max core (i8mm: rten-gemm's
    # SMMLA kernel, which no Pi has yet but Neoverse servers do).
    aarch64-*) cpus="cortex-a53:TRACT_CPU_AARCH64_KIND=a53 cortex-a76 max" ;;
    # Pi 2 (Cortex-A7, NEON kernels as on the device). Not qemu's `max` core any more:
    # there tract's detection (from the host's /proc/cpuinfo) finds no NEON and runs its
    # VFP kernels, which no device runs this binary with (it is built with +neon, so a
    # core without NEON cannot run it at all, and every Pi's cpuinfo shows neon). Cut
    # to keep CI under an hour; `--cpus "cortex-a7:TRACT_CPU_ARM32_NEON=true max"` runs it.
    armv7-*|arm-*) cpus="cortex-a7:TRACT_CPU_ARM32_NEON=true" ;;
    *) echo "cross/check.sh: no qemu CPU models for $target" >&2; exit 2 ;;
  esac
fi
[ -x "$native" ] || { echo "cross/check.sh: no native binary at $native (cargo build first, or --native)" >&2; exit 1; }
models=(ner-es pos-es emotion-es)
case "$target" in
  aarch64-*) extra_kernels=(rten) ;;
  *) extra_kernels=() ;;
esac
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
qemu=("$QEMU")
[ -n "$QEMU_SYSROOT" ] && qemu+=(-L "$QEMU_SYSROOT")

t0=$SECONDS
build_out="$(cross/build.sh "$target" "$profile" --tests)"
echo "$build_out"
test_bin="$(sed -n 's/^TEST=//p' <<<"$build_out")"
bin="$(sed -n 's/^BIN=//p' <<<"$build_out")"
echo "-- build: $((SECONDS - t0)) s"

t0=$SECONDS
for m in "${models[@]}"; do
  "$native" annotate --model "models/$m" < cross/samples.txt > "$work/native-$m.jsonl"
done
echo "-- native annotate ($(uname -m)): $((SECONDS - t0)) s"

# Kernel choice, logged by tract-linalg (debug: ISA and tiers; info: aarch64 CPU kind).
tract_log="tract_linalg::isa=debug,tract_linalg::mmm_tiers=debug,tract_linalg::arm64=info"
failed=0
summary=()
for spec in $cpus; do
  cpu="${spec%%:*}"
  envs=()
  if [ "$spec" != "$cpu" ]; then IFS=, read -r -a envs <<<"${spec#*:}"; fi
  run() { env ${envs[@]+"${envs[@]}"} "${qemu[@]}" -cpu "$cpu" "$@"; }
  label="$target -cpu $cpu${envs[*]:+ (${envs[*]})}"

  t0=$SECONDS
  # The whole engine test under the first CPU model (minutes under qemu: most of it is
  # the tokenizer and task code, the same on every core, and reloading bundles); under
  # the others only the test that runs every fixture architecture through tract's
  # kernels (~30 s). CHECK_FULL_GOLDENS=1 runs all of it everywhere.
  filter=()
  if [ "$spec" != "${cpus%% *}" ] && [ "${CHECK_FULL_GOLDENS:-0}" != 1 ]; then
    filter=(tract_int8_agrees_with_onnxruntime_and_torch)
  fi
  echo "== goldens under qemu: $label${filter[*]:+ (only ${filter[*]})}"
  if run "$test_bin" ${filter[@]+"${filter[@]}"} > "$work/goldens.log" 2>&1; then g=ok; else g=FAILED; failed=1; fi
  cat "$work/goldens.log"
  counts="$(grep -o '[0-9]* passed; [0-9]* failed' "$work/goldens.log" | tail -n1)"
  echo "-- goldens ($label): $g, ${counts:-no result line}, $((SECONDS - t0)) s"

  t0=$SECONDS
  echo "== annotate under qemu vs native: $label"
  kernels=""
  same=same
  for m in "${models[@]}"; do
    if ! RUST_LOG="$tract_log" run "$bin" annotate --model "models/$m" \
        < cross/samples.txt > "$work/arm-$m.jsonl" 2> "$work/arm-$m.err"; then
      cat "$work/arm-$m.err"; failed=1; same=FAILED; echo "annotate $m: FAILED (exit)"; continue
    fi
    # What tract-linalg found (ISA probe), the matmul kernel tiers it ranks for it,
    # and the aarch64 CPU kind its f32 kernels are tuned for.
    [ -n "$kernels" ] || kernels="$(sed -n 's/.*\] \(ISA: .*\|mmm tiers for .*: \(.*\)\|CPU optimisation: .*\)$/\1/p' \
      "$work/arm-$m.err" | sed 's/^mmm tiers for .*: /tiers: /' | sort -u | paste -sd ';' -)"
    result="$(jq -nc --slurpfile a "$work/native-$m.jsonl" --slurpfile b "$work/arm-$m.jsonl" \
      --argjson tol 1e-3 -f cross/compare.jq)"
    echo "annotate $m: $result"
    jq -e .ok >/dev/null <<<"$result" || { failed=1; same=DIFFERENT; }
  done
  for k in ${extra_kernels[@]+"${extra_kernels[@]}"}; do
    if ! run "$bin" annotate --model models/ner-es --kernel "$k" \
        < cross/samples.txt > "$work/arm-$k.jsonl" 2> "$work/arm-$k.err"; then
      cat "$work/arm-$k.err"; failed=1; same=FAILED; echo "annotate ner-es --kernel $k: FAILED (exit)"; continue
    fi
    result="$(jq -nc --slurpfile a "$work/native-ner-es.jsonl" --slurpfile b "$work/arm-$k.jsonl" \
      --argjson tol 1e-3 -f cross/compare.jq)"
    echo "annotate ner-es --kernel $k: $result"
    jq -e .ok >/dev/null <<<"$result" || { failed=1; same=DIFFERENT; }
  done
  echo "-- annotate ($label): $((SECONDS - t0)) s${kernels:+; tract: $kernels}"
  if [ "$spec" = "${cpus%% *}" ]; then
    t0=$SECONDS
    echo "== anotador bench under qemu ($label): figures meaningless under emulation"
    if run "$bin" bench --model models/ner-es --seconds 0 --messages 3 > "$work/bench.txt" 2>&1; then b=ok; else b=FAILED; failed=1; fi
    cat "$work/bench.txt"
    echo "-- bench ($label): $b, $((SECONDS - t0)) s"
    summary+=("$label: anotador bench $b")
  fi
  summary+=("$label: goldens $g (${counts:-?}), annotate vs native: $same")
done

echo "== summary $target"
printf '%s\n' "${summary[@]}"
exit "$failed"
