"""Checks before any long work: everything a run needs is tested before its first block is quantized.

:func:`magr.runs.quantize_run` calls them in this order: settings (when the configs are built), dtype and
device, the data files, the output and checkpoint folders (:func:`check_output`), the model's architecture,
the model's weight files (:func:`check_weight_files`: a truncated or damaged safetensors file or shard), its
architecture, layer widths and context from its config alone, before any weight is read (:func:`model_skeleton`,
:func:`check_model`), the disk space for checkpoints and outputs (:func:`check_disk_space`), the evaluation
texts against the window length (:meth:`magr.evaluation.perplexity.Evaluation.streams`), and, once the weights are
loaded, that every weight is finite (:func:`check_finite`).

Each check raises ValueError (or FileNotFoundError for something missing) naming the bad value, where it
comes from and what is allowed; the CLI prints it as one line (``magr quantize: error: ...``, exit code 2).
"""
from __future__ import annotations

import logging
import shutil
from itertools import chain
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .models import check_architecture, decoder_layers, linear_shapes, load_config, model_source
from .persistence import CHECKPOINT_FOLDER, PARAMS_FILE, atomic_open, is_run_folder
from .shards import folder_files, read_header
from .blocks import check_config_for_model

log = logging.getLogger(__name__)

GB = 1e9


# ------------------------------------------------------------------------------------------ folders
def check_writable(folder, what: str) -> None:
    """Create ``folder`` if needed and write a probe file in it (then remove both again)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the {what} {folder} is a file, not a folder")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    probe = folder / ".magr-write-test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_open(probe) as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"the {what} {folder} is not writable: {exc.strerror or exc}") from None
    finally:
        for p in created:  # leaf first
            try:
                p.rmdir()
            except OSError:
                break


def check_output(out, model: str, checkpoint_dir=None, save: bool = True) -> None:
    """``out`` is a folder to write a run into: not a file, not the input model's folder, not an existing
    folder of other files, not (without ``save``) a run folder with a saved model that the new run's
    metadata would then describe wrongly, and writable (so is ``checkpoint_dir``)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the run")
    kind, where = model_source(model)
    source = where if kind == "folder" else None
    if source is not None and out.resolve() == Path(source).resolve():
        raise ValueError(f"--out {out} is the input model's folder: saving there would overwrite the float model; "
                         "give another folder")
    if out.is_dir() and not is_run_folder(out):
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise ValueError(f"--out {out} exists and is not a magr run folder (it holds {len(entries)} other entries, "
                             f"e.g. {entries[0]!r}); give a new or empty folder, or a previous run's folder")
    if not save and (out / PARAMS_FILE).exists():
        raise ValueError(f"--out {out} holds the saved model of an earlier run; with --no-save it would stay beside "
                         "the new run's metadata: give another folder, or delete that run first")
    check_writable(out, "output folder (--out)")
    if checkpoint_dir is not None:
        check_writable(checkpoint_dir, "checkpoint folder")


# -------------------------------------------------------------------------------------------- model
def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, or None, from its header alone (no tensor is read; the format:
    :mod:`magr.pipeline.shards`): the data must end exactly at the last tensor's end."""
    size = path.stat().st_size
    try:
        start, header = read_header(path)
    except ValueError as exc:
        return str(exc)
    try:
        ends = [int(v["data_offsets"][1]) for v in header.values()]
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return "its header has no valid data_offsets (damaged)"
    need = start + max(ends, default=0)
    if need > size:
        return f"truncated: {size} bytes, its {len(ends)} tensors need {need} ({need - size} bytes missing)"
    if need < size:
        return f"{size - need} bytes past the end of its last tensor (damaged, or written by another tool)"
    return None


def check_weight_files(model: str) -> None:
    """Every safetensors weight file (or shard) of a local model folder is complete, from the headers alone;
    else ValueError naming the file and what is wrong. Hub ids and .gguf files are not checked here."""
    kind, where = model_source(model)
    if kind != "folder":
        return
    for path in folder_files(where):
        if path.name == PARAMS_FILE:  # a run folder's grids: read by export, checked there
            continue
        problem = safetensors_problem(path)
        if problem is not None:
            raise ValueError(f"model weight file {path} is damaged: {problem}; re-download or re-save the model")


def model_skeleton(model: str, dtype: torch.dtype) -> nn.Module | None:
    """The model built from its config on the meta device (no weights read), for the checks below; None
    for a .gguf file, whose config comes with its weights (those checks then run right after loading)."""
    from transformers import AutoModelForCausalLM

    config = load_config(model)
    if config is None:
        return None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"model {model!r}: transformers cannot build a causal LM from its config ({exc})") from None


def check_context(model, seqlen: int, what: str) -> None:
    """``seqlen`` (tokens per window) must fit the context (max_position_embeddings) of ``model``, a model or its
    config."""
    context = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise ValueError(f"{what}={seqlen} exceeds the model's context (max_position_embeddings={context}); "
                         f"allowed: at most {context}")


def check_eval_context(model: str, eval_seqlen: int) -> None:
    """:func:`check_context` of the perplexity windows from the model's config alone (no model built); a .gguf, whose
    config comes with its weights, is checked after loading."""
    config = load_config(model)
    if config is not None:
        check_context(config, eval_seqlen, "eval_seqlen")


def check_model(model: nn.Module, quant, calibration=None, evaluation=None) -> None:
    """Architecture and group size against the layer widths (:func:`magr.pipeline.blocks.check_config_for_model`),
    calibration and evaluation window lengths against the context."""
    check_architecture(model)
    check_config_for_model(model, quant)
    if calibration is not None:
        check_context(model, calibration.seqlen, "calibration seqlen")
    if evaluation is not None and evaluation.eval_sets:
        check_context(model, evaluation.eval_seqlen, "eval_seqlen")


def check_finite(model: nn.Module, blocks=None) -> None:
    """Every floating-point weight and buffer is finite; else ValueError naming the first bad tensor and index.
    With a streamed model (``blocks``, :mod:`magr.pipeline.streaming`) its blocks are read for this one at a time
    (one pass over the weight files, one block in memory)."""
    _check_finite_tensors(chain(model.named_parameters(), model.named_buffers()))
    if getattr(blocks, "streamed", False):
        for i in tqdm(range(len(blocks)), desc="finite weights", unit="block", leave=False):
            _check_finite_tensors((f"model.layers.{i}.{k}", t) for k, t in blocks.read_block(i).items())


def _check_finite_tensors(named) -> None:
    for name, t in named:
        if not t.is_floating_point() or t.device.type == "meta" or torch.isfinite(t).all():
            continue
        bad = ~torch.isfinite(t)
        index = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"model weight {name} has a non-finite value ({t[tuple(index)].item()}) at index {index} "
                         f"({int(bad.sum())} of {t.numel()} values are NaN or Inf); quantization needs finite "
                         "weights: fix or re-export the model")


# --------------------------------------------------------------------------------------------- disk
def _nbytes(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _grid_bytes(model: nn.Module, group_size: int | None) -> int:
    """scale and zero (float32) per row and group, and g_idx (int64) per input, of every linear layer."""
    return sum(out * (n_in // group_size if group_size else 1) * 8 + n_in * 8
               for out, n_in in linear_shapes(model).values())


def _existing(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    while not path.exists():
        path = path.parent
    return path


def estimate_bytes(model: nn.Module, group_size: int | None, out, save: bool, checkpoint_dir=None,
                   linked: bool = False) -> list[tuple[Path, int, str]]:
    """(folder, bytes, what) a run will write: the block checkpoints (every decoder block and its grids,
    less the checkpoints already there) and the saved model (every weight and the grids). ``linked``: the saved
    model's block shards are hard links to the checkpoints (a streamed run, checkpoints on the same filesystem),
    so it adds only the tensors outside the blocks and the grids."""
    grids = _grid_bytes(model, group_size)
    blocks = _nbytes(p for layer in decoder_layers(model) for p in layer.parameters())
    need = []
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir)
        old = sum(f.stat().st_size for f in ckpt.glob("block_*.*") if f.suffix in (".pt", ".safetensors")
                  ) if ckpt.is_dir() else 0
        need.append((ckpt, max(0, blocks + grids - old), "block checkpoints"))
        linked = linked and _existing(ckpt).stat().st_dev == _existing(Path(out)).stat().st_dev
    else:
        linked = False
    if save:
        need.append((Path(out), _nbytes(model.parameters()) - (blocks if linked else 0) + grids, "quantized model"))
    return need


def check_disk_space(model: nn.Module, group_size: int | None, out, save: bool, checkpoint_dir=None,
                     margin: float = 1.05, linked: bool = False) -> None:
    """Enough free space for :func:`estimate_bytes` (+5%) on each filesystem written to."""
    per_fs: dict[int, list] = {}
    for folder, n, what in estimate_bytes(model, group_size, out, save, checkpoint_dir, linked):
        where = _existing(folder)
        fs = per_fs.setdefault(where.stat().st_dev, [where, 0, []])
        fs[1] += n
        fs[2].append(f"{what} {n / GB:.3f} GB in {folder}")
    for where, n, parts in per_fs.values():
        free = shutil.disk_usage(where).free
        if n * margin > free:
            raise ValueError(f"not enough disk space: {n * margin / GB:.3f} GB needed ({', '.join(parts)}, +5%), "
                             f"{free / GB:.3f} GB free on the filesystem of {where}; free some space, write elsewhere "
                             f"(--out, --checkpoint-dir) or skip the model (--no-save)")
        log.debug("disk space: %s; %.3f GB free", ", ".join(parts), free / GB)


def default_checkpoint_dir(out, save: bool, checkpoint_dir=None) -> Path | None:
    """``checkpoint_dir``, else ``out/.blocks`` when the model is saved, else None (no checkpoints)."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    return Path(out) / CHECKPOINT_FOLDER if save else None
