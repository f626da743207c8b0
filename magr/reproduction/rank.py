"""Table 1: the fraction rank of every linear layer's feature matrix X (paper Section 3, Table 1).

With the singular values of X (tokens x m inputs) taken as sigma_i = sqrt(lambda_i(X^T X)) (the m
eigenvalues of the Gram matrix, in float64),

    fraction_rank(X) = #{i : sigma_i > 0.01 * sigma_max} / m,

so a feature matrix with fewer tokens than inputs has a fraction rank of at most tokens / m. A fraction
rank below 1 means X W has a null space: MagR can move W inside it without changing the layer's output.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..pipeline.calibration import walk_blocks
from ..pipeline.models import LINEAR_NAMES, SEQUENTIAL_GROUPS, checked_layers

REL_TOL = 0.01
"""Singular values above REL_TOL * sigma_max count towards the numerical rank (the paper's 0.01)."""
SUMMARY_COLUMNS = ("min", "25%", "mean", "75%", "max")


def gram_singular_values(H: torch.Tensor) -> torch.Tensor:
    """Singular values of X from its Gram matrix H = X^T X: sqrt(max(eig(H), 0)), float64, descending."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square Gram matrix X^T X, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H has non-finite entries; the features overflowed or the model diverged")
    Hd = H.detach().to(dtype=torch.float64)
    Hd = 0.5 * (Hd + Hd.T)  # exact symmetry for eigvalsh
    eig = torch.linalg.eigvalsh(Hd)
    return eig.clamp(min=0).sqrt().flip(0).cpu()


def numerical_rank(sv: torch.Tensor, rel_tol: float = REL_TOL) -> int:
    """#{i : sv_i > rel_tol * max(sv)} (0 for an all-zero spectrum)."""
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol={rel_tol} must lie in (0, 1)")
    top = float(sv.max()) if sv.numel() else 0.0
    if top <= 0:
        return 0
    return int((sv > rel_tol * top).sum())


def fraction_rank(H: torch.Tensor, rel_tol: float = REL_TOL) -> float:
    """Numerical rank of X divided by its number of columns m, from H = X^T X (m x m)."""
    sv = gram_singular_values(H)
    return numerical_rank(sv, rel_tol) / sv.numel()


def summarize(values) -> dict[str, float]:
    """min / 25% / mean / 75% / max of a sequence of numbers (percentiles with linear interpolation)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("cannot summarise an empty sequence of values")
    return {"min": float(v.min()), "25%": float(np.percentile(v, 25)), "mean": float(v.mean()),
            "75%": float(np.percentile(v, 75)), "max": float(v.max())}


@torch.no_grad()
def feature_rank_table(model, calib: torch.Tensor, rel_tol: float = REL_TOL, device="cpu",
                       spectra: Sequence[tuple[int, str]] = (), progress: bool = True
                       ) -> tuple[pd.DataFrame, dict[tuple[int, str], dict[str, np.ndarray]]]:
    """Fraction rank of X for every linear layer, for X = the last calibration sample and X = all samples.

    Returns (table with one row per linear layer: block, layer, inputs m, tokens_last, tokens_all,
    rank_last, rank_all, frac_last, frac_all; spectra {(block, layer): {"last": sv, "all": sv}} for the
    layers named in ``spectra``). Layers that share an input (q/k/v, gate/up) share one X.
    """
    wanted = {(int(b), str(n)) for b, n in spectra}
    for b, name in wanted:
        if name not in LINEAR_NAMES:
            raise ValueError(f"spectra layer {name!r} unknown; allowed: {', '.join(LINEAR_NAMES)}")
    rows, out_spectra = [], {}
    blocks = walk_blocks(model, calib, device)
    for blk in tqdm(blocks, total=len(checked_layers(model)), desc="features", unit="block", disable=not progress):
        i, stats = blk.index, blk.stats(SEQUENTIAL_GROUPS, keep_outputs=True)  # one forward per block
        cache: dict[int, tuple] = {}
        for name in LINEAR_NAMES:
            st = stats[name]
            if id(st) not in cache:
                sv_last = gram_singular_values(st.H_last)
                sv_all = gram_singular_values(st.H)
                cache[id(st)] = (sv_last, sv_all)
            sv_last, sv_all = cache[id(st)]
            m = sv_all.numel()
            r_last, r_all = numerical_rank(sv_last, rel_tol), numerical_rank(sv_all, rel_tol)
            rows.append({"block": i, "layer": name, "inputs": m, "tokens_last": st.tokens // calib.shape[0],
                         "tokens_all": st.tokens, "rank_last": r_last, "rank_all": r_all,
                         "frac_last": r_last / m, "frac_all": r_all / m})
            if (i, name) in wanted:
                out_spectra[(i, name)] = {"last": sv_last.numpy(), "all": sv_all.numpy()}
    return pd.DataFrame(rows), out_spectra


def rank_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1: min / 25% / mean / 75% / max of the fraction rank (in %) over all linear layers."""
    rows = {"X = last calibration sample": summarize(100 * table["frac_last"]),
            "X = all calibration samples": summarize(100 * table["frac_all"])}
    out = pd.DataFrame(rows).T[list(SUMMARY_COLUMNS)]
    out.index.name = "feature matrix"
    return out
