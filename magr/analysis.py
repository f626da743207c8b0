"""Analysis behind the notebooks: feature-matrix rank (paper Table 1), MagR's effect on the weights
(Figure 1), and the per-cell results of the pipeline gathered into tables (Tables 2-4).

Table 1's "fraction rank" of a layer's feature matrix X (tokens x m inputs): with the singular values of
X taken as sigma_i = sqrt(lambda_i(X^T X)) (the m eigenvalues of the Gram matrix, in float64),

    fraction_rank(X) = #{i : sigma_i > 0.01 * sigma_max} / m,

so a feature matrix with fewer tokens than inputs has a fraction rank of at most tokens / m. A fraction
rank below 1 means X W has a null space: MagR can move W inside it without changing the layer's output.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .driver import (LINEAR_NAMES, RECORDS_FILE, SEQUENTIAL_GROUPS, SUMMARY_FILE, block_forward, capture_block_inputs, checked_layers,
                     collect_stats)
from .solver import magr_preprocess

log = logging.getLogger(__name__)

REL_TOL = 0.01
"""Singular values above REL_TOL * sigma_max count towards the numerical rank (the paper's 0.01)."""
FEATURE_SOURCES = ("last", "all")
"""X = the last calibration sample (what the released code gives MagR) or all calibration tokens."""
SUMMARY_COLUMNS = ("min", "25%", "mean", "75%", "max")

# --------------------------------------------------------------------------------------------------
# Table 1: fraction rank of the feature matrices
# --------------------------------------------------------------------------------------------------


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
def iter_block_stats(model, calib: torch.Tensor, device="cpu", last_block: int | None = None,
                     progress: bool = True) -> Iterator[tuple[int, torch.nn.Module, dict]]:
    """Walk the float model block by block over the calibration tokens; yield (i, block, stats).

    ``stats`` maps each linear layer name to its accumulator (``.S`` = sum x x^T over all tokens,
    ``.H_last`` = X_last^T X_last of the last sample, ``.tokens``); the block sits on ``device`` while
    yielded. Inputs of block i are the float outputs of block i - 1. Stops after ``last_block``.
    """
    if calib.dim() != 2 or calib.numel() == 0:
        raise ValueError(f"calibration tokens must be a non-empty (nsamples, seqlen) tensor, got {tuple(calib.shape)}")
    layers = checked_layers(model)
    n = len(layers) if last_block is None else last_block + 1
    if not 0 < n <= len(layers):
        raise ValueError(f"last_block={last_block} out of range; the model has blocks 0..{len(layers) - 1}")
    device = torch.device(device)
    inps, kwargs = capture_block_inputs(model, calib, device)
    for i in tqdm(range(n), desc="features", unit="block", disable=not progress):
        block = layers[i]
        home = next(block.parameters()).device
        block.to(device)
        stats = collect_stats(block, SEQUENTIAL_GROUPS, inps, kwargs)
        yield i, block, stats
        if i + 1 < n:
            inps = block_forward(block, inps, kwargs, batch=1)
        block.to(home)


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
    for i, _, stats in iter_block_stats(model, calib, device, progress=progress):
        cache: dict[int, tuple] = {}
        for name in LINEAR_NAMES:
            st = stats[name]
            if id(st) not in cache:
                sv_last = gram_singular_values(st.H_last)
                sv_all = gram_singular_values(st.S)
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


# --------------------------------------------------------------------------------------------------
# Figure 1: weights before and after MagR
# --------------------------------------------------------------------------------------------------


def magr_weight_samples(model, calib: torch.Tensor, layers: Sequence[tuple[int, str]], alpha: float = 1e-3,
                        iters: int = 200, group_size: int | None = None, feature_source: str = "last",
                        device="cpu", progress: bool = True) -> list[dict]:
    """Run MagR on the float weights of a few layers, with the float model's calibration features.

    ``layers``: (block, linear name) pairs. Returns one dict per layer: block, layer, w_before, w_after
    (numpy, out x in), row_max_before / row_max_after (max |w| per output channel), objective (F per
    iteration) and seconds. Nothing in ``model`` is changed.
    """
    if feature_source not in FEATURE_SOURCES:
        raise ValueError(f"feature_source {feature_source!r} not allowed; allowed: {FEATURE_SOURCES}")
    wanted = sorted({(int(b), str(n)) for b, n in layers})
    if not wanted:
        raise ValueError("layers is empty; give (block, layer name) pairs such as (0, 'self_attn.q_proj')")
    for _, name in wanted:
        if name not in LINEAR_NAMES:
            raise ValueError(f"layer {name!r} unknown; allowed: {', '.join(LINEAR_NAMES)}")
    out = []
    last = max(b for b, _ in wanted)
    for i, block, stats in iter_block_stats(model, calib, device, last_block=last, progress=progress):
        for b, name in wanted:
            if b != i:
                continue
            st = stats[name]
            H = st.H_last if feature_source == "last" else st.S
            W = block.get_submodule(name).weight.data.float()
            W_new, info = magr_preprocess(W, H, alpha=alpha, iters=iters, group_size=group_size,
                                          projection="newton", return_info=True)
            out.append({"block": i, "layer": name, "w_before": W.cpu().numpy(), "w_after": W_new.cpu().numpy(),
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


# --------------------------------------------------------------------------------------------------
# Tables 2-4: per-cell results of the pipeline
# --------------------------------------------------------------------------------------------------

METHOD_LABELS = {"float": "float", "rtn": "RTN", "magr+rtn": "MagR+RTN", "optq": "OPTQ",
                 "magr+optq": "MagR+OPTQ", "magr+optq-cd": "MagR+OPTQ†"}
METHOD_ORDER = tuple(METHOD_LABELS.values())

#: Paper (LLaMA-2, WikiText-2 perplexity, per channel), from shared/docs/method-notes.md.
PAPER_WIKITEXT2 = {
    ("float", "float"): (5.47, 4.88, 3.31),
    ("W4", "RTN"): (6.11, 5.20, 3.67), ("W4", "OPTQ"): (5.83, 5.13, 3.58),
    ("W4", "MagR+RTN"): (5.91, 5.17, 3.58), ("W4", "MagR+OPTQ"): (5.70, 4.97, 3.44),
    ("W3", "RTN"): (539.48, 10.68, 7.52), ("W3", "OPTQ"): (8.37, 6.44, 4.82),
    ("W3", "MagR+RTN"): (8.66, 6.55, 4.64), ("W3", "MagR+OPTQ"): (6.41, 5.41, 3.82),
    ("W2", "OPTQ"): (7.7e3, 2.1e3, 77.95), ("W2", "MagR+OPTQ†"): (16.73, 11.14, 5.95),
}
PAPER_MODELS = ("LLaMA-2-7B", "LLaMA-2-13B", "LLaMA-2-70B")
#: Paper Table 4: wall time on one A100 for LLaMA-2-7B, minutes.
PAPER_RUNTIME_7B_MIN = {"RTN": 5, "MagR+RTN": 20, "OPTQ": 22, "MagR+OPTQ": 35, "MagR+OPTQ†": 150}



def setting_label(bits: int | None, group_size: int | None) -> str:
    """'W3' per channel, 'W3g64' per group, 'float' without bits."""
    if bits is None:
        return "float"
    return f"W{bits}" if group_size is None else f"W{bits}g{group_size}"


def load_cell(folder: str | Path) -> dict:
    """One quantize cell's results: its summary (config, perplexities, seconds) and per-layer records."""
    folder = Path(folder)
    path = folder / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SUMMARY_FILE} in {folder}: run its quantize stage (dvc repro) first")
    cell = json.loads(path.read_text())
    rec = folder / RECORDS_FILE
    cell["records"] = json.loads(rec.read_text()) if rec.is_file() else []
    cell["name"] = folder.name
    return cell


def load_cells(results_dir: str | Path, names: Sequence[str] | None = None) -> list[dict]:
    """All cells under ``results_dir`` (one folder each), or the named ones in that order."""
    root = Path(results_dir)
    if names is None:
        names = sorted(p.parent.name for p in root.glob(f"*/{SUMMARY_FILE}"))
    return [load_cell(root / n) for n in names]


def method_label(cfg: Mapping) -> str:
    """Paper name of a run's method; MagR+OPTQ with more than one CD pass is the paper's MagR+OPTQ†."""
    if cfg["method"].startswith("magr+optq") and (cfg.get("cd_passes") or 0) > 1:
        return METHOD_LABELS["magr+optq-cd"]
    return METHOD_LABELS[cfg["method"]]


def cell_label(cfg: Mapping) -> str:
    """'W3g64 MagR+OPTQ': a run's setting and paper method name, as in every table and legend."""
    return f"{setting_label(cfg['bits'], cfg['group_size'])} {method_label(cfg)}"


def _cell_keys(cell: Mapping) -> dict:
    cfg = cell["config"]
    return {"setting": setting_label(cfg["bits"], cfg.get("group_size")), "method": method_label(cfg),
            "bits": cfg["bits"], "group": cfg.get("group_size") or "channel"}


def perplexity_table(cells: Sequence[Mapping], float_ppl: Mapping | None = None) -> pd.DataFrame:
    """Table 2: one row per (setting, method) with the perplexity on each evaluation set.

    ``float_ppl``: the float model's ``magr ppl --json`` result ({"ppl": {set: {"ppl": ...}}}).
    """
    rows = []
    if float_ppl is not None:
        rows.append({"setting": "float", "method": "float", "bits": None, "group": "-",
                     **{k: v["ppl"] for k, v in float_ppl["ppl"].items()}})
    for cell in cells:
        if "ppl" not in cell:
            raise ValueError(f"cell {cell.get('name')!r} has no perplexities; run it with --eval sets")
        rows.append({**_cell_keys(cell), **{k: v["ppl"] for k, v in cell["ppl"].items()}})
    out = _sorted(pd.DataFrame(rows))
    out["bits"] = out["bits"].astype("Int64")
    return out


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the paper's order: float, per channel by decreasing bits, then per group; methods in order."""
    if df.empty:
        return df
    key = pd.DataFrame({"g": df["group"].map(lambda g: 0 if g in ("channel", "-") else 1),
                        "b": -pd.to_numeric(df["bits"]).fillna(np.inf),
                        "m": df["method"].map(METHOD_ORDER.index)})
    return df.loc[key.sort_values(["g", "b", "m"], kind="stable").index].reset_index(drop=True)


def with_paper(table: pd.DataFrame) -> pd.DataFrame:
    """Add the paper's LLaMA-2 WikiText-2 perplexities of the same (setting, method), where published."""
    out = table.copy()
    for j, model in enumerate(PAPER_MODELS):
        out[f"paper {model} WikiText-2"] = [
            PAPER_WIKITEXT2.get((s, m), (None,) * 3)[j] for s, m in zip(out["setting"], out["method"])]
    return out


def runtime_table(cells: Sequence[Mapping]) -> pd.DataFrame:
    """Table 4: wall time of each cell, in total and per block, split into MagR, the quantizer (RTN or
    OPTQ, + CD) and the rest (calibration forward passes, statistics)."""
    rows = []
    for cell in cells:
        recs = cell.get("records", [])
        blocks = cell.get("block_seconds") or []
        magr = sum(r.get("seconds_magr", 0.0) for r in recs)
        quant = sum(r.get("seconds_quant", 0.0) for r in recs)
        total = cell.get("seconds", math.nan)
        rows.append({**_cell_keys(cell), "total (s)": total,
                     "per block (s, mean)": float(np.mean(blocks)) if blocks else math.nan,
                     "per block (s, max)": float(np.max(blocks)) if blocks else math.nan,
                     "MagR (s)": magr, "quantizer (s)": quant, "forward + stats (s)": total - magr - quant,
                     "blocks": len(blocks)})
    df = _sorted(pd.DataFrame(rows))
    if df.empty:
        return df
    df["paper LLaMA-2-7B A100 (min)"] = [PAPER_RUNTIME_7B_MIN.get(m) if g == "channel" else None
                                         for g, m in zip(df["group"], df["method"])]
    return df


def zeroshot_table(results: Mapping[str, Mapping]) -> pd.DataFrame:
    """Table 3: accuracy (%) per task and the mean, one row per model; ``results``: label -> the
    ``magr zeroshot --json`` output ({task: {"acc": ..., "n": ...}})."""
    def order(label: str) -> tuple:
        method = label.split(" ", 1)[-1]
        return (label != "float", METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), label)

    rows = []
    for label in sorted(results, key=order):
        res = results[label]
        row = {"model": label}
        for task, r in res.items():
            if isinstance(r, Mapping) and "acc" in r:
                row[task] = 100 * r["acc"]
        accs = [v for k, v in row.items() if k != "model"]
        row["mean"] = float(np.mean(accs)) if accs else math.nan
        row["items per task"] = max((r.get("n") or 0) for r in res.values() if isinstance(r, Mapping)) \
            if res else 0
        rows.append(row)
    df = pd.DataFrame(rows)
    if "items per task" in df:
        df["items per task"] = df["items per task"].astype("Int64")
    return df


def markdown_table(df: pd.DataFrame, floatfmt: str = ".2f", index: bool = False) -> str:
    """A GitHub Markdown table of ``df`` (NaN/None shown as '-')."""
    def fmt(v):
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            return "-"
        if isinstance(v, (float, np.floating)):
            if abs(v) >= 1e4:
                return f"{v:.3g}"
            return format(v, floatfmt)
        return str(v)

    def esc(text) -> str:
        return str(text).replace("|", "\\|")

    frame = df.reset_index() if index else df
    cols = [esc(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in frame.columns) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(esc(fmt(v)) for v in row.tolist()) + " |")
    return "\n".join(lines)


def write_table(df: pd.DataFrame, stem: str | Path, title: str = "", notes: str = "",
                floatfmt: str = ".2f", index: bool = False) -> tuple[Path, Path]:
    """Write ``df`` as ``stem.csv`` and ``stem.md`` (title, table, notes); return both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    df.to_csv(csv, index=index)
    parts = [f"## {title}\n" if title else "", markdown_table(df, floatfmt, index), f"\n{notes}" if notes else ""]
    md.write_text("\n".join(p for p in parts if p) + "\n")
    return csv, md


# --------------------------------------------------------------------------------------------------
# Small helpers for the notebooks and the pipeline
# --------------------------------------------------------------------------------------------------


def parse_layers(text: str, n_blocks: int) -> list[tuple[int, str]]:
    """Parse "0:self_attn.q_proj -1:mlp.down_proj" into [(0, 'self_attn.q_proj'), (n_blocks - 1, ...)].

    Negative blocks count from the end; "mid" is block n_blocks // 2.
    """
    out = []
    for item in text.replace(",", " ").split():
        block, sep, name = item.partition(":")
        if not sep or name not in LINEAR_NAMES:
            raise ValueError(f"layer spec {item!r} not understood; expected BLOCK:NAME with NAME one of "
                             f"{', '.join(LINEAR_NAMES)} (e.g. 0:self_attn.q_proj, -1:mlp.down_proj, mid:mlp.up_proj)")
        try:
            b = n_blocks // 2 if block == "mid" else int(block)
        except ValueError:
            raise ValueError(f"block {block!r} in {item!r} is not an integer or 'mid'") from None
        if not -n_blocks <= b < n_blocks:
            raise ValueError(f"block {b} in {item!r} out of range; the model has blocks 0..{n_blocks - 1}")
        out.append((b % n_blocks, name))
    if not out:
        raise ValueError("no layers given; expected e.g. '0:self_attn.q_proj -1:mlp.down_proj'")
    return out


def largest_group_size(model, candidates: Sequence[int] = (128, 64, 32, 16, 8, 4, 2)) -> int:
    """The largest candidate group size that divides the input size of every linear layer of a block."""
    block = checked_layers(model)[0]
    widths = {block.get_submodule(n).in_features for n in LINEAR_NAMES}
    for g in candidates:
        if all(w % g == 0 for w in widths):
            return g
    raise ValueError(f"no group size in {list(candidates)} divides the layer widths {sorted(widths)}")


def run_cli(argv: Sequence[str]) -> None:
    """Run one ``magr`` command in this process (the same code path as the shell command); raise on failure."""
    from .cli import main

    argv = [str(a) for a in argv]
    log.info("magr %s", " ".join(argv))
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"`magr {' '.join(argv)}` failed with exit status {rc}")


def cell_flags(cell: Mapping) -> list[str]:
    """CLI flags of one cell dict, the way DVC unpacks it: {"bits": 3, "save": False} -> --bits 3 --no-save."""
    flags = []
    for key, value in cell.items():
        if isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no-{key}")
        elif value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def machine_info() -> dict[str, str]:
    """CPU model, core count, memory, GPU (if any) and library versions, for the reports."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()), "memory": mem,
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}
