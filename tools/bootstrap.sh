#!/usr/bin/env bash
# Creates .venv (once) with everything hope-train needs on a CPU machine, then activates it.
# Sourced by tools/demo.sh and tools/test.sh. Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HOPE_VENV:-$ROOT/.venv}"
STAMP="$VENV/.hope-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "[bootstrap] setting up $VENV (first run only, ~2 minutes)"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
    # The CPU wheel of torch 2.13.0 lies on disk; an unpinned torch would pull a CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    # deepspeed ships as an sdist whose build imports torch: build it against ours.
    "$VENV/bin/python" -m pip install -q --no-build-isolation "deepspeed==0.19.8"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
