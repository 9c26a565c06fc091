#!/usr/bin/env bash
# Lints, builds and tests the whole workspace (README, Quick start; .ci/run
# calls this). Extra arguments go to `cargo test`, e.g.
#   scripts/test.sh -p spotok-tests systemd_units
# Installs the tools the black-box tests drive (dbus-daemon, gnome-keyring,
# secret-tool, systemd-analyze, ...) from apt when they are missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }
die() {
	printf 'test.sh: error: %s\n' "$*" >&2
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# ---- test prerequisites --------------------------------------------------------
# command:Debian package. Checked by command, so nothing already there is
# reinstalled (systemd in particular).
missing=()
packages=()
for pair in dbus-daemon:dbus gnome-keyring-daemon:gnome-keyring secret-tool:libsecret-tools \
	systemd-analyze:systemd systemd-socket-activate:systemd busctl:systemd setpriv:util-linux; do
	cmd=${pair%%:*} pkg=${pair#*:}
	if ! have "$cmd"; then
		missing+=("$cmd")
		[[ " ${packages[*]} " == *" $pkg "* ]] || packages+=("$pkg")
	fi
done
# spotokd.service reloads with /bin/kill, and `systemd-analyze verify` wants it.
if [ ! -x /bin/kill ]; then
	missing+=(/bin/kill)
	packages+=(procps)
fi
if [ "${#packages[@]}" -gt 0 ]; then
	step "installing test prerequisites: ${packages[*]} (missing: ${missing[*]})"
	have apt-get || die "missing ${missing[*]} and no apt-get here: install them (Debian packages: ${packages[*]}) and run again"
	sudo=()
	if [ "$(id -u)" != 0 ]; then
		have sudo || die "missing ${missing[*]}: run as root, or install sudo, or install the packages ${packages[*]} yourself"
		sudo=(sudo)
	fi
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --no-upgrade "${packages[@]}"
fi

# rustfmt and clippy are rustup components a minimal toolchain may lack.
for component in rustfmt clippy; do
	sub=${component/rustfmt/fmt}
	if ! cargo "$sub" --version >/dev/null 2>&1; then
		have rustup || die "cargo $sub is not installed: install the $component component of your Rust toolchain"
		step "rustup component add $component"
		rustup component add "$component"
	fi
done

# ---- checks ---------------------------------------------------------------------
step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The black-box tests run the binaries from target/debug.
step "cargo build --workspace --locked"
cargo build --workspace --locked

# Informative only: how exposed the sandbox of spotokd.service is.
if have systemd-analyze; then
	step "systemd-analyze security --user --offline=yes systemd/spotokd.service"
	scratch=$(mktemp -d)
	trap 'rm -rf "$scratch"' EXIT
	target=${CARGO_TARGET_DIR:-target}
	[[ $target == /* ]] || target=$PWD/$target
	sed "s|@BINDIR@|$target/debug|g" systemd/spotokd.service >"$scratch/spotokd.service"
	cp systemd/spotokd.socket "$scratch/"
	mkdir -m 0700 "$scratch/run"
	# systemd-analyze --user needs a runtime folder, which CI shells lack.
	if exposure=$(XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$scratch/run} \
		systemd-analyze security --user --offline=yes "$scratch/spotokd.service" 2>&1 |
		grep 'Overall exposure level'); then
		printf '%s\n' "$exposure"
	else
		printf '(no exposure score: this systemd-analyze cannot assess it offline)\n'
	fi
fi

step "cargo test --workspace --locked $*"
cargo test --workspace --locked "$@"
