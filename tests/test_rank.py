"""Table 1's fraction rank (magr.reproduction.rank) and Figure 1's MagR samples (magr.reproduction.magnitudes) on real features."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magr import MagR
from magr.reproduction import magnitudes, rank
from magr.pipeline.models import LINEAR_NAMES, parse_layers


# ------------------------------------------------------------------------------------------- Table 1
@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 40), m=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_gram_singular_values_match_svd(p, m, seed):
    """sqrt(eig(X^T X)) equals the singular values of X, padded with zeros when X has fewer rows than columns."""
    X = torch.randn(p, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sv = rank.gram_singular_values(X.T @ X)
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
    assert rank.fraction_rank(X.T @ X) == pytest.approx(r / m)


def test_rank_threshold_is_relative_to_the_largest_singular_value():
    s = torch.tensor([10.0, 0.2, 0.11, 0.09, 0.0], dtype=torch.float64)  # 0.01 * 10 = 0.1
    assert rank.numerical_rank(s) == 3
    assert rank.numerical_rank(s, rel_tol=0.015) == 2
    assert rank.numerical_rank(torch.zeros(4)) == 0
    H = torch.diag(s**2)
    assert rank.fraction_rank(H) == pytest.approx(3 / 5)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="square"):
        rank.gram_singular_values(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="non-finite"):
        rank.gram_singular_values(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="rel_tol=1.5"):
        rank.numerical_rank(torch.ones(3), rel_tol=1.5)
    with pytest.raises(ValueError, match="empty"):
        rank.summarize([])


def test_summarize_and_rank_summary():
    vals = [0.1, 0.5, 0.2, 0.9]
    s = rank.summarize(vals)
    # quartiles by linear interpolation of the sorted values 0.1 0.2 0.5 0.9
    assert s == pytest.approx({"min": 0.1, "25%": 0.175, "mean": 0.425, "75%": 0.6, "max": 0.9})
    table = pd.DataFrame({"frac_last": [0.25, 0.5], "frac_all": [1.0, 0.75]})
    out = rank.rank_summary(table)
    assert list(out.columns) == list(rank.SUMMARY_COLUMNS)
    assert out.loc["X = last calibration sample", "mean"] == pytest.approx(37.5)
    assert out.loc["X = all calibration samples", "min"] == pytest.approx(75.0)


def test_feature_rank_table_on_stories260k(stories260k, stories_tokenizer, data_root):
    from magr.pipeline.calibration_data import get_calibration

    model, _ = stories260k
    calib = get_calibration("tinystories", stories_tokenizer, nsamples=3, seqlen=32, seed=0, data_root=data_root)
    table, spectra = rank.feature_rank_table(model, calib, spectra=[(1, "mlp.down_proj")], progress=False)
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
    from magr.pipeline.calibration_data import get_calibration

    model, _ = stories260k
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = get_calibration("tinystories", stories_tokenizer, nsamples=2, seqlen=32, seed=1, data_root=data_root)
    samples = magnitudes.magr_weight_samples(model, calib, [(0, "self_attn.q_proj"), (2, "mlp.down_proj")],
                                             MagR(alpha=1e-3, iters=30, solver="ista"), progress=False)
    assert [(s["block"], s["layer"]) for s in samples] == [(0, "self_attn.q_proj"), (2, "mlp.down_proj")]
    for s in samples:
        assert s["w_before"].shape == s["w_after"].shape
        assert np.allclose(s["row_max_before"], np.abs(s["w_before"]).max(axis=1))
        assert np.allclose(s["row_max_after"], np.abs(s["w_after"]).max(axis=1))
        assert s["objective"][-1] < s["objective"][0]
        assert np.mean(s["row_max_after"]) < np.mean(s["row_max_before"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    summary = magnitudes.row_max_summary(samples)
    assert list(summary["rows"]) == [64, 64]
    with pytest.raises(ValueError, match="feature_source"):
        MagR(solver="ista", feature_source="first")
    with pytest.raises(ValueError, match="'ista'"):
        magnitudes.magr_weight_samples(model, calib, [(0, "self_attn.q_proj")], MagR(solver="fista"))
    with pytest.raises(ValueError, match="mlp.gate"):
        magnitudes.magr_weight_samples(model, calib, [(0, "mlp.gate")])


def test_parse_layers():
    assert parse_layers("0:self_attn.q_proj mid:mlp.up_proj -1:mlp.down_proj", 5) == [
        (0, "self_attn.q_proj"), (2, "mlp.up_proj"), (4, "mlp.down_proj")]
    with pytest.raises(ValueError, match="BLOCK:NAME"):
        parse_layers("0:q_proj", 5)
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("7:mlp.up_proj", 5)
    with pytest.raises(ValueError, match="'x'"):
        parse_layers("x:mlp.up_proj", 5)
