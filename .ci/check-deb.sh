#!/usr/bin/env bash
# Checks the Debian package the way issue 16 asks: build it with cargo-deb, install it with
# dpkg, run the installed binary and its pre-flight against the installed config, verify the
# installed unit, and remove it cleanly.
#
# Usage:  .ci/check-deb.sh        (as root, on Debian; CI runs it after `cargo test`)
#   PROFILE=release   package a release build instead of the debug binary `cargo test` built
#                     (a cold release build costs 6+ minutes on 2 cores; the packaging itself,
#                     the unit, config, docs, completions and man pages are the same)
# Exit status: 0 if every check passes, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "check-deb: $*" >&2; exit 1; }

# Pinned: newer cargo-deb may refuse the dev profile this check uses by default.
cargo_deb_version=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$cargo_deb_version"; then
    cargo install cargo-deb --version "$cargo_deb_version" --locked
fi
if ! command -v addgroup >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends adduser >/dev/null
fi

PROFILE=${PROFILE:-dev} packaging/build-deb.sh
version=$(sed -nE 's/^version = "([^"]+)"$/\1/p' Cargo.toml | head -n1)
deb=$(ls target/debian/paywatch_"${version}"-*.deb | head -n1)
[ -f "$deb" ] || fail "no package for version $version in target/debian"
echo "check-deb: built $deb"

dpkg -i "$deb"
trap 'dpkg -P paywatch >/dev/null 2>&1 || true' EXIT

[ -x /usr/bin/paywatch ] || fail "/usr/bin/paywatch is not installed"
/usr/bin/paywatch --version | grep -qx "paywatch $version" || fail "paywatch --version is not 'paywatch $version'"
echo "check-deb: $(/usr/bin/paywatch --version)"

config=/etc/paywatch/paywatch.toml
[ "$(stat -c %a "$config")" = 640 ] || fail "$config has mode $(stat -c %a "$config"), expected 640"
[ "$(stat -c %G "$config")" = paywatch ] || fail "$config is not group paywatch"
grep -qx "$config" /var/lib/dpkg/info/paywatch.conffiles || fail "$config is not a conffile"
for page in paywatch paywatch-run paywatch-check-config; do
    [ -f "/usr/share/man/man1/$page.1.gz" ] || fail "no man page $page.1.gz"
done
[ -f /usr/share/man/man5/paywatch.toml.5.gz ] || fail "no man page paywatch.toml.5.gz"
[ -s /usr/share/bash-completion/completions/paywatch ] || fail "no bash completions"
[ -s /usr/share/zsh/vendor-completions/_paywatch ] || fail "no zsh completions"
[ -s /usr/share/fish/vendor_completions.d/paywatch.fish ] || fail "no fish completions"

# The shipped config has no credentials yet: check-config must say so and exit 2.
rc=0
out=$(env -u PAYWATCH_CONFIG -u CREDENTIALS_DIRECTORY /usr/bin/paywatch --config "$config" check-config 2>&1) || rc=$?
printf '%s\n' "$out"
[ "$rc" = 2 ] || fail "check-config on the installed config exited $rc, expected 2"
printf '%s\n' "$out" | grep -q "'paymennt.api_key' is not set" \
    || fail "check-config did not name the missing paymennt credentials"

unit=/usr/lib/systemd/system/paywatch.service
[ -f "$unit" ] || fail "no unit at $unit"
grep -q '^ExecStart=/usr/bin/paywatch ' "$unit" || fail "$unit does not run /usr/bin/paywatch"
if [ -d /run/systemd/system ]; then
    [ "$(systemctl is-enabled paywatch 2>/dev/null || true)" = disabled ] || fail "the unit was enabled"
fi
# verify (any output fails) and the exposure score, on the unit exactly as installed.
PAYWATCH_BIN=/usr/bin/paywatch .ci/check-systemd.sh "$unit"

dpkg -r paywatch
[ ! -e /usr/bin/paywatch ] || fail "/usr/bin/paywatch is still there after dpkg -r"
[ ! -e "$unit" ] || fail "$unit is still there after dpkg -r"
dpkg -P paywatch
[ ! -e "$config" ] || fail "$config is still there after dpkg -P"
trap - EXIT
echo "check-deb: ok"
