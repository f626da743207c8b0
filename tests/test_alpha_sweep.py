"""The alpha ablation, layer by layer (magr.reproduction.alpha_sweep): settings checked before any work, the
features split into calibration statistics and held-out X, the sweep's records, and the optimum tables."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from magr.core.preprocessing import MagR
from magr.pipeline.calibration import walk_blocks
from magr.reproduction import alpha_sweep as A

ALPHAS = "0 1e-4 1e-3 1e-2"


def test_settings_are_checked_before_any_work():
    assert A.parse_alphas("1e-3, 0 1e-3") == (0.0, 1e-3)
    assert A.parse_bits([4, 2]) == (2, 4)
    with pytest.raises(ValueError, match="alpha >= 0"):
        A.parse_alphas("0 -1e-3")
    with pytest.raises(ValueError, match="not numbers"):
        A.parse_alphas("0 big")
    with pytest.raises(ValueError, match="allowed"):
        A.parse_bits("3 5")
    with pytest.raises(ValueError, match="layer spec"):
        A.sweep_layers("self_attn.x_proj", "0", 5)
    assert A.sweep_layers("mlp.down_proj self_attn.q_proj", "0 mid -1", 5) == [
        (0, "self_attn.q_proj"), (0, "mlp.down_proj"), (2, "self_attn.q_proj"), (2, "mlp.down_proj"),
        (4, "self_attn.q_proj"), (4, "mlp.down_proj")]
    assert A.paper_alpha(None) == MagR().for_group(None).alpha and A.paper_alpha(64) == MagR().for_group(64).alpha


@pytest.fixture(scope="module")
def data(_stories260k_cached):
    from magr.pipeline.calibration_data import Calibration

    model, tok = _stories260k_cached
    calib = Calibration("tinystories", 3, 64, seed=0).tokens(tok)
    held = A.heldout_windows("tinystories", tok, 64, 2)
    return model, calib, held, A.layer_data(model, calib, held, [(0, "self_attn.q_proj"), (4, "mlp.down_proj")],
                                            progress=False)


def test_layer_data_splits_calibration_and_heldout_rows(data):
    model, calib, held, layers = data
    assert [(d.block, d.layer) for d in layers] == [(0, "self_attn.q_proj"), (4, "mlp.down_proj")]
    blk = next(walk_blocks(model, calib, "cpu"))
    stats = blk.stats([("self_attn.q_proj",)])["self_attn.q_proj"]  # the pipeline's own statistics
    q = layers[0]
    torch.testing.assert_close(q.stats.H, stats.H, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.stats.H_last, stats.H_last, rtol=1e-4, atol=1e-4)
    assert q.X_heldout.shape == (held.numel(), q.W.shape[1]) and q.stats.tokens == calib.numel()


def test_the_sweep_measures_shrinkage_output_change_and_errors(data):
    layers = data[3]
    df = A.alpha_sweep(layers, ALPHAS, "3 4", 4, {"solver": "spg", "iters": 10}, progress=False)
    assert len(df) == 2 * 2 * 4 * 2 * 2  # layers x grids x alphas x quantizers x bits
    zero = df[df["alpha"] == 0]
    assert (zero["output change"] == 0).all() and (zero["error ratio"] == 1).all() and (zero["row max ratio"] == 1).all()
    shrink = df.groupby(["block", "layer", "grid", "alpha"])["row max ratio"].first().unstack("alpha")
    assert (shrink.diff(axis=1).iloc[:, 1:] <= 1e-6).all().all()  # more alpha, smaller rows
    change = df.groupby(["grid", "alpha"])["output change"].mean().unstack("alpha")
    assert (change.diff(axis=1).iloc[:, 1:] > 0).all().all()
    assert set(df["quantizer"]) == {"RTN", "OPTQ"} and set(df["grid"]) == {"per channel", "g4"}
    best = A.optimum_table(df)
    assert len(best) == 2 * 2 * 2 and (best["ratio at best"] <= 1 + 1e-12).all()
    assert set(best["paper alpha"]) == {A.paper_alpha(None), A.paper_alpha(4)}
    with pytest.raises(ValueError, match="alpha = 0"):
        A.alpha_sweep(layers, "1e-3", "3", None, progress=False)
    with pytest.raises(ValueError, match="solver"):
        A.alpha_sweep(layers, ALPHAS, "3", None, {"solver": "newton"}, progress=False)


def test_optimum_and_verdicts_on_known_ratios(tmp_path):
    rows = []
    for layer, scale in (("a", 1.0), ("b", 2.0), ("c", 4.0)):
        for alpha, ratio in ((0, 1.0), (1e-4, 0.9), (1e-3, 0.8), (1e-2, 1.5)):
            rows.append({"block": 0, "layer": layer, "grid": "per channel", "alpha": alpha, "quantizer": "RTN",
                         "bits": 3, "error": scale * ratio * (1.01 if layer == "b" else 1), "error ratio": ratio})
    best = A.optimum_table(pd.DataFrame(rows))
    r = best.iloc[0]
    assert r["best alpha"] == 1e-3 and math.isclose(r["ratio at best"], 0.8)
    assert r["paper alpha"] == A.paper_alpha(None) and math.isclose(r["ratio at paper"], 0.8)
    folder = tmp_path / "m"
    folder.mkdir()
    best.to_csv(folder / "alpha_optimum.csv", index=False)
    table = A.combined_optimum({"m": folder})
    assert table.loc[0, "paper vs alpha 0"] == "lower" and table.loc[0, "model"] == "m"
    assert A.verdict(0.9, 1.1) == "not distinguishable" and A.verdict(1.01, 1.2) == "higher"


def test_heldout_windows_are_the_start_of_the_heldout_split(stories_tokenizer, tmp_path):
    from magr.evaluation.perplexity import make_windows
    from magr.pipeline.data import get_eval_tokens

    full = get_eval_tokens("tinystories", stories_tokenizer, split="heldout")
    assert torch.equal(A.heldout_windows("tinystories", stories_tokenizer, 64, 3), make_windows(full, 64, None, 3))
    assert torch.equal(A.heldout_windows("tinystories", stories_tokenizer, 64, 3, bos_id=1), make_windows(full, 64, 1, 3))
    (tmp_path / "mine.txt").write_text("a text of its own " * 100)
    with pytest.raises(ValueError, match="local file"):
        A.heldout_windows(str(tmp_path / "mine.txt"), stories_tokenizer, 64, 1)
