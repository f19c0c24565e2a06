#!/usr/bin/env bash
# Create .venv when missing, install a requirements file into it, then the project itself (editable, without
# dependencies: the requirements file is the complete pinned set), which gives .venv/bin/image-organizer.
# Skipped when nothing changed.
# Usage: scripts/setup-venv.sh requirements.txt|requirements-dev.txt
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv with $($python --version)"
    "$python" -m venv "$venv"
fi

# Reinstall only when the requirement files differ from the last successful install.
stamp="$venv/.installed-$(basename "$req")"
digest="$(cat requirements.txt "$req" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
    exit 0
fi

extra=()
# Where PyPI's default torch would be a CUDA build, point this at a CPU wheel index, e.g.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    extra+=(--extra-index-url "$TORCH_INDEX_URL")
fi
echo "installing $req into $venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q "${extra[@]}" -r "$req"
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps -e .
echo "$digest" > "$stamp"
