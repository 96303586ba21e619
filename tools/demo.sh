#!/usr/bin/env bash
# The main job on its embedded default: a tiny HOPE trained on CPU on the Python standard
# library's own source (tokenizer and shards are prepared on first use, once).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
exec hope-train configs/train/tiny-cpu.yaml --run-dir "${RUN_DIR:-runs/tiny}" "$@"
