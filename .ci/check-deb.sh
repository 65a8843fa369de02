#!/usr/bin/env bash
# Checks the Debian package the way issue 16 asks: build it with cargo-deb, install it with
# dpkg, run the installed binary and its pre-flight against the installed config, verify the
# installed unit, the Debian changelog and copyright file, remove it, and purge it: the config,
# the credentials and the paywatch group go, the ledger and files the operator added to
# /etc/paywatch stay (and the purge says what it removed and what it kept).
#
# The package is built in Cargo's target directory: ./target, or $CARGO_TARGET_DIR when set.
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

target_dir=$(cargo metadata --format-version 1 --no-deps --offline \
    | sed -nE 's/.*"target_directory":"([^"]+)".*/\1/p')
[ -n "$target_dir" ] || fail "could not read the target directory from cargo metadata"
PROFILE=${PROFILE:-dev} packaging/build-deb.sh
version=$(sed -nE 's/^version = "([^"]+)"$/\1/p' Cargo.toml | head -n1)
deb=$(ls "$target_dir"/debian/paywatch_"${version}"-*.deb | head -n1)
[ -f "$deb" ] || fail "no package for version $version in $target_dir/debian"
echo "check-deb: built $deb"

# The check writes stand-in credentials and purges them: never on a host with real ones.
[ ! -e /etc/paywatch/credentials ] \
    || fail "/etc/paywatch/credentials exists; this check installs and purges paywatch: run it on a host without it"
dpkg -i "$deb"
# On a failure, leave no package, stand-in files or directories behind for the next run.
state=/var/lib/paywatch
made_state=
cleanup() {
    dpkg -P paywatch >/dev/null 2>&1 || true
    rm -rf /etc/paywatch/credentials
    rm -f /etc/paywatch/ca.pem
    rmdir /etc/paywatch 2>/dev/null || true
    if [ -n "$made_state" ]; then
        rm -f "$state/paywatch.db"
        rmdir "$state" 2>/dev/null || true
    fi
}
trap cleanup EXIT

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

# The Debian changelog: present, gzipped, and its top entry is the version installed.
doc=/usr/share/doc/paywatch
[ -f "$doc/changelog.Debian.gz" ] || fail "no $doc/changelog.Debian.gz"
installed=$(dpkg-query -W -f='${Version}' paywatch)
top=$(zcat "$doc/changelog.Debian.gz" | head -n1)
printf '%s\n' "$top" | grep -qE "^paywatch \($installed\) [a-z-]+; urgency=" \
    || fail "changelog.Debian.gz starts with '$top', expected an entry for version $installed"
zcat "$doc/changelog.Debian.gz" | grep -qE '^ -- .+ <[^>]+>  [A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} ' \
    || fail "changelog.Debian.gz has no valid trailer line (' -- NAME <EMAIL>  DATE')"

# The copyright file: machine-readable (DEP-5), naming Cargo.toml's license, with each license's
# text or a pointer to /usr/share/common-licenses.
copyright=$doc/copyright
head -n1 "$copyright" | grep -qx 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/' \
    || fail "$copyright is not in the machine-readable format (no Format: line)"
license=$(sed -nE 's/^license = "([^"]+)"$/\1/p' Cargo.toml | head -n1 | sed 's/ OR / or /g; s/ AND / and /g')
[ -n "$license" ] || fail "no license in Cargo.toml"
grep -qxF "License: $license" "$copyright" || fail "$copyright does not name the license '$license'"
grep -q '^Files: \*$' "$copyright" || fail "$copyright has no 'Files: *' paragraph"
grep -q '^Copyright: ' "$copyright" || fail "$copyright has no Copyright: field"
for name in $(printf '%s\n' "$license" | sed 's/ or / /g; s/ and / /g'); do
    grep -qx "License: $name" "$copyright" || fail "$copyright has no stand-alone 'License: $name' paragraph"
done

# The systemd maintainer-script fragments cargo-deb writes for the unit (packaged as an asset).
grep -q 'deb-systemd-helper.*paywatch.service' /var/lib/dpkg/info/paywatch.postinst \
    || fail "postinst has no systemd fragment for paywatch.service"
grep -q 'deb-systemd-helper purge.*paywatch.service' /var/lib/dpkg/info/paywatch.postrm \
    || fail "postrm has no systemd purge fragment for paywatch.service"

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

# Stand-ins for what an operator puts in /etc/paywatch: the credentials (step 3 of
# docs/running-as-a-service.md) and a file of their own (a CA file).
creds=/etc/paywatch/credentials
install -d -m 0700 "$creds"
for name in paymennt-api-key paymennt-api-secret firestore-service-account; do
    (umask 077 && printf 'stand-in %s\n' "$name" >"$creds/$name")
done
printf 'stand-in CA\n' >/etc/paywatch/ca.pem

dpkg -r paywatch
[ ! -e /usr/bin/paywatch ] || fail "/usr/bin/paywatch is still there after dpkg -r"
[ ! -e "$unit" ] || fail "$unit is still there after dpkg -r"
getent group paywatch >/dev/null || fail "dpkg -r removed the paywatch group (only a purge may)"
[ -f "$config" ] || fail "dpkg -r removed $config (only a purge may)"
[ -f "$creds/paymennt-api-key" ] || fail "dpkg -r removed the credentials (only a purge may)"

# A purge removes the config, the credentials and the group but keeps the ledger (payment
# records) and the operator's own files in /etc/paywatch, and says so. The service never ran here, so a stand-in ledger plays the one it would leave.
if [ ! -e "$state" ]; then
    mkdir -p "$state"
    made_state=yes
fi
printf 'stand-in ledger\n' >"$state/paywatch.db"
purge_out=$(dpkg -P paywatch 2>&1)
printf '%s\n' "$purge_out"
[ ! -e "$config" ] || fail "$config is still there after dpkg -P"
! getent group paywatch >/dev/null || fail "the paywatch group is still there after dpkg -P"
[ -f "$state/paywatch.db" ] || fail "dpkg -P removed the ledger $state/paywatch.db"
printf '%s\n' "$purge_out" | grep -q "ledger.* kept in.*$state" \
    || fail "dpkg -P did not say where the ledger is kept"
[ ! -e "$creds" ] || fail "$creds is still there after dpkg -P"
printf '%s\n' "$purge_out" | grep -q "removed the credentials in $creds.*revoke them" \
    || fail "dpkg -P did not say that it removed the credentials (and that they still work)"
[ -f /etc/paywatch/ca.pem ] || fail "dpkg -P removed /etc/paywatch/ca.pem, a file the package does not own"
printf '%s\n' "$purge_out" | grep -q "kept files you added in /etc/paywatch: /etc/paywatch/ca.pem" \
    || fail "dpkg -P did not list the files it kept in /etc/paywatch"
rm -f /etc/paywatch/ca.pem
rmdir /etc/paywatch
rm -f "$state/paywatch.db"
[ -z "$made_state" ] || rmdir "$state"
trap - EXIT
echo "check-deb: ok"
