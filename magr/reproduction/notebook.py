"""The setup every notebook shares: logging, torch threads, the output folder, the model and its
calibration windows. Notebooks call these and magr's library functions; no algorithm code lives in them.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from ..pipeline.calibration_data import Calibration
from ..pipeline.models import DTYPES, hide_unused_imports, load_model


def setup(name: str, threads: int = 0, out_dir=None) -> Path:
    """Quiet logging, no unused imports (:func:`magr.pipeline.models.hide_unused_imports`), ``threads`` torch
    threads (0: torch's default), and the folder for the notebook's
    tables and figures: ``out_dir``, or a new temporary folder when None. Returns the folder."""
    logging.basicConfig(level=logging.WARNING)
    hide_unused_imports()  # transformers would import torchao (the export extra's) on the first model load
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix=f"magr-{name}-"))
    out.mkdir(parents=True, exist_ok=True)
    print("outputs in", out if out_dir else "a temporary folder")
    return out


def model_and_calibration(model_name: str, calibration: Calibration, dtype: str = "float32", data_root=None):
    """(model, tokenizer, calibration tokens) of a model alias, folder or hub id; the windows follow the model
    family's protocol unless ``calibration`` sets ``calib_bos`` (:mod:`magr.pipeline.families`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} not supported; allowed: {', '.join(DTYPES)}")
    model, tokenizer = load_model(model_name, dtype=DTYPES[dtype])
    return model, tokenizer, calibration.for_model(model).tokens(tokenizer, data_root)


def run_cells(model_name: str, cells: dict, calibration: Calibration, evaluation, seeds=(0,), device: str = "cpu",
              float_ppl: bool = True, work=None, forward_dtype: str | None = None):
    """Run quantize cells (name -> QuantConfig settings) for every calibration seed as the pipeline's stages
    would, without saving the models, and the float model's perplexity (forwards in ``forward_dtype``, default the
    model's); returns (folder of the cell folders, float perplexity JSON)."""
    from ..core.methods import QuantConfig
    from ..pipeline.persistence import write_json
    from ..runs import perplexity_run, quantize_cell

    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="magr-cells-"))
    for name, cell in cells.items():
        quantize_cell(model_name, work / "cells" / name, QuantConfig.build(**cell), seeds, calibration, evaluation,
                      device=device, progress=False, forward_dtype=forward_dtype)
    float_json = work / "float.json"
    if float_ppl:
        write_json(float_json, perplexity_run(model_name, evaluation, device=device, forward_dtype=forward_dtype))
    return work / "cells", float_json


def zeroshot_cells(model_name: str, cells: dict, calibration: Calibration, tasks, limit, batch_size,
                   device: str = "cpu"):
    """Zero-shot results of the float model and of each cell (name -> QuantConfig settings) quantized in
    memory; returns (results, labels) keyed by "float" and the cell names."""
    from ..core.methods import QuantConfig
    from ..pipeline.blocks import quantize_model
    from .tables import cell_label
    from ..evaluation.zeroshot import evaluate_zeroshot

    model, tokenizer = load_model(model_name)
    calib = calibration.for_model(model).tokens(tokenizer)
    results = {"float": evaluate_zeroshot(model, tokenizer, tasks, limit=limit, batch_size=batch_size, device=device)}
    labels = {"float": "float"}
    for name, cell in cells.items():
        model, tokenizer = load_model(model_name)
        cfg = QuantConfig.build(**cell)
        quantize_model(model, calib, cfg, device=device, progress=False)
        results[name] = evaluate_zeroshot(model, tokenizer, tasks, limit=limit, batch_size=batch_size, device=device)
        labels[name] = cell_label(cfg.to_dict())
    return results, labels
