#!/usr/bin/env bash
# Set up .venv with the test tools and Chromium for the browser tests (first run only), then run the
# whole test suite. Extra arguments go to pytest, e.g. scripts/test.sh -k search -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh requirements-dev.txt
scripts/setup-browser.sh
exec .venv/bin/python -m pytest "$@"
