#!/usr/bin/env bash
# Set up .venv with the test tools, Chromium and nginx (first run only), then run the
# whole test suite. Extra arguments go to pytest, e.g. scripts/test.sh -k search -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh requirements-dev.txt
scripts/setup-system.sh
exec .venv/bin/python -m pytest "$@"
