#!/usr/bin/env bash
# Set up .venv (first run only) and start the service on its embedded defaults:
# SQLite, files and the FAISS index under ./storage. Settings come from the environment or .env.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh requirements.txt
host="${HOST:-127.0.0.1}"
port="${PORT:-8000}"
echo "starting on http://$host:$port (Swagger UI at /docs)"
# One worker: the FAISS index lives in this process's memory.
exec .venv/bin/uvicorn backend.main:create_app --factory --host "$host" --port "$port" --workers 1 "$@"
