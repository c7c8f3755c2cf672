#!/usr/bin/env bash
# Builds anotador for one target:  cross/build.sh TARGET [PROFILE] [--tests]
#   TARGET   aarch64-unknown-linux-musl (Pi 3/4/5, Zero 2, 64-bit OS)
#            armv7-unknown-linux-musleabihf (Pi 2/3/4/5, Zero 2, 32-bit OS)
#            x86_64-unknown-linux-gnu (the host), or any triple cross/env.sh knows
#   PROFILE  device (default for ARM: the shipped binary, release with the non-tract
#            dependencies at opt-level "s"), device-small (all "s": smallest, slower),
#            dist (default for x86_64: release with fat LTO), release, or ci-arm (no LTO, what CI runs under qemu)
#   --tests  also builds the engine test (tests/goldens.rs) in the same cargo
#            run, so dependencies compile once; its path is printed as TEST=...
# Prints BIN=<path to the binary> and its size. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:?usage: cross/build.sh TARGET [PROFILE] [--tests]}"
profile="${2:-}"
tests="${3:-}"
[ "$profile" = --tests ] && { profile=; tests=--tests; }
. cross/env.sh "$target"
[ -n "$profile" ] || profile="$DEFAULT_PROFILE"

target_dir="${CARGO_TARGET_DIR:-target}"
out="$target_dir/$target/$profile"
mkdir -p "$out"
start=$SECONDS
if [ "$tests" = --tests ]; then
  # Building an integration test builds the crate's binaries too (CARGO_BIN_EXE_*).
  cargo test --locked --profile "$profile" --target "$target" --test goldens --no-run \
    --message-format=json-render-diagnostics > "$out/build-messages.json"
  test_bin="$(jq -r 'select(.reason == "compiler-artifact" and .target.name == "goldens" and .executable != null) | .executable' "$out/build-messages.json" | tail -n1)"
  echo "TEST=$test_bin"
else
  cargo build --locked --profile "$profile" --target "$target" --bin anotador
fi
bin="$out/anotador"
echo "BIN=$bin"
echo "size: $(stat -c %s "$bin") bytes ($(numfmt --to=iec-i --suffix=B "$(stat -c %s "$bin")")), built in $((SECONDS - start)) s"
file "$bin" 2>/dev/null || true
