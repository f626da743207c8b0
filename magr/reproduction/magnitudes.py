"""Figure 1: MagR's effect on the weights of a few layers of the float model.

MagR (paper eq. (3)) runs on the float weights of the chosen layers with the float model's calibration
features; per output channel the largest |w| before and after, the weights themselves and the objective
per iteration are returned for the plots (notebooks/fig1_weight_magnitudes.ipynb).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..pipeline.calibration import walk_blocks
from ..pipeline.models import LINEAR_NAMES, SEQUENTIAL_GROUPS
from ..core.preprocessing import MagR
from ..core.solver import magr_ista


@torch.no_grad()
def magr_weight_samples(model, calib: torch.Tensor, layers: Sequence[tuple[int, str]], magr: MagR = MagR(solver="ista"),
                        group_size: int | None = None, device="cpu", progress: bool = True) -> list[dict]:
    """Run MagR's published algorithm (ISTA, objective at every iteration) on the float weights of a few
    layers, with the float model's calibration features and ``magr``'s alpha, iterations and X.

    ``layers``: (block, linear name) pairs. Returns one dict per layer: block, layer, w_before, w_after
    (numpy, out x in), row_max_before / row_max_after (max |w| per output channel), objective (F per
    iteration) and seconds. Nothing in ``model`` is changed.
    """
    if magr.solver != "ista":
        raise ValueError(f"solver={magr.solver!r}: Figure 1 plots the objective of every iteration of the "
                         "published algorithm; allowed: 'ista'")
    cfg = magr.for_group(group_size)
    wanted = sorted({(int(b), str(n)) for b, n in layers})
    if not wanted:
        raise ValueError("layers is empty; give (block, layer name) pairs such as (0, 'self_attn.q_proj')")
    for _, name in wanted:
        if name not in LINEAR_NAMES:
            raise ValueError(f"layer {name!r} unknown; allowed: {', '.join(LINEAR_NAMES)}")
    out = []
    last = max(b for b, _ in wanted)
    blocks = walk_blocks(model, calib, device, last=last)
    for blk in tqdm(blocks, total=last + 1, desc="features", unit="block", disable=not progress):
        names = [name for b, name in wanted if b == blk.index]
        if not names:
            continue  # no statistics: the walk's one forward gives the next block's inputs
        stats = blk.stats([g for g in SEQUENTIAL_GROUPS if set(g) & set(names)], keep_outputs=True)
        for name in names:
            H = cfg.features(stats[name])
            W = blk.block.get_submodule(name).weight.data.float()
            W_new, info = magr_ista(W, H, cfg.alpha, cfg.iters, group_size, projection="newton", return_info=True)
            out.append({"block": blk.index, "layer": name, "w_before": W.cpu().numpy(), "w_after": W_new.cpu().numpy(),
                        "row_max_before": info.row_max_before.numpy(), "row_max_after": info.row_max_after.numpy(),
                        "objective": np.asarray(info.objective), "seconds": info.seconds})
    return out


def row_max_summary(samples: Sequence[dict]) -> pd.DataFrame:
    """Per sampled layer: mean and max of max|w| per row before / after MagR, and the mean ratio."""
    rows = []
    for s in samples:
        before, after = s["row_max_before"], s["row_max_after"]
        rows.append({"block": s["block"], "layer": s["layer"], "rows": len(before),
                     "mean max|w| before": float(before.mean()), "mean max|w| after": float(after.mean()),
                     "max|w| before": float(before.max()), "max|w| after": float(after.max()),
                     "mean ratio after/before": float(np.mean(after / np.maximum(before, 1e-12))),
                     "rows reduced (%)": float(100 * np.mean(after < before))})
    return pd.DataFrame(rows)
