#!/usr/bin/env bash
# Set up .venv (first run only) and start the service on its embedded defaults:
# SQLite, files and the FAISS index under ./storage. Settings come from the environment or .env.
# Extra arguments go to `image-organizer serve` (see its --help).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh requirements.txt
exec .venv/bin/image-organizer serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
