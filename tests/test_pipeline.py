"""Block-by-block pipeline on the real stories260K model: methods, grids, resume, save/reload, bad inputs."""
import json

import pytest
import torch

from magr.pipeline.calibration import LayerStats
from magr.evaluation.perplexity import perplexity
from magr.core.methods import PRESETS, QuantConfig
from magr.pipeline.models import LINEAR_NAMES, load_model
from magr.pipeline.persistence import load_quant_params, read_run, save_quantized, write_run
from magr.pipeline.blocks import quantize_group, quantize_model
from magr.core.fista import fast_iters_matching
from magr.core.quantizers import quantize

CALIB = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
EVAL = torch.randint(3, 512, (2 * 64,), generator=torch.Generator().manual_seed(1))


def _quantized(method, bits=3, **kw):
    model, tok = load_model("stories260k")
    cfg = QuantConfig.build(method=method, bits=bits, iters=kw.pop("iters", 20), **kw)
    return model, tok, quantize_model(model, CALIB, cfg, device="cpu", progress=False)


def _assert_on_grid(model, params):
    for name, p in params.items():
        W = model.get_submodule(name).weight.data.float()
        scale, zero = p.columns()
        torch.testing.assert_close(quantize(W, scale, zero, p.maxq), W, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", list(PRESETS))
def test_every_method_quantizes_every_linear_layer_onto_its_grid(method):
    model, _, res = _quantized(method, cd_passes=2 if method == "magr+optq-cd" else None)
    n_layers = len(model.model.layers) * len(LINEAR_NAMES)
    assert len(res.records) == len(res.params) == n_layers
    if method == "rtn":  # RTN reads no calibration data: no statistics, no reconstruction error
        assert all(r["recon_error"] is None and r["tokens"] == 0 for r in res.records)
    else:
        assert all(torch.isfinite(torch.tensor(r["recon_error"])) for r in res.records)
    _assert_on_grid(model, res.params)
    if method.startswith("magr"):
        # MagR shrinks the per-row range on average
        before = sum(r["row_max_before"]["mean"] for r in res.records)
        after = sum(r["row_max_after"]["mean"] for r in res.records)
        assert after < before
    assert torch.isfinite(torch.tensor(perplexity(model, EVAL, seqlen=64, progress=False)))


def test_optq_reconstructs_better_than_rtn_and_groups_work():
    from magr.pipeline.calibration import walk_blocks
    from magr.pipeline.models import SEQUENTIAL_GROUPS

    model, _ = load_model("stories260k")
    blk = next(walk_blocks(model, CALIB, "cpu"))
    stats = blk.stats(SEQUENTIAL_GROUPS)
    for names in SEQUENTIAL_GROUPS:  # same layers, same statistics: OPTQ's layer error below RTN's
        errors = {}
        for method in ("rtn", "optq"):
            layers = [torch.nn.Linear(1, 1, bias=False) for _ in names]
            for layer, name in zip(layers, names):
                layer.weight = torch.nn.Parameter(blk.block.get_submodule(name).weight.detach().clone())
            _, recs = quantize_group(layers, stats[names[0]], QuantConfig.build(method=method, bits=3))
            errors[method] = [r["recon_error_rel"] for r in recs]
        assert all(o < r for o, r in zip(errors["optq"], errors["rtn"])), (names, errors)
    model, _, r_g = _quantized("optq", group_size=4)  # 4 divides 64 and 172
    assert r_g.params["model.layers.0.mlp.down_proj"].scale.shape == (64, 172 // 4)
    _assert_on_grid(model, r_g.params)


def test_interrupted_run_resumes_from_block_checkpoints(tmp_path, monkeypatch):
    import magr.pipeline.blocks as pipeline

    calls = []
    real = pipeline.quantize_group
    monkeypatch.setattr(pipeline, "quantize_group", lambda layers, *a: calls.extend(layers) or real(layers, *a))
    cfg = QuantConfig.build(method="magr+optq", bits=3, iters=20)
    model_b, _ = load_model("stories260k")
    res_b = quantize_model(model_b, CALIB, cfg, device="cpu", progress=False, checkpoint_dir=tmp_path)
    n_blocks, per_block = len(model_b.model.layers), len(LINEAR_NAMES)
    assert len(calls) == n_blocks * per_block
    # simulate an interruption after block 2: the later blocks' checkpoints are missing
    for f in tmp_path.glob("block_00[34].*"):
        f.unlink()
    calls.clear()
    model_c, _ = load_model("stories260k")
    res_c = quantize_model(model_c, CALIB, cfg, device="cpu", progress=False, checkpoint_dir=tmp_path)
    assert len(calls) == 2 * per_block  # only blocks 3 and 4 were quantized again
    assert res_c.block_seconds[:3] == res_b.block_seconds[:3]  # the first three came from the checkpoints
    assert len(res_c.records) == len(res_b.records)
    for name in res_b.params:
        torch.testing.assert_close(model_c.get_submodule(name).weight, model_b.get_submodule(name).weight)
    # a different setting does not reuse the checkpoints
    calls.clear()
    model_d, _ = load_model("stories260k")
    res_d = quantize_model(model_d, CALIB, QuantConfig.build(method="rtn", bits=3), device="cpu",
                           progress=False, checkpoint_dir=tmp_path)
    assert len(calls) == n_blocks * per_block
    assert "magr_objective_end" not in res_d.records[0]


def test_degenerate_features_leave_weights_unchanged_with_both_solvers():
    st = LayerStats(16, "cpu")
    st.H_last = torch.zeros(16, 16)  # X = 0: lambda_max(H) = 0, nothing to preserve or reduce
    weights = [torch.randn(4, 16, generator=torch.Generator().manual_seed(2)), torch.randn(3, 16)]
    for solver in ("ista", "fista"):
        layers = [torch.nn.Linear(16, w.shape[0], bias=False) for w in weights]
        for layer, w in zip(layers, weights):
            layer.weight.data.copy_(w)
        cfg = QuantConfig.build(method="magr+rtn", bits=8, solver=solver)
        _, recs = quantize_group(layers, st, cfg)
        for w, rec in zip(weights, recs):
            assert rec["magr_objective_end"] is None
            assert rec["row_max_after"]["max"] == pytest.approx(float(w.abs().amax()))
            assert rec["recon_error_rel"] is None  # H = 0: no reference error to divide by


def test_save_and_reload_give_identical_perplexity(tmp_path):
    model, tok, res = _quantized("magr+optq", bits=4)
    before = perplexity(model, EVAL, seqlen=64, progress=False)
    save_quantized(model, tok, res.params, tmp_path)
    write_run(tmp_path, {"config": res.config.to_dict()}, res.records)
    reloaded, tok2 = load_model(str(tmp_path))
    after = perplexity(reloaded, EVAL, seqlen=64, progress=False)
    assert after == pytest.approx(before, rel=1e-6)
    assert tok2.encode("Once upon a time,") == tok.encode("Once upon a time,")
    params = load_quant_params(tmp_path)
    assert QuantConfig.from_dict(read_run(tmp_path)["config"]) == res.config
    assert set(params) == set(res.params)
    _assert_on_grid(reloaded, params)
    records = read_run(tmp_path)["records"]
    assert {"row_max_before", "row_max_after", "recon_error", "seconds"} <= set(records[0])


# ------------------------------------------------------------------------------------ bad inputs
def test_group_size_that_does_not_divide_a_layer_is_refused_before_work():
    model, _ = load_model("stories260k")
    with pytest.raises(ValueError, match=r"group_size 64 does not divide the input size 172 of mlp.down_proj"):
        quantize_model(model, CALIB, QuantConfig.build(method="rtn", group_size=64), device="cpu", progress=False)


@pytest.mark.parametrize("kw, message", [
    ({"bits": 5}, r"bits=5 is not supported; allowed: \(2, 3, 4, 8\)"),
    ({"method": "awq"}, r"method='awq' is not supported; allowed: rtn, magr\+rtn"),
    ({"beta": 1.5}, r"beta=1.5 must lie in \(0, 1\]"),
    ({"feature_source": "first"}, r"feature_source='first' is not allowed; allowed: last_sample, all"),
    ({"solver": "adam"}, r"solver='adam' is not allowed; allowed: ista, fista"),
    ({"group_size": 0}, r"group_size=0 must be a positive integer"),
    ({"cd_passes": -1}, r"cd_passes=-1 must be >= 0"),
    ({"blocksize": 0}, r"blocksize=0 must be a positive"),
    ({"alpah": 1e-3}, r"unknown setting\(s\) alpah; allowed: method, true_sequential, bits"),
])
def test_bad_settings_name_the_value_and_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.build(**{"method": "magr+optq", **kw})


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        quantize_model(gpt2, CALIB, QuantConfig.build(method="rtn"), device="cpu", progress=False)


def test_cli_reports_bad_inputs_before_loading_anything(tmp_path, capsys):
    from magr.cli import main

    base = ["quantize", "--model", "stories260k", "--out", str(tmp_path / "o"), "--nsamples", "2",
            "--seqlen", "32"]
    assert main(base + ["--calib", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(base + ["--calib", "tinystories", "--group-size", "64"]) == 2
    assert "does not divide the input size 172" in capsys.readouterr().err
    assert main(base + ["--calib", "tinystories", "--eval-sets", "nosuchset"]) == 2
    assert "nosuchset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--bits", "5"])
    assert "invalid choice: 5" in capsys.readouterr().err


def test_cli_quantize_and_ppl_end_to_end(tmp_path, capsys):
    from magr.cli import main

    out = tmp_path / "q"
    rc = main(["quantize", "--model", "stories260k", "--method", "magr+optq", "--bits", "4", "--iters", "10",
               "--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--out", str(out),
               "--eval_sets", "tinystories", "--eval-seqlen", "128", "--max_windows", "2"])
    assert rc == 0
    summary = read_run(out)
    assert summary["config"]["preprocess"]["iters"] == 10 and summary["config"]["grid"]["beta"] == 1.0
    capsys.readouterr()
    rc = main(["ppl", "--model", str(out), "--eval-sets", "tinystories", "--eval-seqlen", "128",
               "--max-windows", "2", "--json", str(tmp_path / "new" / "p.json")])
    assert rc == 0
    again = json.loads((tmp_path / "new" / "p.json").read_text())  # the folder is created
    assert again["ppl"]["tinystories"]["ppl"] == pytest.approx(summary["ppl"]["tinystories"]["ppl"], rel=1e-6)
    rc = main(["ppl", "--model", str(out), "--dtype", "bfloat16", "--eval-sets", "tinystories", "--eval-seqlen", "128",
               "--max-windows", "2", "--json", str(tmp_path / "bf16.json")])
    assert rc == 0
    bf16 = json.loads((tmp_path / "bf16.json").read_text())["ppl"]["tinystories"]["ppl"]
    assert bf16 != summary["ppl"]["tinystories"]["ppl"]  # really loaded in bfloat16 ...
    assert bf16 == pytest.approx(summary["ppl"]["tinystories"]["ppl"], rel=0.05)  # ... and still the same model
    with pytest.raises(SystemExit):
        main(["ppl", "--model", str(out), "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_fast_magr_path_reaches_the_reference_objective_in_the_pipeline():
    _, _, ref = _quantized("magr+rtn", solver="ista", iters=20)
    _, _, fast = _quantized("magr+rtn", solver="fista", iters=fast_iters_matching(20))
    # block 0 sees the same inputs in both runs: compare the objective each path reached
    for r, f in zip(ref.records[:7], fast.records[:7]):
        assert r["layer"] == f["layer"]
        assert f["magr_objective_end"] <= r["magr_objective_end"] * 1.001
        assert f["magr_objective_end"] < f["magr_objective_start"]


def test_a_new_method_is_one_preset_row(monkeypatch):
    """MagR in front of a quantizer the package does not know: one row in PRESETS, no pipeline change."""
    from magr.core.methods import Method
    from magr.core.preprocessing import MagR

    def truncate(W, H, grid):  # a plain function quantizer: round towards zero on the grid
        p = grid.params(W)
        scale, zero = p.columns()
        return scale * (torch.clamp(torch.trunc(W / scale) + zero, 0, p.maxq) - zero), p

    monkeypatch.setitem(PRESETS, "magr+trunc", Method("MagR+Trunc", truncate, preprocess=MagR()))
    model, _ = load_model("stories260k")
    cfg = QuantConfig.build(method="magr+trunc", bits=3, iters=10)
    res = quantize_model(model, CALIB, cfg, device="cpu", progress=False)
    _assert_on_grid(model, res.params)
    assert cfg.label == "MagR+Trunc" and cfg.to_dict()["quantizer"] == {"name": "truncate"}
    assert all(r["seconds_magr"] > 0 and r["row_max_after"]["mean"] <= r["row_max_before"]["mean"]
               for r in res.records)
