#!/usr/bin/env bash
# Fresh-clone `make repro` timing (issue 22 acceptance 2): a new clone of this repository's HEAD, the project's cache
# (~/.cache/magr: the assembled GGUFs, the built kernels, the converted tokenizers) removed so that the setup assembles
# Gemma again; pip's own cache kept. Prints the wall-time table the run wrote.
#   bash benchmarks/fresh_clone_repro.sh [CLONE_DIR] [LOG]      (defaults /tmp/magr-fresh, /tmp/magr-fresh.log)
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
CLONE=${1:-/tmp/magr-fresh}
LOG=${2:-/tmp/magr-fresh.log}
SHARED=${MAGR_SHARED:-$SRC/../shared}
rm -rf "$CLONE" "${MAGR_CACHE_DIR:-$HOME/.cache/magr}"
git clone -q "$SRC" "$CLONE"
cd "$CLONE"
git log --oneline -1
date -u
MAGR_SHARED=$SHARED /usr/bin/time -v make repro > "$LOG" 2>&1
date -u
cat reports/pipeline_wall_time.md
