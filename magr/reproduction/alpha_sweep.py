"""The alpha ablation, layer by layer (issue 22): how far MagR shrinks a layer's weights, how much it moves the
layer's output, and what that does to the quantization error, over a grid of alpha.

For a linear layer with weight W (out x in), calibration statistics H (all calibration tokens: OPTQ's H) and
H_last = X_last^T X_last (the last calibration window: MagR's X, paper eq. (3), alpha relative to
lambda_max(H_last)), and features X_h of held-out tokens the calibration never saw, per alpha and grid:

    W'            = MagR_alpha(W; H_last)                        (alpha = 0: W' = W, the minimiser of eq. (3)'s
                                                                  quadratic term alone)
    row max       = mean over rows of max_j |W'_ij|               (and its ratio to W's)
    output change = ||X_h (W' - W)^T||_F / ||X_h W^T||_F
    error(q, b)   = ||X_h (Q - W)^T||_F / ||X_h W^T||_F,          Q = q(W'; H, b-bit grid), q = RTN or OPTQ

MagR, RTN and OPTQ are magr's own steps, built by :meth:`magr.core.methods.QuantConfig.build` from the
``magr+rtn`` / ``magr+optq`` presets with the profile's MagR settings, so the grid (and its beta, the released
code's table) is the one MagR+RTN / MagR+OPTQ use at every alpha, alpha = 0 included; no coordinate-descent pass
follows OPTQ here (the quantizer alone). The layers' inputs come from the float model (every block unquantized).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.methods import QuantConfig
from ..core.quantizers import SUPPORTED_BITS
from ..evaluation.perplexity import make_windows
from ..pipeline.calibration import LayerStats, block_forward, walk_blocks
from ..pipeline.data import EVAL_SPLITS, check_source, eval_text, tokenize_text
from ..pipeline.models import LINEAR_NAMES, parse_layers
from .cells import t975
from .tables import paper_alpha  # noqa: F401  (alpha_sweep.paper_alpha in the notebooks)

log = logging.getLogger(__name__)

HELDOUT_CHARS_PER_TOKEN = 32
"""Characters of held-out text tokenized per token needed (English text: about 4 per token); the windows are
taken from the start of the text, so tokenizing a prefix gives the same tokens as the whole text (checked)."""
QUANTIZERS = ("rtn", "optq")
"""The quantizers after MagR: the presets ``magr+rtn`` and ``magr+optq`` (their grids; no refinement)."""


# ----------------------------------------------------------------------------------------------- settings
def parse_alphas(text) -> tuple[float, ...]:
    """'0 1e-5 1e-3' (or a sequence) -> (0.0, 1e-05, 0.001): non-negative, distinct, sorted."""
    items = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    try:
        alphas = [float(a) for a in items]
    except ValueError:
        raise ValueError(f"alphas {text!r}: not numbers; expected e.g. '0 1e-5 1e-4 1e-3'") from None
    bad = [a for a in alphas if not (math.isfinite(a) and a >= 0)]
    if not alphas or bad:
        raise ValueError(f"alphas {text!r}: need at least one finite alpha >= 0 (bad: {bad})")
    return tuple(sorted(set(alphas)))


def parse_bits(text) -> tuple[int, ...]:
    """'2 3 4' (or a sequence) -> (2, 3, 4), each one of :data:`magr.core.quantizers.SUPPORTED_BITS`."""
    items = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    try:
        bits = sorted({int(b) for b in items})
    except ValueError:
        raise ValueError(f"bits {text!r}: not integers; expected e.g. '2 3 4'") from None
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if not bits or bad:
        raise ValueError(f"bits {text!r}: allowed {SUPPORTED_BITS} (bad: {bad})")
    return tuple(bits)


def sweep_layers(kinds: str, depths: str, n_blocks: int) -> list[tuple[int, str]]:
    """(block, layer) for every layer kind at every depth: kinds 'self_attn.q_proj mlp.down_proj', depths
    '0 mid -1' (:func:`magr.pipeline.models.parse_layers`'s block syntax); distinct, in model order."""
    spec = " ".join(f"{d}:{k}" for d in depths.replace(",", " ").split() for k in kinds.replace(",", " ").split())
    return sorted(set(parse_layers(spec, n_blocks)), key=lambda bl: (bl[0], LINEAR_NAMES.index(bl[1])))


def grid_label(group_size: int | None) -> str:
    return "per channel" if group_size is None else f"g{group_size}"


# ----------------------------------------------------------------------------------------------- features
@dataclass
class LayerData:
    """One layer of the float model: its weight, its calibration statistics, its held-out features."""

    block: int
    layer: str
    W: torch.Tensor  # rows x in, float32: the layer's output channels (all, or a seeded sample of them)
    stats: LayerStats  # H over the calibration windows, H_last / X_last of the last one
    X_heldout: torch.Tensor  # held-out tokens x in, float32


def heldout_windows(source: str, tokenizer, seqlen: int, windows: int, bos_id: int | None = None,
                    data_root=None) -> torch.Tensor:
    """(windows, seqlen) tokens of ``source``'s split that calibration never draws from (C4: validation,
    WikiText-2: test, TinyStories: the held-out part of validation; :data:`magr.pipeline.data.EVAL_SPLITS`),
    cut as perplexity windows (BOS first with ``bos_id``)."""
    name, _ = check_source(source)
    if name not in EVAL_SPLITS:
        raise ValueError(f"held-out tokens of {source!r}: a local file has no split apart from its calibration "
                         f"text; allowed: {', '.join(EVAL_SPLITS)}")
    text = eval_text(source, EVAL_SPLITS[name][-1], data_root)
    need = windows * seqlen + 1
    tokens = tokenize_text(text[:HELDOUT_CHARS_PER_TOKEN * need], tokenizer)  # the windows come from the start
    if tokens.numel() <= need:  # a text of unusually long tokens: all of it
        tokens = tokenize_text(text, tokenizer)
    return make_windows(tokens[:need], seqlen, bos_id, windows)


def _layer_inputs(blk, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every row's inputs (rows, seqlen, in; float32) of the named linear layers of a walked block."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [blk.block.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0].float())) for name in names]
    try:
        block_forward(blk.block, blk.inps, blk.kwargs, forward_dtype=blk.forward_dtype)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts, 0) for name, parts in seen.items()}


def sample_rows(W: torch.Tensor, max_rows: int | None, seed: int = 0) -> torch.Tensor:
    """``max_rows`` output channels of W drawn without replacement (seeded; all of them when None or more).

    Exact for what the sweep measures row by row: MagR's penalty and SPG's steps, RTN's grids and OPTQ's column
    updates act on each row alone given H, so a sampled row is quantized as in the whole layer; the layer's ratios
    of Frobenius norms are then estimated from the sampled rows."""
    if max_rows is None or max_rows >= W.shape[0]:
        return W
    if max_rows <= 0:
        raise ValueError(f"max_rows={max_rows} must be positive (or None: every row)")
    rows = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
    return W[rows.to(W.device)]


@torch.no_grad()
def layer_data(model, calib: torch.Tensor, heldout: torch.Tensor, layers: Sequence[tuple[int, str]], device="cpu",
               forward_dtype: torch.dtype | None = None, max_rows: int | None = None, seed: int = 0,
               progress: bool = True) -> list[LayerData]:
    """The :class:`LayerData` of ``layers`` ((block, name) pairs): calibration and held-out windows (the same
    length) run together through the float model's blocks (:func:`magr.pipeline.calibration.walk_blocks`, forwards
    in ``forward_dtype``); each layer's inputs are split into the calibration statistics and the held-out X, and
    its weight keeps ``max_rows`` sampled output channels (:func:`sample_rows`; None: all)."""
    if calib.shape[1] != heldout.shape[1]:
        raise ValueError(f"calibration windows of {calib.shape[1]} tokens and held-out windows of {heldout.shape[1]}: "
                         "they run through the blocks together and need one length")
    n_calib, out = calib.shape[0], []
    last = max(b for b, _ in layers)
    blocks = walk_blocks(model, torch.cat([calib, heldout]), device, last=last, forward_dtype=forward_dtype)
    for blk in tqdm(blocks, total=last + 1, desc="features", unit="block", disable=not progress):
        names = [name for b, name in layers if b == blk.index]
        if not names:
            continue
        for name, X in _layer_inputs(blk, names).items():
            st = LayerStats(X.shape[-1], X.device)
            st.has_last = True  # the last calibration window is MagR's X
            st.add(X[:n_calib])
            W = sample_rows(blk.block.get_submodule(name).weight.data.float(), max_rows, seed).clone()
            out.append(LayerData(blk.index, name, W, st, X[n_calib:].reshape(-1, X.shape[-1])))
    return out


# ------------------------------------------------------------------------------------------------- the sweep
def output_change(D: torch.Tensor, X: torch.Tensor) -> float:
    """||X D^T||_F for a weight change D (out x in) on features X (tokens x in)."""
    return float(torch.linalg.matrix_norm(X @ D.T))


def magr_weight(data: LayerData, alpha: float, group_size: int | None, settings: dict) -> torch.Tensor:
    """W' = MagR_alpha(W) with the run's MagR settings (paper eq. (3); alpha = 0: W itself)."""
    if alpha == 0:
        return data.W
    magr = QuantConfig.build(method="magr+rtn", group_size=group_size, alpha=alpha, **settings).preprocess
    return magr.apply([data.W], data.stats, group_size)[0][0]


def sweep_layer(data: LayerData, alphas: Sequence[float], bits: Sequence[int], group_sizes: Sequence[int | None],
                settings: dict) -> list[dict]:
    """One record per (grid, alpha, quantizer, bits) of one layer: row max |w| after MagR, output change, and
    the quantized output error (module docstring), all on the held-out features.

    The MagR weights of all alphas are quantized in one call per quantizer and bits, their rows stacked: RTN's
    grids and OPTQ's column updates act on each row alone given H, so this is the same problem as one call per
    alpha, with one Cholesky factor of H instead of one per alpha."""
    X, W = data.X_heldout, data.W
    ref = output_change(W, X)
    row_max_before = float(W.abs().amax(dim=1).mean())
    records = []
    for g in group_sizes:
        t0 = time.perf_counter()
        weights = [magr_weight(data, alpha, g, settings) for alpha in alphas]
        shrink = [{"block": data.block, "layer": data.layer, "grid": grid_label(g), "alpha": alpha,
                   "row max": float(W2.abs().amax(dim=1).mean()),
                   "row max ratio": float(W2.abs().amax(dim=1).mean()) / row_max_before,
                   "output change": output_change(W2 - W, X) / ref} for alpha, W2 in zip(alphas, weights)]
        stacked, errors = torch.cat(weights), [[] for _ in alphas]
        for b in bits:
            for q in QUANTIZERS:
                cfg = QuantConfig.build(method=f"magr+{q}", bits=b, group_size=g, **settings)
                Q, _ = cfg.quantizer(stacked, data.stats.H, cfg.grid)
                for k, Qa in enumerate(torch.split(Q, W.shape[0])):
                    errors[k].append({"quantizer": cfg.quantizer.name.upper(), "bits": b, "beta": cfg.grid.beta,
                                      "error": output_change(Qa - W, X) / ref})
        seconds = (time.perf_counter() - t0) / len(alphas)  # MagR and the quantizations, per alpha
        records += [{**sh, "seconds": seconds, **e} for sh, errs in zip(shrink, errors) for e in errs]
    return records


def alpha_sweep(layers: Sequence[LayerData], alphas, bits, group_size: int | None, settings: dict | None = None,
                progress: bool = True) -> pd.DataFrame:
    """:func:`sweep_layer` on every layer, per channel and per group of ``group_size`` (None: per channel only);
    ``settings``: MagR / OPTQ settings by their flat names (solver, iters, precision, feature_source, ...).
    Returns the long table with ``error ratio`` = error / error at alpha = 0 (same layer, grid, quantizer, bits)."""
    alphas, bits = parse_alphas(alphas), parse_bits(bits)
    if alphas[0] != 0:
        raise ValueError(f"alphas {alphas}: the sweep needs alpha = 0 (no MagR), the reference of every ratio")
    settings = dict(settings or {})
    QuantConfig.build(method="magr+optq", **settings)  # bad settings fail here, before any work
    grids = (None,) if group_size is None else (None, int(group_size))
    rows = []
    for data in tqdm(layers, desc="alpha sweep", unit="layer", disable=not progress):
        rows += sweep_layer(data, alphas, bits, grids, settings)
    df = pd.DataFrame(rows)
    keys = ["block", "layer", "grid", "quantizer", "bits"]
    base = df[df["alpha"] == 0].set_index(keys)["error"]
    df["error ratio"] = df["error"] / base.reindex(pd.MultiIndex.from_frame(df[keys])).to_numpy()
    return df


# ------------------------------------------------------------------------------------------------- summaries
def _geomean_interval(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Geometric mean of ratios over layers and its 95 % interval exp(mean log r +- t s / sqrt(n))."""
    logs = np.log(np.asarray(ratios, dtype=float))
    n = len(logs)
    half = t975(n - 1) * float(np.std(logs, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return float(np.exp(logs.mean())), float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))


def optimum_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per grid, quantizer and bits: the alpha with the lowest geometric mean (over layers) of the error ratio to
    alpha = 0, that mean with its 95 % interval over layers, the same at the paper's alpha, and the range of the
    layers' own best alphas."""
    rows = []
    for (grid, quantizer, bits), part in df.groupby(["grid", "quantizer", "bits"], sort=False):
        by_alpha = {a: _geomean_interval(p["error ratio"]) for a, p in part.groupby("alpha")}
        best = min(by_alpha, key=lambda a: by_alpha[a][0])
        paper = paper_alpha(None if grid == "per channel" else int(grid[1:]))
        own = part.loc[part.groupby(["block", "layer"])["error"].idxmin(), "alpha"]
        at_paper = by_alpha.get(paper, (math.nan,) * 3)
        rows.append({"grid": grid, "quantizer": quantizer, "bits": bits, "layers": part.groupby(["block", "layer"]).ngroups,
                     "best alpha": best, "ratio at best": by_alpha[best][0],
                     "best 95% low": by_alpha[best][1], "best 95% high": by_alpha[best][2],
                     "paper alpha": paper, "ratio at paper": at_paper[0],
                     "paper 95% low": at_paper[1], "paper 95% high": at_paper[2],
                     "layers' best alpha min": float(own.min()), "layers' best alpha max": float(own.max())})
    return pd.DataFrame(rows)


def shrink_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per grid and alpha: row max ratio and output change (geometric mean over layers, and the largest)."""
    one = df.drop_duplicates(["block", "layer", "grid", "alpha"])
    rows = []
    for (grid, alpha), part in one.groupby(["grid", "alpha"], sort=False):
        rows.append({"grid": grid, "alpha": alpha,
                     "row max ratio (geo. mean)": float(np.exp(np.log(part["row max ratio"]).mean())),
                     "output change (mean)": float(part["output change"].mean()),
                     "output change (max)": float(part["output change"].max())})
    return pd.DataFrame(rows)


def verdict(low: float, high: float) -> str:
    """What a 95 % interval of an error ratio says: 'lower' / 'higher' than at alpha = 0, or 'not distinguishable'."""
    if math.isnan(low) or math.isnan(high):
        return "-"
    return "lower" if high < 1 else "higher" if low > 1 else "not distinguishable"


def combined_optimum(folders) -> pd.DataFrame:
    """One row per model, grid kind, quantizer and bits from each model's ``alpha_optimum.csv`` (``folders``:
    label -> the folder the notebook wrote): the best alpha, the error ratio there and at the paper's alpha with
    their 95 % intervals over layers, and what the paper's interval says (:func:`verdict`)."""
    rows = []
    for label, folder in folders.items():
        for _, r in pd.read_csv(f"{folder}/alpha_optimum.csv").iterrows():
            rows.append({"model": label, "grid": r["grid"], "quantizer": r["quantizer"], "bits": int(r["bits"]),
                         "best alpha": r["best alpha"],
                         "ratio at best [95%]": f"{r['ratio at best']:.3f} [{r['best 95% low']:.3f}, "
                                                f"{r['best 95% high']:.3f}]",
                         "paper alpha": r["paper alpha"],
                         "ratio at paper [95%]": f"{r['ratio at paper']:.3f} [{r['paper 95% low']:.3f}, "
                                                 f"{r['paper 95% high']:.3f}]",
                         "paper vs alpha 0": verdict(r["paper 95% low"], r["paper 95% high"]),
                         "layers' best": "{:g}-{:g}".format(r["layers' best alpha min"], r["layers' best alpha max"])})
    return pd.DataFrame(rows)
