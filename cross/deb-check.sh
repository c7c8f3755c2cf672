#!/usr/bin/env bash
# Checks a package made by cross/deb.sh:  cross/deb-check.sh DEB TARGET
# - dpkg-deb -c: every expected path, owned by root;
# - dpkg-deb -I: the control fields, the conffile, the maintainer scripts;
# - the manual pages (man -w, rendered without warnings) and shell completions;
# - systemd-analyze verify on the packaged unit, when systemd-analyze is there;
# - the packaged binary runs `anotador check` on the packaged configuration, with
#   the packaged models (natively for x86_64, under qemu-user for ARM targets).
set -euo pipefail
cd "$(dirname "$0")/.."

deb="${1:?usage: cross/deb-check.sh DEB TARGET}"
target="${2:?usage: cross/deb-check.sh DEB TARGET}"
. cross/env.sh "$target"
fail() { echo "deb-check: $deb: $*" >&2; exit 1; }

listing="$(dpkg-deb -c "$deb")"
expected=(
  ./usr/bin/anotador
  ./etc/anotador/anotador.toml
  ./lib/systemd/system/anotador.service
  ./usr/share/doc/anotador/copyright
  ./usr/share/doc/anotador/MODEL-DATA-LICENSES.md
  ./usr/share/doc/anotador/changelog.gz
  ./usr/share/doc/anotador/changelog.Debian.gz
  ./usr/share/man/man1/anotador.1.gz
  ./usr/share/man/man1/anotador-run.1.gz
  ./usr/share/bash-completion/completions/anotador
  ./usr/share/zsh/vendor-completions/_anotador
  ./usr/share/fish/vendor_completions.d/anotador.fish
)
for m in ner-es pos-es emotion-es; do
  for f in model.onnx tokenizer.json config.json README.md; do
    expected+=("./usr/share/anotador/models/$m/$f")
  done
done
for p in "${expected[@]}"; do
  grep -qE " root/root +[0-9]+ .* ${p//./\\.}\$" <<<"$listing" || fail "missing or not root-owned: $p"
done
grep -qE '^-rwxr-xr-x root/root .* \./usr/bin/anotador$' <<<"$listing" || fail "/usr/bin/anotador is not 0755"
echo "contents: ${#expected[@]} expected paths present, root-owned ($(grep -c '^-' <<<"$listing") files)"

info="$(dpkg-deb -I "$deb")"
field() { dpkg-deb -f "$deb" "$1"; }
[ "$(field Package)" = anotador ] || fail "Package is not anotador"
[ "$(field Architecture)" = "$DEB_ARCH" ] || fail "Architecture $(field Architecture) != $DEB_ARCH"
[ -n "$(field Version)" ] && [ -n "$(field Maintainer)" ] && [ -n "$(field Description)" ] \
  || fail "Version, Maintainer or Description missing"
for s in postinst prerm postrm conffiles; do
  grep -qE "^ +[0-9]+ bytes, +[0-9]+ lines .* $s( |\$)" <<<"$info" || fail "no $s"
done
case "$target" in
  *-musl|*-musleabihf) [ -z "$(field Depends)" ] || fail "a static binary should depend on nothing: $(field Depends)" ;;
  *) field Depends | grep -q '^libc6 (>= ' || fail "a glibc binary needs Depends: libc6 (>= ...)" ;;
esac
echo "control: $(field Package) $(field Version) $(field Architecture), Depends: $(field Depends | sed 's/^$/none/'), Recommends: $(field Recommends), Installed-Size: $(field Installed-Size) KiB"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
dpkg-deb -e "$deb" "$root/DEBIAN"
[ "$(cat "$root/DEBIAN/conffiles")" = /etc/anotador/anotador.toml ] || fail "conffiles is not /etc/anotador/anotador.toml"
for s in postinst prerm postrm; do sh -n "$root/DEBIAN/$s" || fail "$s: syntax"; done
unit="$root/lib/systemd/system/anotador.service"
grep -q '^ExecStart=/usr/bin/anotador run --config /etc/anotador/anotador.toml$' "$unit" || fail "ExecStart"
grep -q '^ExecStartPre=/usr/bin/anotador check --config /etc/anotador/anotador.toml$' "$unit" || fail "ExecStartPre"
grep -q '^Type=notify$' "$unit" || fail "Type=notify"

# The manual: man finds every page in the unpacked tree (man -w, as `man anotador`
# would on the device) and renders each without a warning; one page per subcommand
# that `anotador --help` lists. The completions: bash parses its script, and each
# names the subcommands.
man_dir="$root/usr/share/man"
page="$(MANPATH="$man_dir" man -w anotador)" || fail "man -w anotador finds no page"
[ "$page" = "$man_dir/man1/anotador.1.gz" ] || fail "man -w anotador: $page"
subcommands=(annotate eval run ask bench passwd check generate)
for s in "" "${subcommands[@]}"; do
  name="anotador${s:+-$s}"
  MANPATH="$man_dir" man -w "$name" >/dev/null || fail "man -w $name finds no page"
  warnings="$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -l "$man_dir/man1/$name.1.gz" 2>&1 >/dev/null)"
  [ -z "$warnings" ] || fail "$name.1: $warnings"
done
bash -n "$root/usr/share/bash-completion/completions/anotador" || fail "bash completion: syntax"
for f in bash-completion/completions/anotador zsh/vendor-completions/_anotador fish/vendor_completions.d/anotador.fish; do
  for s in "${subcommands[@]}"; do grep -qw -- "$s" "$root/usr/share/$f" || fail "$f does not name $s"; done
done
echo "man: $(ls "$man_dir/man1" | wc -l) pages (man -w anotador: ${page#"$root"}), none with a warning; completions: bash (parses), zsh, fish"

# systemd-analyze verify wants the executables to exist: verify a copy whose
# /usr/bin/anotador points into the unpacked package. It exits 0 on unknown keys or
# bad values (it only warns), so any output at all fails the check.
if command -v systemd-analyze >/dev/null 2>&1; then
  mkdir -p "$root/verify"
  sed "s#/usr/bin/anotador#$root/usr/bin/anotador#g" "$unit" > "$root/verify/anotador.service"
  if out="$(systemd-analyze verify --man=no "$root/verify/anotador.service" 2>&1)" && [ -z "$out" ]; then
    echo "systemd-analyze verify: ok ($(systemd-analyze --version | head -n1))"
  else
    echo "$out" >&2; fail "systemd-analyze verify"
  fi
else
  echo "systemd-analyze verify: SKIPPED (systemd-analyze not installed: the systemd package is absent)"
fi

# The packaged configuration, with the packaged models: paths in it are absolute
# (/usr/share/anotador/models/...), so check a copy that prefixes them with the root.
sed "s#\"/usr/share/anotador/#\"$root/usr/share/anotador/#" "$root/etc/anotador/anotador.toml" \
  > "$root/etc/anotador/check.toml"
out="$(run_target "$root/usr/bin/anotador" check --config "$root/etc/anotador/check.toml")" \
  || fail "anotador check --config on the packaged configuration"
echo "anotador check (packaged binary${QEMU:+ under $QEMU}, packaged config and models): ${out#"$root"/etc/anotador/}"
grep -q '^host = "127.0.0.1"$' "$root/etc/anotador/anotador.toml" && grep -q '^# \[broker\.embedded\]$' "$root/etc/anotador/anotador.toml" \
  || fail "the packaged configuration should use the external broker on 127.0.0.1"
# The documented switch to the embedded broker (one section) must also pass check.
sed -e 's|^host = |# host = |' -e 's|^port = |# port = |' \
    -e 's|^# \[broker\.embedded\]$|[broker.embedded]|' -e 's|^# listen = |listen = |' \
  "$root/etc/anotador/check.toml" > "$root/etc/anotador/check-embedded.toml"
out="$(run_target "$root/usr/bin/anotador" check --config "$root/etc/anotador/check-embedded.toml")" \
  || fail "anotador check --config on the packaged configuration switched to the embedded broker"
echo "anotador check, packaged configuration switched to [broker.embedded]: ${out#"$root"/etc/anotador/}"
