#!/usr/bin/env bash
# Lint and format check (ruff is a dev tool, installed with the test requirements).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh requirements-dev.txt
.venv/bin/ruff check backend ml tests bench
.venv/bin/ruff format --check backend ml tests bench
