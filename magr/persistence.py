"""What a run leaves on disk: block checkpoints (resume), the quantized model, its grids, and run metadata.

A run folder holds
- ``magr_run.json``: the run's metadata, the one file that describes it (model, settings, calibration,
  evaluation, perplexities, seconds), written by :func:`write_run` and read by :func:`read_run`;
- ``magr_layers.json``: one record per linear layer (row maxima before/after MagR, errors, seconds);
- with the model saved: a ``save_pretrained`` folder (de-quantized weights in the model's dtype) and
  ``magr_qparams.safetensors`` (scale, zero, g_idx of every layer: the integer codes are
  round(w / scale) + zero);
- ``.blocks/``: one checkpoint per finished block while the run goes on.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from .quantizers import QuantParams

log = logging.getLogger(__name__)

RUN_FILE = "magr_run.json"
RECORDS_FILE = "magr_layers.json"
PARAMS_FILE = "magr_qparams.safetensors"
CHECKPOINT_FOLDER = ".blocks"


# ----------------------------------------------------------------------------------------- checkpoints
def checkpoint_tag(cfg, calib: torch.Tensor) -> str:
    """Key of a run's block checkpoints: the settings and the calibration tokens."""
    text = cfg.fingerprint() + str(calib.sum().item()) + str(tuple(calib.shape))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _checkpoint_paths(folder: Path, i: int) -> tuple[Path, Path]:
    return folder / f"block_{i:03d}.pt", folder / f"block_{i:03d}.json"


def save_block_checkpoint(folder, i: int, tag: str, block: nn.Module, params: dict[str, QuantParams],
                          records: list[dict], seconds: float) -> None:
    """Save block ``i``'s weights and grids (.pt) and its records and time (.json)."""
    pt, js = _checkpoint_paths(Path(folder), i)
    pt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": block.state_dict(), "params": {n: asdict(p) for n, p in params.items()}}, pt)
    js.write_text(json.dumps({"tag": tag, "records": records, "seconds": seconds}))


def load_block_checkpoint(folder, i: int, tag: str, block: nn.Module, device
                          ) -> tuple[dict[str, QuantParams], list[dict], float] | None:
    """Load block ``i``'s checkpoint into ``block`` if one exists with this ``tag``; (grids, records, seconds)."""
    pt, js = _checkpoint_paths(Path(folder), i)
    if not (pt.exists() and js.exists()):
        return None
    meta = json.loads(js.read_text())
    if meta.get("tag") != tag:
        return None
    saved = torch.load(pt, map_location=device)
    block.load_state_dict(saved["state"])
    params = {n: QuantParams(**p) for n, p in saved["params"].items()}
    return params, meta["records"], meta["seconds"]


# ------------------------------------------------------------------------------------------ run folders
def write_json(path, obj) -> None:
    """Write ``obj`` as strict JSON (no NaN), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")


def write_run(folder, meta: dict, records: list[dict] | None = None) -> None:
    """Write a run's metadata (and its per-layer records)."""
    write_json(Path(folder) / RUN_FILE, meta)
    if records is not None:
        write_json(Path(folder) / RECORDS_FILE, records)


def read_run(folder) -> dict:
    """A run's metadata with its per-layer records under ``"records"`` and the folder name under ``"name"``."""
    folder = Path(folder)
    path = folder / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RUN_FILE} in {folder}: run `magr quantize --out {folder}` (or its dvc stage) first")
    run = json.loads(path.read_text())
    rec = folder / RECORDS_FILE
    run["records"] = json.loads(rec.read_text()) if rec.is_file() else []
    run["name"] = folder.name
    return run


def save_quantized(model: nn.Module, tokenizer, params: dict[str, QuantParams], out_dir) -> Path:
    """Save the quantized model as a ``save_pretrained`` folder (de-quantized weights) plus its grids."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    tensors = {}
    for name, p in params.items():
        tensors[f"{name}.scale"] = p.scale.contiguous()
        tensors[f"{name}.zero"] = p.zero.contiguous()
        tensors[f"{name}.g_idx"] = p.g_idx.to(torch.int32).contiguous()
    save_file(tensors, str(out / PARAMS_FILE))
    return out


def save_tokenizer(tokenizer, out) -> None:
    """``tokenizer.save_pretrained(out)``; a tokenizer that cannot be saved (a wrapper) is logged, not fatal."""
    try:
        tokenizer.save_pretrained(out)
    except Exception as exc:  # reload it by alias
        log.warning("tokenizer not saved (%s); load it from the source model", exc)


def load_quant_params(folder) -> dict[str, QuantParams]:
    """The grids written by :func:`save_quantized`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    maxq = 2 ** read_run(folder)["config"]["grid"]["bits"] - 1
    tensors = load_file(str(folder / PARAMS_FILE))
    return {key[: -len(".scale")]: QuantParams(tensors[key], tensors[key[:-6] + ".zero"], maxq,
                                                tensors[key[:-6] + ".g_idx"].long())
            for key in tensors if key.endswith(".scale")}
