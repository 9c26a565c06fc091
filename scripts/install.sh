#!/usr/bin/env bash
# Builds spotok and installs it for the current user, then starts spotokd
# (README, Quick start). Safe to run again: an upgrade replaces the files and
# restarts a running spotokd.
#
# Environment:
#   PREFIX           binaries go to $PREFIX/bin (default: ~/.local)
#   XDG_CONFIG_HOME  systemd user units, fish completions (default: ~/.config)
#   XDG_DATA_HOME    D-Bus activation file, bash/zsh completions, man page
#                    (default: ~/.local/share)
#   SPOTOK_NO_BUILD=1  do not run cargo; take the binaries from
#                      $SPOTOK_BIN_DIR (default: target/release)
#   SPOTOK_NO_START=1  install files only: do not touch systemd or spotokd
#   SPOTOK_USERNS=yes|no  whether systemd may sandbox spotokd in a user
#                      namespace (default: probe with unshare)
set -euo pipefail

say() { printf 'spotok: %s\n' "$*"; }
warn() { printf 'spotok: warning: %s\n' "$*" >&2; }
die() {
	printf 'spotok: error: %s\n' "$*" >&2
	exit 1
}

caller=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

: "${HOME:?HOME is not set}"
prefix=${PREFIX:-$HOME/.local}
config_home=${XDG_CONFIG_HOME:-$HOME/.config}
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
bindir=$prefix/bin
unit_dir=$config_home/systemd/user
dbus_dir=$data_home/dbus-1/services
# For spotokd --daemonize (no systemd). Without XDG_RUNTIME_DIR the pidfile is
# per user rather than one shared /tmp/spotokd.pid. uninstall.sh has the same rule.
if [ -n "${XDG_RUNTIME_DIR:-}" ]; then
	pidfile=$XDG_RUNTIME_DIR/spotokd.pid
else
	pidfile=/tmp/spotokd-$(id -u).pid
fi

# The folder ends up verbatim in ExecStart= and the D-Bus Exec= line, which
# have their own quoting, escapes, $VARIABLES and %-specifiers.
[[ $bindir == /* ]] || die "PREFIX must be an absolute path (got '$prefix')"
case $bindir in
*[[:space:]%\"\'\\\$]*)
	die "PREFIX '$prefix' has a space or one of % \" ' \\ \$, which unit files cannot hold: pick another, e.g. PREFIX=/opt/spotok"
	;;
esac

# ---- binaries ----------------------------------------------------------------
if [ "${SPOTOK_NO_BUILD:-}" = 1 ]; then
	src=${SPOTOK_BIN_DIR:-$repo/target/release}
	[[ $src == /* ]] || src=$caller/$src
else
	command -v cargo >/dev/null 2>&1 ||
		die "cargo not found: install Rust (https://rustup.rs), open a new shell, and run scripts/install.sh again"
	say "building spotokd and spotokctl (cargo build --release --locked)…"
	cargo build --release --locked -p spotokd -p spotokctl
	target=${CARGO_TARGET_DIR:-target}
	[[ $target == /* ]] || target=$repo/$target
	src=$target/release
fi
for b in spotokd spotokctl; do
	[ -x "$src/$b" ] || die "$src/$b is missing or not executable (build it, or set SPOTOK_BIN_DIR)"
done

# Whether the installed spotokd is about to change: a daemonized one then has
# to be restarted to run the new code.
daemon_changed=0
cmp -s "$src/spotokd" "$bindir/spotokd" 2>/dev/null || daemon_changed=1

mkdir -p "$bindir"
for b in spotokd spotokctl; do
	# Copy then rename: overwriting a running executable in place fails
	# ("Text file busy"), a rename swaps it atomically.
	install -m 0755 "$src/$b" "$bindir/.$b.new"
	mv -f "$bindir/.$b.new" "$bindir/$b"
done
say "installed spotokd and spotokctl in $bindir"

# ---- units and D-Bus activation file -----------------------------------------
# Writes $1 with @BINDIR@ replaced by the install folder into $2 (mode 0644).
substitute() {
	local text
	text=$(<"$1")
	mkdir -p "$(dirname "$2")"
	# The inner quotes keep bash 5.2 from reading '&' in the path as "the match".
	printf '%s\n' "${text//@BINDIR@/"$bindir"}" >"$2.new"
	chmod 0644 "$2.new"
	mv -f "$2.new" "$2"
}
substitute systemd/spotokd.service "$unit_dir/spotokd.service"
substitute systemd/spotokd.socket "$unit_dir/spotokd.socket"
substitute systemd/org.spotok.Spotokd.service "$dbus_dir/org.spotok.Spotokd.service"
say "installed systemd user units in $unit_dir and the D-Bus activation file in $dbus_dir"

# A user manager builds most of spotokd.service's sandbox inside an
# unprivileged user namespace. Where those are refused (Ubuntu >= 23.10 by
# default, kernel.apparmor_restrict_unprivileged_userns=1) the unit would not
# start at all, so a drop-in turns off what needs one and keeps the rest.
# SPOTOK_USERNS=yes|no skips the probe.
dropin=$unit_dir/spotokd.service.d/50-no-userns.conf
case "${SPOTOK_USERNS:-auto}" in
yes) userns=1 ;;
no) userns=0 ;;
*)
	userns=1
	if command -v unshare >/dev/null 2>&1 && ! unshare --user --map-root-user --mount true >/dev/null 2>&1; then
		userns=0
	fi
	;;
esac
if [ "$userns" = 1 ]; then
	rm -f "$dropin"
	rmdir "$(dirname "$dropin")" 2>/dev/null || true
else
	mkdir -p "$(dirname "$dropin")"
	cat >"$dropin" <<'EOF'
# Written by spotok's scripts/install.sh because this system refuses user
# namespaces to unprivileged users, and a systemd user manager needs one for
# every option below (without this file spotokd.service fails to start).
# Running scripts/install.sh again removes it once user namespaces work.
# The seccomp and prctl based hardening of spotokd.service stays in force.
[Service]
PrivateUsers=no
ProtectSystem=no
ProtectHome=no
PrivateTmp=no
PrivateDevices=no
PrivateMounts=no
ReadWritePaths=
ProtectKernelTunables=no
ProtectKernelModules=no
ProtectKernelLogs=no
ProtectControlGroups=no
ProtectClock=no
ProtectHostname=no
ProtectProc=default
ProcSubset=all
CapabilityBoundingSet=~
EOF
	warn "this system refuses user namespaces to unprivileged users: spotokd.service runs with a smaller sandbox (see $dropin)"
fi

# ---- completions and man page, made by the installed spotokctl ---------------
# Runs "spotokctl ARGS…" into FILE; an error or an empty result stops the install.
generate() {
	local out=$1 tmp
	shift
	mkdir -p "$(dirname "$out")"
	tmp=$out.new
	if ! "$bindir/spotokctl" "$@" >"$tmp"; then
		rm -f "$tmp"
		die "'spotokctl $*' failed: cannot write $out"
	fi
	if [ ! -s "$tmp" ]; then
		rm -f "$tmp"
		die "'spotokctl $*' printed nothing: cannot write $out"
	fi
	chmod 0644 "$tmp"
	mv -f "$tmp" "$out"
}
generate "$data_home/bash-completion/completions/spotokctl" completions bash
generate "$data_home/zsh/site-functions/_spotokctl" completions zsh
generate "$config_home/fish/completions/spotokctl.fish" completions fish
generate "$data_home/man/man1/spotokctl.1" man
say "installed shell completions (bash, zsh, fish) and the man page (man spotokctl)"

# ---- start -------------------------------------------------------------------
# The pid in the pidfile, if that process is a running spotokd.
daemonized_pid() {
	local pid
	[ -r "$pidfile" ] || return 1
	read -r pid <"$pidfile" 2>/dev/null || return 1
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	[ "$(cat "/proc/$pid/comm" 2>/dev/null)" = spotokd ] || return 1
	printf '%s\n' "$pid"
}

# Stops the spotokd started with --daemonize (SIGTERM, then up to 10 s).
stop_daemonized() {
	local pid i
	pid=$(daemonized_pid) || return 0
	say "stopping the running spotokd (pid $pid)…"
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	die "spotokd (pid $pid) did not stop within 10 s: stop it, then run scripts/install.sh again"
}

if [ "${SPOTOK_NO_START:-}" = 1 ]; then
	say "SPOTOK_NO_START=1: not starting spotokd"
elif command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; then
	# A daemonized spotokd from an install without systemd would hold the
	# socket path the socket unit is about to take over.
	stop_daemonized
	systemctl --user daemon-reload
	systemctl --user enable --now spotokd.socket ||
		die "could not start spotokd.socket: see 'systemctl --user status spotokd.socket'"
	if systemctl --user is-active --quiet spotokd.service; then
		say "restarting spotokd.service to run the new version…"
		systemctl --user restart spotokd.service ||
			die "spotokd.service failed to restart: see 'journalctl --user -u spotokd.service'"
	fi
	say "spotokd.socket is enabled: systemd starts spotokd on first use"
	# Connecting starts spotokd through the socket, so a unit that cannot run
	# here shows up now rather than at the first `spotokctl get`.
	rc=0
	timeout 30 "$bindir/spotokctl" status >/dev/null 2>&1 || rc=$?
	if [ "$rc" = 3 ] || [ "$rc" = 124 ]; then
		warn "spotokd did not answer: see 'systemctl --user status spotokd.service' and 'journalctl --user -u spotokd.service'"
	fi
else
	say "no systemd user session: running spotokd --daemonize instead (start it again after a reboot)"
	if [ "$daemon_changed" = 1 ]; then
		stop_daemonized
	fi
	rc=0
	timeout 30 "$bindir/spotokctl" status >/dev/null 2>&1 || rc=$?
	if [ "$rc" = 3 ]; then
		"$bindir/spotokd" --daemonize --pidfile "$pidfile" ||
			die "spotokd --daemonize failed (its message is above)"
		say "started spotokd (pidfile $pidfile)"
	elif [ "$daemon_changed" = 1 ]; then
		warn "a spotokd not started by this script is running: restart it to run the new version"
	else
		say "spotokd is already running"
	fi
fi

# ---- what next ---------------------------------------------------------------
case ":$PATH:" in
*":$bindir:"*) ;;
*) warn "$bindir is not on your PATH: add  export PATH=\"$bindir:\$PATH\"  to ~/.profile, then open a new shell" ;;
esac
say "done. Next: spotokctl login --client-id <your Spotify app's client id>   (then: spotokctl get)"
