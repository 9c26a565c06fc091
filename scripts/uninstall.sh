#!/usr/bin/env bash
# Removes what scripts/install.sh installed: stops spotokd, removes the
# binaries, units, D-Bus activation file, completions and man page.
# Your config and stored login stay unless you pass --purge.
#
# Honours the same PREFIX, XDG_CONFIG_HOME, XDG_DATA_HOME (and for --purge
# XDG_STATE_HOME) as install.sh; SPOTOK_NO_START=1 leaves systemd and a
# running spotokd alone.
set -euo pipefail

say() { printf 'spotok: %s\n' "$*"; }
warn() { printf 'spotok: warning: %s\n' "$*" >&2; }

purge=0
case "${1:-}" in
"") ;;
--purge) purge=1 ;;
-h | --help)
	printf 'usage: %s [--purge]\n  --purge  also delete the config, the stored login and the keyring item\n' "$0"
	exit 0
	;;
*)
	printf 'usage: %s [--purge]\n' "$0" >&2
	exit 2
	;;
esac

: "${HOME:?HOME is not set}"
prefix=${PREFIX:-$HOME/.local}
config_home=${XDG_CONFIG_HOME:-$HOME/.config}
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
state_home=${XDG_STATE_HOME:-$HOME/.local/state}
bindir=$prefix/bin
unit_dir=$config_home/systemd/user
if [ -n "${XDG_RUNTIME_DIR:-}" ]; then
	pidfile=$XDG_RUNTIME_DIR/spotokd.pid
else
	pidfile=/tmp/spotokd-$(id -u).pid
fi

# ---- stop ----------------------------------------------------------------------
if [ "${SPOTOK_NO_START:-}" = 1 ]; then
	say "SPOTOK_NO_START=1: leaving systemd and any running spotokd alone"
else
	if command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; then
		if [ -e "$unit_dir/spotokd.socket" ] || [ -e "$unit_dir/spotokd.service" ]; then
			# Both: stopping only the service would let the socket start it again.
			systemctl --user disable --now spotokd.socket spotokd.service >/dev/null 2>&1 ||
				warn "systemctl could not stop or disable spotokd: check 'systemctl --user status spotokd.socket spotokd.service'"
			say "stopped and disabled spotokd.socket and spotokd.service"
		fi
	fi
	pid=
	if [ -r "$pidfile" ]; then
		read -r pid <"$pidfile" || true
	fi
	if [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = spotokd ]; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			warn "spotokd (pid $pid) is still running after 10 s: stop it with 'kill $pid'"
		else
			say "stopped spotokd (pid $pid)"
			rm -f "$pidfile"
		fi
	fi
fi

# ---- remove files ----------------------------------------------------------------
files=(
	"$bindir/spotokd"
	"$bindir/spotokctl"
	"$unit_dir/spotokd.service"
	"$unit_dir/spotokd.socket"
	"$unit_dir/spotokd.service.d/50-no-userns.conf"
	"$data_home/dbus-1/services/org.spotok.Spotokd.service"
	"$data_home/bash-completion/completions/spotokctl"
	"$data_home/zsh/site-functions/_spotokctl"
	"$config_home/fish/completions/spotokctl.fish"
	"$data_home/man/man1/spotokctl.1"
)
removed=0
for f in "${files[@]}"; do
	if [ -e "$f" ] || [ -L "$f" ]; then
		rm -f "$f"
		removed=$((removed + 1))
	fi
done
rmdir "$unit_dir/spotokd.service.d" 2>/dev/null || true
say "removed $removed installed file(s)"
if [ "${SPOTOK_NO_START:-}" != 1 ] && command -v systemctl >/dev/null 2>&1 &&
	systemctl --user show-environment >/dev/null 2>&1; then
	systemctl --user daemon-reload || true
fi

# ---- config and login ------------------------------------------------------------
config_dir=$config_home/spotok
state_dir=$state_home/spotok
if [ "$purge" = 1 ]; then
	rm -rf "$config_dir" "$state_dir"
	say "deleted $config_dir and $state_dir"
	if command -v secret-tool >/dev/null 2>&1; then
		# A locked keyring may prompt; do not wait for ever.
		if timeout 20 secret-tool clear application spotok >/dev/null 2>&1; then
			say "deleted the keyring item (application=spotok), if there was one"
		else
			warn "could not reach the keyring: delete the item yourself with 'secret-tool clear application spotok'"
		fi
	fi
	say "to revoke the app's access at Spotify as well: https://www.spotify.com/account/apps/"
else
	say "kept your config ($config_dir) and stored login ($state_dir, and the keyring item if any): run scripts/uninstall.sh --purge to delete them"
fi
