"""Whole jobs, as the CLI, the notebooks and the scripts run them: quantize a model and write its run
folder, or measure a model's perplexity. Every check that can fail runs before the long work.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from .calibration_data import Calibration
from .evaluation import Evaluation
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
                 data_root=None, save: bool = True, checkpoint_dir=None, progress: bool = True) -> dict:
    """Quantize ``model`` (alias, folder, .gguf or hub id) with ``quant``, evaluate it, write the run folder.

    ``out`` receives ``magr_run.json`` and ``magr_layers.json`` (and, with ``save``, the model and its
    grids). Block checkpoints go to ``checkpoint_dir`` (default ``out/.blocks`` when saving). Returns the
    run metadata.
    """
    _check_dtype(dtype)
    dev = resolve_device(device)
    calibration.check(data_root)
    evaluation.check(data_root)
    out = Path(out)
    net, tokenizer = load_model(model, dtype=DTYPES[dtype])
    check_config_for_model(net, quant)
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
    return meta


def seed_folder(out, seed: int) -> Path:
    """The run folder of one calibration seed of a cell: OUT/seed-<seed>."""
    return Path(out) / f"seed-{seed}"


def quantize_cell(model: str, out, quant: QuantConfig, seeds, calibration: Calibration = Calibration(),
                  evaluation: Evaluation = Evaluation(), save: bool = False, **options) -> list[dict]:
    """One cell of the pipeline: :func:`quantize_run` once per calibration seed, into OUT/seed-<seed>.

    A method that reads no calibration data (RTN) gives the same model for every seed, so it runs once,
    for the first seed. ``save`` keeps the model of the first seed only (the one the zero-shot stages
    evaluate). ``options`` go to :func:`quantize_run`. Returns the run metadata of each seed.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds} must be a non-empty list of distinct integers")
    if not quant.uses_calibration:
        if len(seeds) > 1:
            log.info("%s reads no calibration data: one run (seed %d) stands for every seed", quant.label, seeds[0])
        seeds = seeds[:1]
    return [quantize_run(model, seed_folder(out, s), quant, replace(calibration, seed=s), evaluation,
                         save=save and i == 0, **options) for i, s in enumerate(seeds)]


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
