#!/usr/bin/env bash
# Lint, format check and type check (ruff and mypy are dev tools, installed with the test requirements).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh requirements-dev.txt
.venv/bin/ruff check backend ml tests bench
.venv/bin/ruff format --check backend ml tests bench
.venv/bin/mypy  # what it checks, and how strictly: [tool.mypy] in pyproject.toml
