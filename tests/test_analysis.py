"""Tests of magr.analysis: Table 1's fraction rank, Figure 1's MagR samples, and the result tables."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magr import analysis
from magr.driver import LINEAR_NAMES


# ------------------------------------------------------------------------------------------- Table 1
@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 40), m=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_gram_singular_values_match_svd(p, m, seed):
    """sqrt(eig(X^T X)) equals the singular values of X, padded with zeros when X has fewer rows than columns."""
    X = torch.randn(p, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sv = analysis.gram_singular_values(X.T @ X)
    ref = torch.zeros(m, dtype=torch.float64)
    ref[: min(p, m)] = torch.linalg.svdvals(X)
    assert sv.dtype == torch.float64 and sv.shape == (m,)
    assert torch.all(sv[:-1] >= sv[1:])  # descending
    assert torch.allclose(sv, ref, atol=1e-6 * float(ref[0]) + 1e-9, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(r=st.integers(1, 12), extra=st.integers(0, 12), seed=st.integers(0, 10_000))
def test_fraction_rank_of_a_low_rank_matrix(r, extra, seed):
    """X = A B with A (p x r), B (r x m) well conditioned has numerical rank r: fraction r / m."""
    g = torch.Generator().manual_seed(seed)
    m = r + extra
    U, _ = torch.linalg.qr(torch.randn(64, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    s = torch.linspace(1.0, 0.1, r, dtype=torch.float64)  # all above 0.01 * max
    X = U @ torch.diag(s) @ V.T
    assert analysis.fraction_rank(X.T @ X) == pytest.approx(r / m)


def test_rank_threshold_is_relative_to_the_largest_singular_value():
    s = torch.tensor([10.0, 0.2, 0.11, 0.09, 0.0], dtype=torch.float64)  # 0.01 * 10 = 0.1
    assert analysis.numerical_rank(s) == 3
    assert analysis.numerical_rank(s, rel_tol=0.015) == 2
    assert analysis.numerical_rank(torch.zeros(4)) == 0
    H = torch.diag(s**2)
    assert analysis.fraction_rank(H) == pytest.approx(3 / 5)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="square"):
        analysis.gram_singular_values(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="non-finite"):
        analysis.gram_singular_values(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="rel_tol=1.5"):
        analysis.numerical_rank(torch.ones(3), rel_tol=1.5)
    with pytest.raises(ValueError, match="empty"):
        analysis.summarize([])


def test_summarize_and_rank_summary():
    vals = [0.1, 0.5, 0.2, 0.9]
    s = analysis.summarize(vals)
    # quartiles by linear interpolation of the sorted values 0.1 0.2 0.5 0.9
    assert s == pytest.approx({"min": 0.1, "25%": 0.175, "mean": 0.425, "75%": 0.6, "max": 0.9})
    table = pd.DataFrame({"frac_last": [0.25, 0.5], "frac_all": [1.0, 0.75]})
    out = analysis.rank_summary(table)
    assert list(out.columns) == list(analysis.SUMMARY_COLUMNS)
    assert out.loc["X = last calibration sample", "mean"] == pytest.approx(37.5)
    assert out.loc["X = all calibration samples", "min"] == pytest.approx(75.0)


def test_feature_rank_table_on_stories260k(stories260k, stories_tokenizer, data_root):
    from magr.data import get_calibration

    model, _ = stories260k
    calib = get_calibration("tinystories", stories_tokenizer, nsamples=3, seqlen=32, seed=0, data_root=data_root)
    table, spectra = analysis.feature_rank_table(model, calib, spectra=[(1, "mlp.down_proj")], progress=False)
    n_blocks = len(model.model.layers)
    assert len(table) == n_blocks * len(LINEAR_NAMES)
    assert set(spectra) == {(1, "mlp.down_proj")}
    assert (table["tokens_last"] == 32).all() and (table["tokens_all"] == 96).all()
    # one sample of 32 tokens: rank at most 32; all samples see at least as many directions
    assert (table["rank_last"] <= 32).all()
    assert (table["rank_all"] >= table["rank_last"]).all()
    assert ((table["frac_last"] > 0) & (table["frac_all"] <= 1)).all()
    # down_proj has 172 inputs, so 32 tokens leave most of its feature space empty
    down = table[table["layer"] == "mlp.down_proj"]
    assert (down["frac_last"] <= 32 / 172 + 1e-12).all()
    # q, k and v share one input: identical ranks
    b0 = table[table["block"] == 0].set_index("layer")
    assert b0.loc["self_attn.q_proj", "rank_all"] == b0.loc["self_attn.v_proj", "rank_all"]
    sv = spectra[(1, "mlp.down_proj")]["last"]
    assert sv.shape == (172,) and np.sum(sv > 0.01 * sv[0]) == down[down["block"] == 1]["rank_last"].item()


def test_magr_weight_samples_leave_the_model_unchanged(stories260k, stories_tokenizer, data_root):
    from magr.data import get_calibration

    model, _ = stories260k
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = get_calibration("tinystories", stories_tokenizer, nsamples=2, seqlen=32, seed=1, data_root=data_root)
    samples = analysis.magr_weight_samples(model, calib, [(0, "self_attn.q_proj"), (2, "mlp.down_proj")],
                                           alpha=1e-3, iters=30, progress=False)
    assert [(s["block"], s["layer"]) for s in samples] == [(0, "self_attn.q_proj"), (2, "mlp.down_proj")]
    for s in samples:
        assert s["w_before"].shape == s["w_after"].shape
        assert np.allclose(s["row_max_before"], np.abs(s["w_before"]).max(axis=1))
        assert np.allclose(s["row_max_after"], np.abs(s["w_after"]).max(axis=1))
        assert s["objective"][-1] < s["objective"][0]
        assert np.mean(s["row_max_after"]) < np.mean(s["row_max_before"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    summary = analysis.row_max_summary(samples)
    assert list(summary["rows"]) == [64, 64]
    with pytest.raises(ValueError, match="feature_source"):
        analysis.magr_weight_samples(model, calib, [(0, "self_attn.q_proj")], feature_source="first")
    with pytest.raises(ValueError, match="mlp.gate"):
        analysis.magr_weight_samples(model, calib, [(0, "mlp.gate")])


def test_parse_layers_and_group_size(stories260k):
    model, _ = stories260k
    assert analysis.parse_layers("0:self_attn.q_proj mid:mlp.up_proj -1:mlp.down_proj", 5) == [
        (0, "self_attn.q_proj"), (2, "mlp.up_proj"), (4, "mlp.down_proj")]
    with pytest.raises(ValueError, match="BLOCK:NAME"):
        analysis.parse_layers("0:q_proj", 5)
    with pytest.raises(ValueError, match="out of range"):
        analysis.parse_layers("7:mlp.up_proj", 5)
    with pytest.raises(ValueError, match="'x'"):
        analysis.parse_layers("x:mlp.up_proj", 5)
    assert analysis.largest_group_size(model) == 4  # widths 64 and 172
    with pytest.raises(ValueError, match="divides"):
        analysis.largest_group_size(model, candidates=(64, 8))


def test_cell_flags_follow_dvc_unpacking():
    assert analysis.cell_flags({"method": "rtn", "bits": 3, "save": False, "group-size": None}) == [
        "--method", "rtn", "--bits", "3", "--no-save"]
    assert analysis.cell_flags({"act-order": True}) == ["--act-order"]


# ------------------------------------------------------------------------------------- Tables 2-4
def _write_cell(root, name, method, bits, group, ppl, seconds=10.0, blocks=(4.0, 6.0)):
    folder = root / name
    folder.mkdir(parents=True)
    summary = {"model": "m", "config": {"method": method, "bits": bits, "group_size": group, "device": "cpu"},
               "calib": "c4", "nsamples": 2, "seqlen": 8, "seed": 0, "seconds": seconds,
               "block_seconds": list(blocks),
               "ppl": {"wikitext2": {"ppl": ppl, "seqlen": 8, "max_windows": 2}, "c4": {"ppl": 2 * ppl}}}
    (folder / analysis.SUMMARY_FILE).write_text(json.dumps(summary))
    records = [{"block": b, "layer": n, "seconds": 1.0, "seconds_magr": 0.5 if "magr" in method else 0.0,
                "seconds_quant": 0.25} for b in range(len(blocks)) for n in ("a", "b")]
    (folder / analysis.RECORDS_FILE).write_text(json.dumps(records))


def test_perplexity_table_order_and_paper_columns(tmp_path):
    _write_cell(tmp_path, "g", "optq", 3, 64, 9.0)
    _write_cell(tmp_path, "a", "magr+optq", 3, None, 8.0)
    _write_cell(tmp_path, "b", "rtn", 4, None, 7.0)
    _write_cell(tmp_path, "c", "rtn", 3, None, 50.0)
    cells = analysis.load_cells(tmp_path)
    assert [c["name"] for c in cells] == ["a", "b", "c", "g"]
    table = analysis.perplexity_table(cells, {"ppl": {"wikitext2": {"ppl": 6.0}, "c4": {"ppl": 12.0}}})
    assert list(zip(table["setting"], table["method"])) == [
        ("float", "float"), ("W4", "RTN"), ("W3", "RTN"), ("W3", "MagR+OPTQ"), ("W3g64", "OPTQ")]
    assert list(table["c4"]) == [12.0, 14.0, 100.0, 16.0, 18.0]
    paper = analysis.with_paper(table)
    assert paper["paper LLaMA-2-7B WikiText-2"].tolist()[:4] == [5.47, 6.11, 539.48, 6.41]
    assert paper["paper LLaMA-2-70B WikiText-2"].tolist()[3] == 3.82
    assert math.isnan(paper["paper LLaMA-2-7B WikiText-2"].iloc[4])  # no per-group anchor in the notes


def test_runtime_table_splits_the_time(tmp_path):
    _write_cell(tmp_path, "x", "magr+optq", 3, None, 8.0, seconds=12.0, blocks=(5.0, 7.0))
    _write_cell(tmp_path, "y", "rtn", 3, None, 9.0, seconds=3.0, blocks=(1.0, 2.0))
    table = analysis.runtime_table(analysis.load_cells(tmp_path))
    assert list(table["method"]) == ["RTN", "MagR+OPTQ"]
    row = table.set_index("method").loc["MagR+OPTQ"]
    assert row["MagR (s)"] == pytest.approx(2.0) and row["quantizer (s)"] == pytest.approx(1.0)
    assert row["forward + stats (s)"] == pytest.approx(9.0)
    assert row["per block (s, mean)"] == pytest.approx(6.0) and row["per block (s, max)"] == pytest.approx(7.0)
    assert row["paper LLaMA-2-7B A100 (min)"] == 35


def test_load_cell_missing_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        analysis.load_cell(tmp_path / "nothing")


def test_zeroshot_table_and_markdown():
    res = {"float": {"piqa": {"acc": 0.6, "n": 10}, "arc_easy": {"acc": 0.4, "n": 10}},
           "W3 RTN": {"piqa": {"acc": 0.5, "n": 10}, "arc_easy": {"acc": 0.3, "n": 10}}}
    table = analysis.zeroshot_table(res)
    assert table["mean"].tolist() == pytest.approx([50.0, 40.0])
    assert table["items per task"].tolist() == [10, 10]
    md = analysis.markdown_table(pd.DataFrame({"max|w|": [1.23456, math.nan], "name": ["a", "b"]}))
    lines = md.splitlines()
    assert lines[0] == "| max\\|w\\| | name |"
    assert lines[2] == "| 1.23 | a |" and lines[3] == "| - | b |"


def test_write_table(tmp_path):
    csv, md = analysis.write_table(pd.DataFrame({"a": [1.0]}), tmp_path / "sub" / "t", title="T", notes="n")
    assert csv.read_text().splitlines() == ["a", "1.0"]
    assert md.read_text() == "## T\n\n| a |\n|---:|\n| 1.00 |\n\nn\n"
