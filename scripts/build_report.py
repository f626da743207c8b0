"""Assemble reports/REPORT.md from the tables and figures the notebooks wrote, and reports/metrics.json
(every checked value with its stated uncertainty, magr.reproduction.reported; `dvc metrics show`, and the reference of
scripts/check_reproduction.py).

    python scripts/build_report.py --params params.yaml --reports reports --out reports/REPORT.md \
        --metrics reports/metrics.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from magr.pipeline.families import window_protocol
from magr.pipeline.machine import machine_info
from magr.pipeline.persistence import write_json
from magr.pipeline.sources import FLOAT_BASELINES
from magr.reproduction.alpha_perplexity import against_paper_alpha, alpha_table_of_table2, best_alphas
from magr.reproduction.alpha_sweep import combined_optimum
from magr.reproduction.reported import report_values
from magr.reproduction.tables import markdown_table

SECTIONS = [
    ("Figure 1: weight magnitudes before and after MagR", "fig1_row_max.md",
     ["fig1_row_max_scatter.png", "fig1_weight_histograms.png", "fig1_objective.png"],
     "Per output channel, the largest |w| of a few layers of the float model before (x) and after (y) MagR, "
     "the weight histograms, and MagR's objective per iteration (notebook: fig1_weight_magnitudes)."),
    ("Table 1: fraction rank of the feature matrices", "table1_feature_rank.md",
     ["table1_fraction_rank_by_block.png", "table1_spectra.png"],
     "Per-layer values: table1_feature_rank_layers.csv (notebook: table1_feature_rank)."),
    ("Table 2: perplexity", "table2_perplexity.md", ["table2_perplexity.png"],
     "One DVC stage per cell (`quantize@<cell>`); the paper's columns are LLaMA-2 (notebook: table2_perplexity)."),
    ("Table 2: orderings, seed by seed", "table2_orderings.md", [],
     "Runs with the same seed share their calibration windows, so each ordering is checked seed by seed; the report "
     "states an ordering only where it holds in every seed and its rerun lower bound (the mean log perplexity ratio "
     "minus the half-width of its 95 % rerun prediction interval) is above 0 (notebook: table2_perplexity)."),
    ("Table 3: zero-shot accuracy", "table3_zeroshot.md", ["table3_zeroshot.png"],
     "lm-evaluation-harness on the local copies of the four sets (notebook: table3_zeroshot)."),
    ("Table 3: differences between models", "table3_differences.md", [],
     "A difference is claimed only where it exceeds twice its standard error (notebook: table3_zeroshot)."),
    ("Table 4: wall time", "table4_runtime.md", ["table4_runtime.png"],
     "From the per-layer records and block times of the quantize cells (notebook: table4_runtime)."),
]
# Committed results measured outside the pipeline (too slow for the default profile); shown when present.
EXTRA_SECTIONS = [
    ("Forward dtype: float32 vs half precision (outside the pipeline)", "forward_dtype.md", [],
     "The profile's forward dtype against float32 forwards on the same windows and calibration tokens "
     "(benchmarks/forward_dtype_cells.py; speed per forward: benchmarks/forward_dtype.py, benchmarks/NOTES.md). "
     "The float model and RTN read no calibration data, so their rows isolate the evaluation's own change; a cell "
     "that reads calibration data gets other statistics and other inputs in every later block, and moves about as "
     "much as with another calibration seed (compare Table 2's seed ranges): one seed here, not an effect size."),
    ("MagR's solver against the released 200 ISTA iterations (outside the pipeline)", "magr_solver.md", [],
     "The objective F of paper eq. (3) reached by the profile's MagR solver on every layer of the model, relative "
     "to the released procedure (benchmarks/bench_magr_layers.py); a ratio above 1 is a layer where the solver "
     "stops short of the released strength."),
    ("Earlier default: Table 2 with more calibration tokens (outside the pipeline)", "calibration_size.md", [],
     "Measured with the earlier default profile (4 x 512 calibration tokens, 14 FISTA iterations, float32 "
     "forwards), before issue 19: why OPTQ trailed RTN there: the same cells with more calibration windows "
     "(benchmarks/calibration_size.py; its command and settings are in the section)."),
    ("Earlier default: MagR+RTN at W3, which setting cost it (outside the pipeline)", "magr_rtn_settings.md", [],
     "Measured with the earlier default profile (before issue 19): RTN with MagR+RTN's clipping (beta 0.9 at 3 "
     "bits, the released convention), MagR+RTN without it, and MagR+RTN with 48 FISTA iterations (the objective "
     "of the released 200 ISTA iterations) instead of 14; one seed each (benchmarks/calibration_size.py)."),
    ("Gemma-3-270M: the float model and its window protocol (outside the pipeline)", "gemma3_270m_float_ppl.md", [],
     "The second model family's float baseline (a de-quantized Q4_K_M GGUF, not a float checkpoint), with and "
     "without a BOS at the start of every window (benchmarks/model_ppl.py); the family's protocol "
     "(magr.pipeline.families) is the one every Gemma run uses and records in magr_run.json."),
    ("Table 3 on the full sets (outside the pipeline)", "table3_zeroshot_full.md", [],
     "Every item of the four sets, measured with benchmarks/zeroshot_cells.py and merged by "
     "benchmarks/zeroshot_table.py (settings above; the JSON files are in reports/zeroshot_full/)."),
]


UNCERTAINTY = """\
How uncertain each number is (magr.reproduction.reported; `python scripts/check_reproduction.py` checks a fresh run
against these rules and prints a verdict per value):

- perplexity of a cell that reads calibration data: the mean over the calibration seeds of `spread.seeds`, shown
  with the seed range [min, max] and the rerun interval (column "<set> rerun"): the 95 % prediction interval of a
  rerun's mean over as many seeds, exp(mean log ppl +- t(0.975, n-1) s sqrt(2/n)), s the standard deviation of
  log ppl over the seeds. A rerun (another machine, another thread count) must give a mean inside it: float-sum
  order perturbs a cell about as much as another calibration draw does, so a rerun's seeds count as new draws.
  The seed range alone is not that statement (threads 1 vs 2 moved 3 of the 10 means outside it);
- perplexity of the float model and of RTN (which reads no calibration data): one computation, exact up to the
  order of float sums; stated uncertainty 1 % relative (bfloat16 forwards: the CPU's kernels moved these values by
  up to 0.35 % between an AMD EPYC with AVX512-BF16 and an Intel Xeon with AMX);
- zero-shot accuracy: ± lm-eval's standard error over the items (the same items for every model); a difference
  between two models is claimed only where it exceeds twice the standard error of the difference; a rerun of a
  model that reads calibration data is another quantization, whose accuracy must lie in the 95 % interval of a
  second draw on the same items (`magr.reproduction.reported.rerun_accuracy`);
- Table 1 fraction ranks: ± 1 percentage point (a singular value at the 1 % threshold may cross it);
  Figure 1 row maxima: 0.1 % relative; wall times (Table 4) belong to the machine and are not checked;
- orderings of methods (Table 2) are checked seed by seed and stated only where they hold in every seed and the
  paired mean log ratio stays above 0 in a rerun with 95 % probability (`magr.reproduction.cells.ordering_table`)."""

FAITHFULNESS = """\
Conventions of the released code (shared/docs/method-notes.md) and where this run follows them:

| convention | here |
|---|---|
| plain RTN / OPTQ baselines (beta 1, no coordinate descent) | presets `rtn`, `optq` (beta 1) |
| MagR methods: beta 0.8 / 0.9 / 1 at 2 / 3 / 4 bits, 0.95 at g128, 1 at g64 | presets `magr+*` |
| MagR's X = the last calibration sample, normalised to lambda_max = 1, alpha 1e-3 / 1e-4 | `feature_source: last_sample`, `alpha` |
| 200 ISTA iterations (paper text: 150) | `solver: ista` (the GPU profiles); the CPU default runs the solver and iterations the settings table names, labelled in every table, checked per layer against the objective of 200 ISTA iterations (section "MagR's solver" below: the default's SPG 20 is below it on all 210 layers, worst 0.986; SPG 16 stops at 1.005 on one) |
| models run in float16 | the profile's `forward_dtype` for every forward (calibration propagation, evaluation, zero-shot): float16 on GPUs, bfloat16 in the CPU profiles (CPU float16 matmuls are emulated, slower than float32: benchmarks/NOTES.md); the statistics H and MagR / OPTQ / CD run in float32 on the float32 weights |
| OPTQ per-group grid fitted on the block-start weights (GPTQ's code) | `group_grid: block_start` (default) |
| coordinate descent after MagR+OPTQ: 1 pass, 30 at 2 bits; covariance damped 0.75 and normalised + 0.1 | `CD` defaults |
| calibration: Python `random`, C4 window inside a random document longer than seqlen, WikiText-2 windows of the "\\n\\n"-joined train text | `sampler: released`; offline, the C4 train slice (1041 documents) and the WikiText-2 validation text stand in for the hub splits |
| perplexity: non-overlapping 2048-token windows; C4 = first 256 x 2048 tokens of the first 1100 validation documents joined | the profile's `evaluation` (the CPU default uses fewer, shorter windows) |

Observed in the released code but not followed: its `get_loaders("c4")` evaluates C4 on 256 random 2048-token
windows of random validation documents (`get_c4_llama3`), not on the joined first 1100 documents that
method-notes describe (`get_c4_new`); one released version runs the per-group MagR for 150 iterations and one calls
a second, all-token MagR pass per channel (`W_proximal_preprocess_H`, not defined in the released MagR.py). We
follow method-notes."""


ALPHA = """\
Per model (stage `alpha@<model>`, notebook alpha_sweep): a few layers of each kind at the first, middle and last block
of the float model; per alpha, MagR with the profile's solver, then RTN and OPTQ (no CD pass) on the MagR presets'
grids. "ratio" is the quantized output error ||X (Q - W)^T|| / ||X W^T|| on held-out tokens divided by the same
error at alpha = 0 (no MagR), as a geometric mean over the layers with its 95 % interval over layers; "paper vs alpha 0"
says whether that interval at the paper's alpha lies below 1 (lower error than without MagR), above 1, or contains
1 (not distinguishable on these layers). These are layer-level errors on the float model's inputs, a mechanism, not
end-to-end perplexity: a layer's error ratio says nothing about how errors compound through the blocks."""


ALPHA_E2E = """\
Stage `alpha_perplexity@<model>` (notebook alpha_perplexity): the whole model quantized block by block at each alpha,
every calibration seed; a best alpha is a claim only where its rerun interval does not overlap the paper's alpha's
("intervals overlap": no)."""


def alpha_section(reports: Path) -> list[str]:
    """The section "alpha and scale" from the alpha sweep's folders under reports/alpha (one per model)."""
    root = reports / "alpha"
    folders = {p.name: p for p in sorted(root.iterdir()) if (p / "alpha_optimum.csv").is_file()} if root.is_dir() else {}
    if not folders:
        return profiles_section(reports)
    parts = ["## alpha and scale: the alpha ablation, layer by layer", "", ALPHA, "",
             markdown_table(combined_optimum(folders), ".4g"), "",
             "| model | layers | window protocol | seconds: load, features, sweep |", "|---|---:|---|---|"]
    for name, folder in folders.items():
        meta = json.loads((folder / "alpha_sweep.json").read_text())
        wp, sec = meta["window_protocol"], meta["seconds"]
        parts.append(f"| {name} | {meta['layers']} | {wp['family']} (BOS per window: calibration {wp['calib_bos']}, "
                     f"evaluation {wp['eval_bos']}) | {', '.join(f'{v:.0f}' for v in sec.values())} |")
    parts.append("")
    for name, folder in folders.items():
        parts += [f"### {name}", "", _strip_title((folder / "alpha_shrink.md").read_text()), "",
                  f"![alpha sweep {name}](alpha/{name}/alpha_sweep.png)", ""]
    e2e = reports / "alpha_perplexity"
    for folder in sorted(e2e.iterdir()) if e2e.is_dir() else []:
        if (folder / "alpha_perplexity_best.md").is_file():
            parts += [f"### {folder.name}: end to end (perplexity over alpha)", "", ALPHA_E2E, "",
                      _strip_title((folder / "alpha_perplexity_best.md").read_text()), "",
                      _strip_title((folder / "alpha_perplexity.md").read_text()), "",
                      f"![alpha perplexity {folder.name}](alpha_perplexity/{folder.name}/alpha_perplexity.png)", ""]
    return parts + profiles_section(reports)


PROFILES = """\
Profiles run on this project's machine (reports/profiles/<profile>/; each README gives the command, commit and
machine, and `scripts/check_reproduction.py --profile <profile>` checks a rerun against them): Table 2's cells over
calibration seeds, at more alphas or on another model family. Per set, bits and MagR method: the alpha with the lowest mean
perplexity, whether its rerun interval overlaps the paper's alpha's (then the data do not tell them apart; when
the best is the paper's alpha itself, trivially yes), and each other alpha against the paper's ("higher" / "lower":
their rerun intervals do not overlap). The orderings are the profile's Table 2 orderings: stated only
where they hold in every seed and the rerun lower bound is above 0."""


def profiles_section(reports: Path) -> list[str]:
    """The profiles' part of "alpha and scale": per profile kept under reports/profiles, its README lines, the best
    alpha per set, bits and method (from its Table 2 csv), its Table 2 and its orderings."""
    root = reports / "profiles"
    folders = sorted(p for p in root.iterdir() if (p / "table2_perplexity.csv").is_file()) if root.is_dir() else []
    if not folders:
        return []
    parts = ["### Profiles: end to end on the second family and over alpha", "", PROFILES, ""]
    for folder in folders:
        table2 = pd.read_csv(folder / "table2_perplexity.csv")
        sets = [c for c in table2.columns if f"{c} low" in table2.columns]
        table = alpha_table_of_table2(table2, sets)
        readme = (folder / "README.md").read_text().splitlines() if (folder / "README.md").is_file() else []
        parts += [f"#### Profile {folder.name}", "", *[ln for ln in readme if ln.startswith("- ")], ""]
        if not table.empty and table["alpha"].notna().any():  # MagR cells per channel
            best, versus = best_alphas(table), against_paper_alpha(table)
            best[versus.name] = versus.to_numpy()
            parts += ["Best alpha (mean over seeds):", "", markdown_table(best, ".4g"), ""]
        for md in ("table2_perplexity.md", "table2_orderings.md"):
            if (folder / md).is_file():
                parts += [_strip_title((folder / md).read_text()), ""]
    return parts


def _strip_title(md: str) -> str:
    lines = md.strip().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("#") else lines).strip()


def _windows(params: dict) -> str:
    """The model family's window protocol (magr.pipeline.families), read from the saved model's config."""
    try:
        wp = window_protocol(params["model"])
    except (OSError, ValueError):
        return "unknown (the model folder is not there)"
    return (f"{wp.family} family: BOS at the start of every calibration window {wp.calib_bos}, of every perplexity "
            f"window {wp.eval_bos} ({wp.reason})")


def _workers(workers: int) -> str:
    if workers > 1:
        return (f"{workers} processes of one thread each run a cell's seeds and perplexity sets (magr.pipeline.workers): "
                "the quantize cells' and the float model's numbers are one-thread numbers on any machine")
    return ("1 process with torch's threads ($OMP_NUM_THREADS, else a thread per core: the numbers depend on that "
            "count)")


def settings_table(params: dict) -> str:
    cal, ev, zs = params.get("calibration", {}), params.get("evaluation", {}), params.get("zeroshot", {})
    rows = [
        ("profile", params.get("profile")),
        ("model", f"{params['prepare']['source']} (saved as {params['model']}, {params['prepare']['dtype']})"),
        ("device", params.get("device")),
        ("CPU workers", _workers(params.get("workers", 1))),
        ("forward dtype", f"{params.get('forward_dtype', params['prepare']['dtype'])} (calibration propagation, "
                          "evaluation, zero-shot; the math in float32)"),
        ("calibration", "{nsamples} windows x {seqlen} tokens of {calib}, {sampler} sampler".format(**cal)
                        + f"; seeds {params.get('spread', {}).get('seeds', [cal.get('seed')])}"),
        ("perplexity", ", ".join(f"{k} {v}" for k, v in ev.items())),
        ("quantize (all cells)", ", ".join(f"{k} {v}" for k, v in params.get("quant", {}).items())),
        ("windows", _windows(params)),
        ("cells", ", ".join(params.get("cells", {}))),
        ("zero-shot", f"{zs.get('tasks')} on float + {', '.join(zs.get('cells', []))}; "
                      + ", ".join(f"{k} {v}" for k, v in zs.get("flags", {}).items())),
    ]
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--reports", default="reports")
    p.add_argument("--out", default="reports/REPORT.md")
    p.add_argument("--metrics", default="reports/metrics.json")
    args = p.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    reports = Path(args.reports)
    info = machine_info()
    source = params["prepare"]["source"]

    parts = [
        f"# MagR reproduction report: profile `{params.get('profile')}`",
        "",
        f"> **Different model from the paper.** These numbers are for **{source}**"
        + (f" ({FLOAT_BASELINES[source]})" if source in FLOAT_BASELINES else "")
        + ", not LLaMA-2. Perplexity uses the offline WikiText-2 test copy and the offline C4 validation slice "
          "(shared/data/MANIFEST.md) with the window settings below, not the paper's full 2048-token protocol "
          "unless the profile says so. The paper's LLaMA-2 numbers stand beside ours for the ordering of the "
          "methods only.",
        "",
        "Regenerate: `make repro` (or `dvc repro`); every table is a notebook under notebooks/, executed copies in "
        "reports/notebooks/.",
        "",
        "## Settings",
        "",
        settings_table(params),
        "",
        "## Machine",
        "",
        "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in info.items()),
        "",
    ]
    parts += ["## Uncertainty", "", UNCERTAINTY, "", "## Faithfulness", "", FAITHFULNESS, ""]
    wall = reports / "pipeline_wall_time.md"
    if wall.is_file():
        parts += ["Last measured pipeline wall time: see [pipeline_wall_time.md](pipeline_wall_time.md).", ""]
    extra = [sec for sec in EXTRA_SECTIONS if (reports / sec[1]).is_file()]
    for title, md, figures, note in SECTIONS + extra:
        parts += [f"## {title}", ""]
        path = reports / md
        parts.append(_strip_title(path.read_text()) if path.is_file() else f"_{md} missing: run its stage._")
        parts += ["", note, ""]
        parts += [f"![{fig}]({fig})" for fig in figures if (reports / fig).is_file()]
        parts.append("")
        if md == SECTIONS[-1][1]:
            parts += alpha_section(reports)
    Path(args.out).write_text("\n".join(parts))
    write_json(args.metrics, report_values(reports))  # strict JSON (NaN -> null), atomic
    print(f"wrote {args.out} and {args.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
