"""Block-by-block post-training quantization of a decoder model with one method (OPTQ's procedure).

For every decoder block, in order, and inside it for every group of linear layers sharing an input
(true-sequential: [q, k, v] -> [o] -> [gate, up] -> [down], each group seeing inputs computed with the
groups before it already quantized; or all seven from one statistics pass), with the layers' statistics
H (all calibration tokens) and H_last (the last sample), the method's steps run:

    W' = preprocess(W; H or H_last)   (MagR, optional)
    Q, grid = quantizer(W'; H)        (RTN or OPTQ)
    Q, grid = refine(Q; W, H, grid)   (coordinate descent, optional; may re-fit the grid)

The steps come from the config (:class:`magr.core.methods.QuantConfig`); this module only walks the model, times
the steps and writes per-layer records. Finished blocks can be checkpointed and a rerun resumes the ones
made from the same model, dtype, settings, calibration tokens and library numerics (:mod:`magr.pipeline.checkpoints`).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .calibration import LayerStats, walk_blocks
from ..core.methods import QuantConfig
from .models import LINEAR_NAMES, SEQUENTIAL_GROUPS, checked_layers
from .checkpoints import BlockCheckpoints, resume_key
from ..core.quantizers import QuantParams
from .streaming import StreamedModel

log = logging.getLogger(__name__)


@dataclass
class QuantResult:
    """What :func:`quantize_model` produced besides the model changed in place."""

    config: QuantConfig
    records: list[dict] = field(default_factory=list)  # one per linear layer
    params: dict[str, QuantParams] = field(default_factory=dict)  # "model.layers.i.<name>" -> grid
    seconds: float = 0.0
    block_seconds: list[float] = field(default_factory=list)
    checkpoints: BlockCheckpoints | None = None
    quantized: StreamedModel | None = None  # a streamed model: the quantized one, its blocks read from the checkpoints

    @property
    def resumed(self) -> list[int]:
        """The blocks taken from checkpoints."""
        return list(self.checkpoints.resumed) if self.checkpoints else []


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`quantize_model`; its message says what is saved and how to resume."""


def check_config_for_model(model: nn.Module, cfg: QuantConfig) -> None:
    """Fail before any long work if the group size does not divide every layer's input size."""
    if cfg.grid.group_size is None:
        return
    layer = checked_layers(model)[0]
    for name in LINEAR_NAMES:
        n = layer.get_submodule(name).in_features
        if n % cfg.grid.group_size:
            raise ValueError(
                f"group_size {cfg.grid.group_size} does not divide the input size {n} of {name}; "
                f"allowed: a common divisor of this model's layer widths, or per channel (no group size)"
            )


def _row_max_summary(W: torch.Tensor) -> dict:
    r = W.abs().amax(dim=1).float()
    return {"mean": r.mean().item(), "median": r.median().item(), "max": r.max().item(), "min": r.min().item()}


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def quantize_group(layers: list[nn.Linear], st: LayerStats | None, cfg: QuantConfig) -> tuple[list, list[dict]]:
    """Run the method on layers sharing one input; set their weights. Returns (grids, per-layer records).

    ``st`` is None for a method that uses no calibration data (RTN): no statistics, no reconstruction error.
    """
    originals = [layer.weight.data.float() for layer in layers]
    recs = [{"shape": list(W.shape), "tokens": st.tokens if st else 0, "row_max_before": _row_max_summary(W)}
            for W in originals]
    targets = originals
    if cfg.preprocess is not None:
        (targets, infos), seconds = _timed(cfg.preprocess.apply, originals, st, cfg.grid.group_size)
        rows = sum(W.shape[0] for W in originals)
        for rec, W, info in zip(recs, targets, infos):
            rec.update(magr_objective_start=info.objective[0] if info.objective else None,
                       magr_objective_end=info.objective[-1] if info.objective else None,
                       row_max_after=_row_max_summary(W), seconds_magr=seconds * W.shape[0] / rows)
    grids = []
    for layer, W_orig, W, rec in zip(layers, originals, targets, recs):
        (Q, params), rec["seconds_quant"] = _timed(cfg.quantizer, W, st.H if st else None, cfg.grid)
        rec["seconds_refine"] = 0.0
        if cfg.refine is not None:
            (Q, params), rec["seconds_refine"] = _timed(cfg.refine, Q, W_orig, st.H, params, cfg.grid)
        rec.update(_reconstruction_error(Q, W_orig, st))
        rec.setdefault("seconds_magr", 0.0)
        rec["seconds"] = rec["seconds_magr"] + rec["seconds_quant"] + rec["seconds_refine"]
        layer.weight.data.copy_(Q.to(layer.weight.dtype))
        grids.append(params.cpu())
    return grids, recs


def _reconstruction_error(Q: torch.Tensor, W: torch.Tensor, st: LayerStats | None) -> dict:
    """tr((Q - W) H (Q - W)^T) over all calibration tokens, absolute and relative to tr(W H W^T)."""
    if st is None:
        return {"recon_error": None, "recon_error_rel": None}
    D = Q.float() - W
    err, ref = float((D @ st.H * D).sum()), float((W @ st.H * W).sum())
    return {"recon_error": err, "recon_error_rel": err / ref if ref > 0 else None}


def quantize_block(block: nn.Module, stats_of, cfg: QuantConfig) -> tuple[dict[str, QuantParams], list[dict]]:
    """Quantize the seven linear layers of one block; ``stats_of(groups)`` collects their statistics."""
    passes = [(g,) for g in SEQUENTIAL_GROUPS] if cfg.true_sequential else [SEQUENTIAL_GROUPS]
    params, records = {}, []
    for groups in passes:
        stats = stats_of(groups)
        for names in groups:
            grids, recs = quantize_group([block.get_submodule(n) for n in names], stats[names[0]], cfg)
            for name, p, rec in zip(names, grids, recs):
                params[name] = p
                records.append({**rec, "layer": name})
    return params, records


@torch.no_grad()
def quantize_model(model: nn.Module, calib: torch.Tensor, cfg: QuantConfig, device: str | None = None,
                   progress: bool = True, checkpoint_dir: str | Path | None = None,
                   resume: str = "auto", forward_dtype: torch.dtype | None = None, blocks=None) -> QuantResult:
    """Quantize every linear layer of every decoder block of ``model`` in place (OPTQ's block order).

    ``calib`` is a LongTensor (nsamples, seqlen) of calibration tokens; ``device`` where each block is
    computed (default: cuda when available). With ``checkpoint_dir`` each finished block (weights, grids,
    records) is saved there, and a rerun resumes the blocks whose key matches (``resume``: auto, never or
    force; :mod:`magr.pipeline.checkpoints`). Ctrl-C raises :class:`Interrupted`, whose message says what is saved.
    ``forward_dtype``: the dtype of the block forwards (calibration propagation; None: the model's own); the
    statistics H and every step of the method stay in float32 on the model's weights.
    ``blocks``: where the blocks come from (default: ``model``'s own, in memory). A
    :class:`~magr.pipeline.streaming.StreamedModel` opens each block from disk and drops it once done; its
    quantized blocks live in their checkpoints (``checkpoint_dir`` is then required), read back through
    ``QuantResult.quantized``.
    """
    check_config_for_model(model, cfg)
    streamed = getattr(blocks, "streamed", False)
    if streamed and not checkpoint_dir:
        raise ValueError("a streamed model needs a checkpoint_dir: its quantized blocks are written there, one "
                         "shard per block, and read back from there")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_blocks = len(checked_layers(model))
    use_cache = getattr(model.config, "use_cache", False)
    model.config.use_cache = False
    result = QuantResult(cfg)
    store = result.checkpoints = (BlockCheckpoints(checkpoint_dir, resume_key(model, cfg, calib, device, forward_dtype), resume)
                                  if checkpoint_dir else None)
    start = time.perf_counter()
    walk = walk_blocks(model, calib if cfg.uses_calibration else None, device,  # RTN: no data, no forwards
                       forward_dtype=forward_dtype, blocks=blocks)
    bar = tqdm(walk, total=n_blocks, desc=f"{cfg.method} w{cfg.grid.bits}", disable=not progress, unit="block")
    index = 0
    try:
        for blk in bar:
            t_block = time.perf_counter()
            saved = store.load(blk.index, blk.block, device) if store else None
            if saved is not None:
                params, records, seconds = saved
                log.info("block %d: resumed from %s", blk.index, checkpoint_dir)
            else:
                params, records = quantize_block(blk.block, blk.stats, cfg)
                seconds = time.perf_counter() - t_block
                records = [{**rec, "block": blk.index} for rec in records]
                if store:
                    store.save(blk.index, blk.block, params, records, seconds)
            result.params.update({f"model.layers.{blk.index}.{name}": p for name, p in params.items()})
            result.records.extend(records)
            result.block_seconds.append(seconds)
            bar.set_postfix(err=f"{max(r['recon_error_rel'] or 0 for r in records):.2e}")
            index = min(blk.index + 1, n_blocks - 1)  # next: the following block's inputs, then that block
    except KeyboardInterrupt:
        saved = store.describe() if store else "nothing saved (no checkpoint folder: the rerun starts afresh)"
        raise Interrupted(f"interrupted in block {index} of {n_blocks}: {saved}") from None
    finally:
        bar.close()
        model.config.use_cache = use_cache
    result.seconds = time.perf_counter() - start
    if streamed:
        result.quantized = blocks.with_checkpoints(store.folder)
    bad = [r for r in result.records if r["recon_error"] is not None and not math.isfinite(r["recon_error"])]
    if bad:
        log.warning("%d layers have a non-finite reconstruction error", len(bad))
    return result


def layer_problems(model, calib: torch.Tensor, device: str = "cpu") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(layer name, W, H) of every linear layer of ``model`` (a copy is quantized by RTN W4 block by block, one
    statistics pass per block, to collect H as the pipeline sees it)."""
    seen = []

    def record(Q, W, H, params, grid):
        seen.append((W.clone(), H.clone()))
        return Q, params

    cfg = replace(QuantConfig.build(method="rtn", bits=4), refine=record, true_sequential=False)
    res = quantize_model(copy.deepcopy(model), calib, cfg, device=device, progress=False)
    return [(name, W, H) for name, (W, H) in zip(res.params, seen)]
