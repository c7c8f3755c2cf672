#!/usr/bin/env bash
# Installs what cross builds, emulated tests and packages need, only when absent:
#   cross/setup.sh TARGET...
# Debian packages (bookworm): the cross gcc/binutils and libc headers of each
# target, qemu-user, jq (JSON comparison in cross/check.sh), man-db and lintian
# (cross/deb-check.sh, .ci/run); rustup: the target's
# std (and the pinned toolchain where the default one ships none, see env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=()
need() { dpkg -s "$1" >/dev/null 2>&1 || pkgs+=("$1"); }
rust_targets=()
for t in "$@"; do
  case "$t" in
    aarch64-*) need gcc-aarch64-linux-gnu; need libc6-dev-arm64-cross; need qemu-user ;;
    armv7-*|arm-*) need gcc-arm-linux-gnueabihf; need libc6-dev-armhf-cross; need qemu-user ;;
    x86_64-*) ;;
    *) echo "cross/setup.sh: unsupported target $t" >&2; exit 2 ;;
  esac
  rust_targets+=("$t")
done
need jq
# Packages: man (deb-check renders the manual pages) and lintian (Debian's package
# checker, run on the amd64 package in CI).
need man-db
need lintian
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "apt: ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

for t in "${rust_targets[@]}"; do
  # shellcheck source=cross/env.sh
  ( . cross/env.sh "$t"
    tc="${RUSTUP_TOOLCHAIN:-}"
    if [ -n "$tc" ]; then
      rustup toolchain list | grep -q "^$tc" \
        || rustup toolchain install "$tc" --profile minimal --no-self-update >/dev/null
      rustup target add --toolchain "$tc" "$t" >/dev/null
    else
      rustup target add "$t" >/dev/null
    fi
    echo "rust: $t ($(rustc --version))" )
done
