"""Whole jobs, as the CLI, the notebooks and the scripts run them: quantize a model and write its run
folder, or measure a model's perplexity. Every check that can fail runs before the long work.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from .data import Calibration
from .evaluation import Evaluation
from .export import Export, check_exportable, check_output_folder, export_model, linear_shapes
from .methods import QuantConfig
from .models import DTYPES, load_model, resolve_device
from .persistence import CHECKPOINT_FOLDER, save_quantized, write_run
from .pipeline import check_config_for_model, quantize_model

log = logging.getLogger(__name__)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} not supported; allowed: {', '.join(DTYPES)}")


def quantize_run(model: str, out, quant: QuantConfig, calibration: Calibration = Calibration(),
                 evaluation: Evaluation = Evaluation(), dtype: str = "float32", device: str | None = None,
                 data_root=None, save: bool = True, checkpoint_dir=None, progress: bool = True,
                 export: Export | None = None) -> dict:
    """Quantize ``model`` (alias, folder, .gguf or hub id) with ``quant``, evaluate it, write the run folder.

    ``out`` receives ``magr_run.json`` and ``magr_layers.json`` (and, with ``save``, the model and its
    grids). Block checkpoints go to ``checkpoint_dir`` (default ``out/.blocks`` when saving). With
    ``export``, the packed checkpoint also goes to ``out/<format>`` (:func:`magr.export.export_model`).
    Returns the run metadata.
    """
    _check_dtype(dtype)
    dev = resolve_device(device)
    calibration.check(data_root)
    evaluation.check(data_root)
    out = Path(out)
    if export is not None:
        if not save:
            raise ValueError(f"save_format={export.format!r} needs the model saved; drop --no-save")
        check_output_folder(out / export.format)
    net, tokenizer = load_model(model, dtype=DTYPES[dtype])
    check_config_for_model(net, quant)
    if export is not None:
        check_exportable(quant.grid, export, linear_shapes(net))
    calib = calibration.tokens(tokenizer, data_root)
    ckpt = checkpoint_dir or (out / CHECKPOINT_FOLDER if save else None)
    result = quantize_model(net, calib, quant, device=dev, progress=progress, checkpoint_dir=ckpt)
    if save:
        save_quantized(net, tokenizer, result.params, out)
    meta = {"model": str(model), "dtype": dtype, "device": str(dev), "config": quant.to_dict(),
            "calibration": asdict(calibration), "seconds": result.seconds,
            "block_seconds": result.block_seconds, "saved": save}
    if evaluation.eval_sets:
        meta["ppl"] = evaluation.perplexities(net, tokenizer, dev, data_root)
    write_run(out, meta, result.records)
    if export is not None:
        export_model(net, tokenizer, result.params, quant.grid, out / export.format, export, source=str(out))
    return meta


def perplexity_run(model: str, evaluation: Evaluation, dtype: str = "float32", device: str | None = None,
                   data_root=None) -> dict:
    """Perplexity of ``model`` on every set of ``evaluation``: {"model", "ppl": {set: {...}}}."""
    _check_dtype(dtype)
    dev = resolve_device(device)
    if not evaluation.eval_sets:
        raise ValueError("no perplexity sets given; name them with eval_sets (CLI: --eval-sets wikitext2 c4)")
    evaluation.check(data_root)
    net, tokenizer = load_model(model, dtype=DTYPES[dtype])
    return {"model": str(model), "ppl": evaluation.perplexities(net, tokenizer, dev, data_root)}
