#!/usr/bin/env bash
# Assembles the Debian package of anotador for one target:
#   cross/deb.sh TARGET [PROFILE] [--bin PATH] [--out DIR]
# TARGET picks the Debian architecture (aarch64-* arm64, armv7-* armhf, x86_64-* amd64)
# and, unless --bin is given, the binary target/TARGET/PROFILE/anotador that
# cross/build.sh made (PROFILE: device for ARM, dist for x86_64, as there). Writes
# DIR/anotador_VERSION_ARCH.deb (DIR: target/deb) with plain dpkg-deb, no debhelper:
#   /usr/bin/anotador
#   /usr/share/anotador/models/{ner-es,pos-es,emotion-es}/   the shipped bundles
#   /etc/anotador/anotador.toml          conffile: config/anotador.toml with the
#                                        model paths pointing at /usr/share/anotador
#                                        and the external broker on 127.0.0.1
#   /lib/systemd/system/anotador.service config/anotador.service
#   /usr/share/doc/anotador/{copyright,README.md,MODEL-DATA-LICENSES.md,docs/}
#   /usr/share/man/man1/anotador*.1.gz  `anotador generate man`
#   /usr/share/{bash-completion/completions/anotador, zsh/vendor-completions/_anotador,
#     fish/vendor_completions.d/anotador.fish}   `anotador generate completions`
# Maintainer scripts follow dh_installsystemd's snippets with --no-start: the unit is
# enabled on first install but not started (the broker in /etc/anotador/anotador.toml
# is usually edited first); an upgrade restarts it only if it was running; removal
# stops it; purge forgets the enablement.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:?usage: cross/deb.sh TARGET [PROFILE] [--bin PATH] [--out DIR]}"; shift
profile=
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then profile="$1"; shift; fi
bin=""; outdir="${CARGO_TARGET_DIR:-target}/deb"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --out) outdir="$2"; shift 2 ;;
    *) echo "cross/deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
. cross/env.sh "$target"
[ -n "$profile" ] || profile="$DEFAULT_PROFILE"
[ -n "$bin" ] || bin="${CARGO_TARGET_DIR:-target}/$target/$profile/anotador"
[ -x "$bin" ] || { echo "cross/deb.sh: no binary at $bin (run cross/build.sh $target $profile)" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
revision="${DEB_REVISION:-1}"
# Whoever distributes the package names themselves (DEB_MAINTAINER); the default is a
# reserved .invalid address, honest that nobody answers there, and one lintian accepts.
maintainer="${DEB_MAINTAINER:-anotador maintainers <maintainers@anotador.invalid>}"
# The package's dates (Debian changelog, copyright years) from the commit it is built
# from, so two builds of one commit are the same package; SOURCE_DATE_EPOCH wins.
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
first_year=2026
year="$(date -u -d "@$epoch" +%Y)"
years="$first_year"; [ "$year" = "$first_year" ] || years="$first_year-$year"
models=(ner-es pos-es emotion-es)

# The binary's run-time dependency: none when static (musl), else libc6 at the
# newest glibc symbol version it references.
depends=""
if "${CROSS_PREFIX}-readelf" -d "$bin" 2>/dev/null | grep -q NEEDED; then
  glibc="$("${CROSS_PREFIX}-objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)"
  depends="libc6 (>= $glibc), libgcc-s1"
fi

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/anotador_${version}-${revision}_${DEB_ARCH}"
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/etc/anotador" \
  "$root/lib/systemd/system" "$root/usr/share/anotador/models" "$root/usr/share/doc/anotador"

install -m 0755 "$bin" "$root/usr/bin/anotador"
# Already stripped by the release-based profiles (dist, device, ci-arm); a dev build is not.
"$STRIP" --strip-unneeded "$root/usr/bin/anotador" 2>/dev/null || true

for m in "${models[@]}"; do
  [ -f "models/$m/model.onnx" ] || { echo "cross/deb.sh: models/$m is missing" >&2; exit 1; }
  install -d -m 0755 "$root/usr/share/anotador/models/$m"
  install -m 0644 "models/$m"/* "$root/usr/share/anotador/models/$m/"
done

# The packaged configuration: the repository's, with absolute model paths (relative
# paths in it are resolved against the file's own directory, which is /etc/anotador),
# and the external broker on 127.0.0.1 (Mosquitto, a Recommends) instead of the
# embedded one: a system broker outlives the daemon's restarts and upgrades, which
# the embedded one, in the daemon's process, does not (docs/raspberry-pi.md,
# "Install on a Raspberry Pi"). Switching back is one section: uncomment [broker.embedded] and its
# listen line, comment host and port.
sed -e 's|^path = "\.\./models/|path = "/usr/share/anotador/models/|' \
    -e 's#anotador \(run\|check\) --config config/anotador.toml#anotador \1 --config /etc/anotador/anotador.toml#' \
    -e 's|^# host = "127.0.0.1"$|host = "127.0.0.1"|' \
    -e 's|^# port = 1883$|port = 1883|' \
    -e 's|^\[broker\.embedded\]$|# [broker.embedded]|' \
    -e 's|^listen = "127.0.0.1:1883"$|# listen = "127.0.0.1:1883"|' \
    -e 's|^# data_dir = "/var/lib/anotador/broker"$|# data_dir = "/var/lib/anotador/broker"   # StateDirectory= of the unit|' \
    config/anotador.toml > "$root/etc/anotador/anotador.toml"
chmod 0644 "$root/etc/anotador/anotador.toml"
if grep -q '^path = "\.\.' "$root/etc/anotador/anotador.toml"; then
  echo "cross/deb.sh: a model path in config/anotador.toml was not rewritten" >&2; exit 1
fi
grep -q '^path = "/usr/share/anotador/models/' "$root/etc/anotador/anotador.toml"
grep -q '^host = "127.0.0.1"$' "$root/etc/anotador/anotador.toml" \
  && grep -q '^port = 1883$' "$root/etc/anotador/anotador.toml" \
  && grep -q '^# \[broker\.embedded\]$' "$root/etc/anotador/anotador.toml" \
  && ! grep -q '^\[broker\.embedded\]' "$root/etc/anotador/anotador.toml" \
  || { echo "cross/deb.sh: the broker section of config/anotador.toml was not switched to the external broker" >&2; exit 1; }

install -m 0644 config/anotador.service "$root/lib/systemd/system/anotador.service"
grep -q '^ExecStart=/usr/bin/anotador run --config /etc/anotador/anotador.toml$' \
  "$root/lib/systemd/system/anotador.service"

# Manual pages and shell completions, generated by the packaged binary itself from
# its clap definitions (`anotador generate`), under qemu-user for ARM targets: what
# the pages say is what that binary accepts.
gen() { run_target "$root/usr/bin/anotador" generate "$@"; }
install -d -m 0755 "$root/usr/share/man/man1" "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
gen man "$root/usr/share/man/man1" >/dev/null
chmod 0644 "$root/usr/share/man/man1"/*.1
gzip -9n "$root/usr/share/man/man1"/*.1
gen completions bash > "$root/usr/share/bash-completion/completions/anotador"
gen completions zsh > "$root/usr/share/zsh/vendor-completions/_anotador"
gen completions fish > "$root/usr/share/fish/vendor_completions.d/anotador.fish"
chmod 0644 "$root/usr/share/bash-completion/completions/anotador" \
  "$root/usr/share/zsh/vendor-completions/_anotador" "$root/usr/share/fish/vendor_completions.d/anotador.fish"

install -m 0644 README.md "$root/usr/share/doc/anotador/README.md"
install -d "$root/usr/share/doc/anotador/docs"
install -m 0644 docs/*.md "$root/usr/share/doc/anotador/docs/"
install -m 0644 models/train/LICENSES.md "$root/usr/share/doc/anotador/MODEL-DATA-LICENSES.md"
licence_of() { sed -n 's/^| Licence | \(.*\) |$/\1/p' "models/$1/README.md" | head -n1; }
{
  cat <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: anotador
Comment: The model bundles under /usr/share/anotador/models were trained by the
 anotador project; each folder's README.md is its model card. The licences of their
 training data, as stated by the sources, are summarised below and detailed in
 /usr/share/doc/anotador/MODEL-DATA-LICENSES.md. ner-es inherits the CoNLL-2002
 restriction: research use only, not for commercial use.

Files: *
Copyright: $years the anotador authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be found
 in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
  for m in "${models[@]}"; do
    printf '\nFiles: usr/share/anotador/models/%s/*\nCopyright: %s the anotador authors (model weights)\nLicense: Apache-2.0 and training-data terms\n %s\n' \
      "$m" "$years" "$(licence_of "$m")"
  done
} > "$root/usr/share/doc/anotador/copyright"
chmod 0644 "$root/usr/share/doc/anotador/copyright"

# Debian wants the upstream changelog and a Debian one (policy 12.7) in the doc folder.
gzip -9nc CHANGELOG.md > "$root/usr/share/doc/anotador/changelog.gz"
{
  echo "anotador (${version}-${revision}) unstable; urgency=medium"
  echo
  echo "  * Built by cross/deb.sh for ${target}."
  echo "  * Upstream changes: changelog.gz."
  echo
  echo " -- ${maintainer}  $(LC_ALL=C date -u -R -d "@$epoch")"
} | gzip -9n > "$root/usr/share/doc/anotador/changelog.Debian.gz"
chmod 0644 "$root/usr/share/doc/anotador/changelog.gz" "$root/usr/share/doc/anotador/changelog.Debian.gz"

installed_size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
{
  echo "Package: anotador"
  echo "Version: ${version}-${revision}"
  echo "Architecture: ${DEB_ARCH}"
  echo "Maintainer: ${maintainer}"
  echo "Installed-Size: ${installed_size}"
  [ -n "$depends" ] && echo "Depends: ${depends}"
  echo "Recommends: mosquitto"
  echo "Suggests: mosquitto-clients"
  echo "Section: net"
  echo "Priority: optional"
  echo "Description: offline Spanish text annotation daemon over MQTT"
  echo " anotador runs int8-quantized ONNX transformer encoders (ALBERT, DistilBERT,"
  echo " BERT) with tract and returns named entities, POS tags and text"
  echo " classifications as JSON, from MQTT topics (anotador run) or stdin"
  echo " (anotador annotate). No Python, no network, no native inference library."
  echo " ."
  echo " Ships the default ner-es, pos-es and emotion-es models in"
  echo " /usr/share/anotador/models and a systemd service configured by"
  echo " /etc/anotador/anotador.toml, enabled but not started on installation."
  echo " Built for ${target}."
} > "$root/DEBIAN/control"
echo /etc/anotador/anotador.toml > "$root/DEBIAN/conffiles"

unit=anotador.service
cat > "$root/DEBIAN/postinst" <<SCRIPT
#!/bin/sh
set -e
# dh_installsystemd (--no-start --restart-after-upgrade), by hand.
if [ "\$1" = "configure" ] || [ "\$1" = "abort-upgrade" ] || [ "\$1" = "abort-deconfigure" ] || [ "\$1" = "abort-remove" ]; then
	if command -v deb-systemd-helper >/dev/null 2>&1; then
		# Only removes masks created by deb-systemd-helper on package removal.
		deb-systemd-helper unmask '$unit' >/dev/null || true
		# was-enabled is true on a first installation: enable the unit then; on an
		# upgrade, keep whatever the administrator chose.
		if deb-systemd-helper --quiet was-enabled '$unit'; then
			deb-systemd-helper enable '$unit' >/dev/null || true
		else
			deb-systemd-helper update-state '$unit' >/dev/null || true
		fi
	fi
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		# Not started on a first installation (edit /etc/anotador/anotador.toml, then
		# systemctl start anotador); restarted after an upgrade only if it was running.
		if [ -n "\$2" ] && command -v deb-systemd-invoke >/dev/null 2>&1; then
			deb-systemd-invoke try-restart '$unit' >/dev/null || true
		fi
	fi
fi
exit 0
SCRIPT
cat > "$root/DEBIAN/prerm" <<SCRIPT
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "\$1" = remove ] && command -v deb-systemd-invoke >/dev/null 2>&1; then
	deb-systemd-invoke stop '$unit' >/dev/null || true
fi
exit 0
SCRIPT
cat > "$root/DEBIAN/postrm" <<SCRIPT
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
if [ "\$1" = "remove" ] && command -v deb-systemd-helper >/dev/null 2>&1; then
	deb-systemd-helper mask '$unit' >/dev/null || true
fi
if [ "\$1" = "purge" ] && command -v deb-systemd-helper >/dev/null 2>&1; then
	deb-systemd-helper purge '$unit' >/dev/null || true
	deb-systemd-helper unmask '$unit' >/dev/null || true
fi
exit 0
SCRIPT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles"

# md5sums: what `dpkg --verify anotador` checks the installed files against (conffiles
# are left out, as dh_md5sums does: dpkg tracks their sums itself).
( cd "$root" && find . \( -path ./DEBIAN -o -path ./etc \) -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum ) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

mkdir -p "$outdir"
deb="$outdir/anotador_${version}-${revision}_${DEB_ARCH}.deb"
# xz (dpkg-deb's default) unless DEB_COMPRESSION says otherwise: CI uses gzip, which
# takes seconds instead of a minute here. Not zstd: Bullseye's dpkg cannot read it.
dpkg-deb --root-owner-group "-Z${DEB_COMPRESSION:-xz}" --build "$root" "$deb" >/dev/null
echo "DEB=$deb"
echo "size: $(stat -c %s "$deb") bytes ($(numfmt --to=iec-i --suffix=B "$(stat -c %s "$deb")")), installed ${installed_size} KiB, depends: ${depends:-none (static)}"
