# Sourced by the other cross/ scripts: `. cross/env.sh TARGET`.
# Sets, for one Rust target triple:
#   CC_<triple>, AR_<triple>   Debian's cross gcc/ar, for the C and assembly of
#                              tract-linalg (kernels) and ring (crypto)
#   RUSTUP_TOOLCHAIN           only where the default toolchain ships no std for it
#   QEMU, QEMU_SYSROOT         the qemu-user binary; -L sysroot for glibc builds
#   run_target BIN ARGS...     runs a binary of the target (qemu-user where needed)
#   CROSS_PREFIX, DEB_ARCH     binutils prefix (strip) and the Debian architecture
#   DEFAULT_PROFILE            device (ARM: fat LTO, dependencies sized down) or dist (x86_64: fat LTO)
# Linkers and default qemu runners are in .cargo/config.toml.

cross_target="${1:?usage: . cross/env.sh TARGET}"

# rust-std for armv7-unknown-linux-musleabihf is not published for 1.94 / 1.95
# (the channel manifests say available = false); 1.93.0 has it. Pinned here and
# installed by cross/setup.sh. ARMv6 gnu (arm-unknown-linux-gnueabihf) is likewise
# 1.93-only; ARMv6 musl has no rust-std in any of 1.92-1.95.
ARMV7_MUSL_TOOLCHAIN="${ARMV7_MUSL_TOOLCHAIN:-1.93.0}"

case "$cross_target" in
  aarch64-unknown-linux-musl|aarch64-unknown-linux-gnu)
    CROSS_PREFIX=aarch64-linux-gnu; QEMU=qemu-aarch64; DEB_ARCH=arm64; DEFAULT_PROFILE=device ;;
  armv7-unknown-linux-musleabihf|armv7-unknown-linux-gnueabihf|arm-unknown-linux-gnueabihf)
    CROSS_PREFIX=arm-linux-gnueabihf; QEMU=qemu-arm; DEB_ARCH=armhf; DEFAULT_PROFILE=device ;;
  x86_64-unknown-linux-gnu|x86_64-unknown-linux-musl)
    CROSS_PREFIX=x86_64-linux-gnu; QEMU=; DEB_ARCH=amd64; DEFAULT_PROFILE=dist ;;
  *) echo "cross/env.sh: unsupported target $cross_target" >&2; return 1 ;;
esac

case "$cross_target" in
  armv7-unknown-linux-musleabihf|arm-unknown-linux-gnueabihf)
    export RUSTUP_TOOLCHAIN="$ARMV7_MUSL_TOOLCHAIN" ;;
esac

case "$cross_target" in
  *-gnu|*-gnueabihf) QEMU_SYSROOT="/usr/$CROSS_PREFIX" ;;
  *) QEMU_SYSROOT= ;;
esac

if [ "$cross_target" != x86_64-unknown-linux-gnu ]; then
  cross_env_triple="$(echo "$cross_target" | tr - _)"
  export "CC_${cross_env_triple}=${CROSS_PREFIX}-gcc"
  export "CXX_${cross_env_triple}=${CROSS_PREFIX}-g++"
  export "AR_${cross_env_triple}=${CROSS_PREFIX}-ar"
fi
if command -v "${CROSS_PREFIX}-strip" >/dev/null 2>&1; then STRIP="${CROSS_PREFIX}-strip"; else STRIP=strip; fi
export CROSS_PREFIX QEMU QEMU_SYSROOT DEB_ARCH STRIP DEFAULT_PROFILE

# Runs a binary of this target: natively for x86_64, under qemu-user otherwise
# (with -L sysroot for glibc builds). cross/check.sh adds -cpu itself.
run_target() {
  if [ -n "$QEMU" ]; then
    "$QEMU" ${QEMU_SYSROOT:+-L "$QEMU_SYSROOT"} "$@"
  else
    "$@"
  fi
}
