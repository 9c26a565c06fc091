#!/usr/bin/env python3
"""Status-bar widget: prints "Artist – Title" of what Spotify is playing.

Gets the access token from spotokd over D-Bus and keeps it until spotokd says a new one is
there (the TokenRefreshed signal) or Spotify answers 401; it never refreshes anything itself.

    pip install jeepney        # or: apt install python3-jeepney

    spotify-now-playing.py              # a line each time the track changes (waybar, polybar tail)
    spotify-now-playing.py --once       # one line, then exit (i3blocks, polling bars)
    spotify-now-playing.py --interval 2

Needs a login with the user-read-currently-playing (or user-read-playback-state) scope:
    spotokctl login --scope user-read-currently-playing
"""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

from jeepney import DBusAddress, MatchRule, message_bus, new_method_call
from jeepney.io.blocking import Proxy, open_dbus_connection
from jeepney.wrappers import DBusErrorResponse, unwrap_msg

NAME = "org.spotok.Spotokd"
PATH = "/org/spotok/Spotokd"
INTERFACE = "org.spotok.Spotokd1"
API_URL = "https://api.spotify.com/v1"

SPOTOKD = DBusAddress(PATH, bus_name=NAME, interface=INTERFACE)
TOKEN_REFRESHED = MatchRule(
    type="signal", interface=INTERFACE, member="TokenRefreshed", path=PATH
)


class Unauthorized(Exception):
    """Spotify refused the token (401)."""


def get_token(conn):
    """(token, None) from spotokd, or (None, a short reason to show)."""
    try:
        reply = conn.send_and_get_reply(new_method_call(SPOTOKD, "GetAccessToken"), timeout=30)
        token, _expires_in = unwrap_msg(reply)
        return token, None
    except DBusErrorResponse as e:
        if e.name == INTERFACE + ".Error.NeedsLogin":
            return None, "spotok: run spotokctl login"
        if e.name == INTERFACE + ".Error.Unavailable":
            return None, "spotok: Spotify unavailable"
        if e.name == "org.freedesktop.DBus.Error.ServiceUnknown":
            return None, "spotok: spotokd not running"
        return None, "spotok: " + (str(e.data[0]) if e.data else e.name)
    except TimeoutError:
        return None, "spotok: no answer from spotokd"


def now_playing(url, token):
    """The current track as "Artist – Title", "" when nothing plays, None to keep the last."""
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status == 204:
                return ""
            body = json.load(response)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise Unauthorized() from e
        if e.code == 429:
            time.sleep(int(e.headers.get("Retry-After", "5")))
            return None
        return "spotify: HTTP %d" % e.code
    except (urllib.error.URLError, TimeoutError, OSError):
        return None  # Offline for a moment: keep the last line.
    item = body.get("item") or {}
    if not item:
        return ""
    if item.get("type") == "episode":
        by = (item.get("show") or {}).get("name", "")
    else:
        by = ", ".join(a.get("name", "") for a in item.get("artists", []))
    title = item.get("name", "")
    return f"{by} – {title}" if by else title


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="print one line and exit")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    parser.add_argument("--api-url", default=API_URL, help="the Web API (spotok's api_url)")
    args = parser.parse_args()
    url = args.api_url.rstrip("/") + "/me/player/currently-playing"

    conn = open_dbus_connection(bus="SESSION")
    Proxy(message_bus, conn).AddMatch(TOKEN_REFRESHED)
    token = None
    last = None
    with conn.filter(TOKEN_REFRESHED) as refreshed:
        while True:
            line = None
            if token is None:
                token, line = get_token(conn)
            if token is not None:
                try:
                    line = now_playing(url, token)
                except Unauthorized:
                    # Spotify says the token is dead: ask spotokd once more, and retry once.
                    token, line = get_token(conn)
                    if token is not None:
                        try:
                            line = now_playing(url, token)
                        except Unauthorized:
                            token, line = None, "spotok: Spotify refused the token"
            if line is not None and line != last:
                print(line, flush=True)
                last = line
            if args.once:
                return 0
            # Sleep until the next poll; a TokenRefreshed signal wakes us early.
            try:
                conn.recv_until_filtered(refreshed, timeout=args.interval)
                refreshed.clear()
                token = None
            except TimeoutError:
                pass


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
