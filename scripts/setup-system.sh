#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests when it is missing (needs root and apt-get).
# Without it the browser tests are skipped, and pytest's summary says why.
set -uo pipefail
chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
[ -x "$chromium" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Chromium for the browser tests (apt-get install chromium)"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
        exit 0
    fi
fi
echo "warning: no Chromium at $chromium: the browser tests will be skipped (install Debian's chromium package)" >&2
