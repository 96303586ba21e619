#!/usr/bin/env bash
# The test suite (CPU). GPU tests carry the `gpu` mark and skip without CUDA.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
