"""Export to GPTQ / compressed-tensors (magr.deploy.export): storable grids, exact codes, bad inputs, and real loads
through transformers (stories260K; a tiny random Llama with 32-multiple widths for 3-bit GPTQ)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magr.evaluation.perplexity import Evaluation
from magr.deploy.export import Export, check_exportable, export_model, layer_codes, model_codes
from magr.core.methods import QuantConfig
from magr.pipeline.models import linear_shapes, load_model
from magr.pipeline.persistence import PARAMS_FILE
from magr.pipeline.blocks import quantize_model
from magr.core.quantizers import Grid, QuantParams, quantize, quantize_codes
from magr.runs import quantize_run

CALIB = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))


def needs(module: str):
    """Import a loader package; in CI (CI=true) a missing one fails instead of skipping."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module)


# ------------------------------------------------------------------------------------- storable grids
@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.floats(0.5, 1.0), st.booleans(), st.integers(0, 2**31))
def test_grid_options_keep_zero_points_storable_and_scales_fp16(bits, beta, negative, seed):
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
    if negative:
        W = -W.abs()  # all-negative rows: round(-min/delta) = round(maxq / beta)
    plain = Grid(bits, beta=beta).params(W)
    clamped = Grid(bits, beta=beta, clamp_zero=True).params(W)
    assert 0 <= clamped.zero.min() and clamped.zero.max() <= 2**bits - 1
    assert torch.equal(clamped.scale, plain.scale)
    assert torch.equal(clamped.zero, plain.zero.clamp(0, 2**bits - 1))
    if beta == 1.0:
        assert torch.equal(clamped.zero, plain.zero)  # never bites at beta = 1
    if negative and round((2**bits - 1) / beta) > 2**bits - 1:
        assert plain.zero.max() > 2**bits - 1  # the unstorable case the option exists for
    half = Grid(bits, beta=beta, fp16_scale=True, clamp_zero=True).params(W)
    assert torch.equal(half.scale, half.scale.half().float())
    assert (half.scale - plain.scale).abs().max() <= plain.scale.max() * 2**-11


def _params(scale, zero, n, bits):
    return QuantParams(torch.tensor(scale).reshape(-1, 1), torch.tensor(zero).reshape(-1, 1), 2**bits - 1,
                       torch.zeros(n, dtype=torch.long))


def test_codes_are_recovered_exactly_and_bad_grids_are_named():
    p = _params([0.1, 0.25], [3.0, 0.0], 4, 2)
    W = torch.tensor([[-0.3, 0.0, 0.0, -0.2], [0.0, 0.75, 0.5, 0.25]])
    lc = layer_codes("blk.q", W, p)
    assert lc.codes.tolist() == [[0, 3, 3, 1], [0, 3, 2, 1]]
    with pytest.raises(ValueError, match=r"blk.q: row 1 group 0 has zero point 5; packed formats store integers "
                                         r"in \[0, 3\] at 2 bits .*--clamp-zero"):
        layer_codes("blk.q", W, _params([0.1, 0.25], [3.0, 5.0], 4, 2))
    W[1, 2] = 0.6  # between two grid points
    with pytest.raises(ValueError, match=r"blk.q: weight \[1, 2\] = 0.6 is not on its saved grid"):
        layer_codes("blk.q", W, p)
    with pytest.raises(ValueError, match=r"format='awq' is not allowed; allowed: gptq, compressed-tensors, gguf"):
        Export("awq")


def test_widths_and_group_sizes_a_format_cannot_load_are_refused_before_work(stories260k):
    model, _ = stories260k
    shapes = linear_shapes(model)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj is 172 x 64: 3-bit GPTQ needs both widths"):
        check_exportable(Grid(3), Export("gptq"), shapes)
    with pytest.raises(ValueError, match=r"group_size 4 cannot be loaded as GPTQ; allowed: per channel or 16"):
        check_exportable(Grid(4, group_size=4), Export("gptq"), shapes)
    check_exportable(Grid(3), Export("compressed-tensors"), shapes)


# --------------------------------------------------------------------------------------- bad inputs
def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_a_failure_while_writing_leaves_no_temporary_folder(tmp_path, stories260k, monkeypatch):
    """An error after the staging folder exists (here: the disk fills while the tensors are written) removes it
    and leaves no output folder."""
    import safetensors.torch

    model, tok = stories260k
    cfg = QuantConfig.build(method="rtn", bits=4)
    res = quantize_model(model, CALIB, cfg, device="cpu", progress=False)
    before = _siblings(tmp_path / "x")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        export_model(model, tok, res.params, cfg.grid, tmp_path / "out", Export("gptq"))
    assert _siblings(tmp_path / "x") == before


def test_bad_inputs_fail_clearly_and_leave_nothing(tmp_path, stories260k, capsys):
    from magr.cli import main

    model, tok = stories260k
    cfg = QuantConfig.build(method="rtn", bits=2, beta=0.5)
    res = quantize_model(model, CALIB, cfg, device="cpu", progress=False)
    # beta = 0.5 at 2 bits: any row with max w < ~min w / 5 has zero point round(-min / delta) > 3
    name = min(n for n, q in res.params.items() if (q.zero > 3).any())  # layers are checked in name order
    before = _siblings(tmp_path / "x")
    with pytest.raises(ValueError, match=rf"{name}: row \d+ group 0 has zero point \d; .*\[0, 3\] at 2 bits"):
        export_model(model, tok, res.params, cfg.grid, tmp_path / "out", Export("gptq"))
    assert _siblings(tmp_path / "x") == before  # no output folder, no temporary folder
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ValueError, match=r"output folder .*full exists and is not empty"):
        export_model(model, tok, res.params, cfg.grid, tmp_path / "full", Export("gptq"))
    # a run folder without grids (quantized with --no-save), and a folder that is no run
    run = tmp_path / "nosave"
    quantize_run("stories260k", run, QuantConfig.build(method="rtn", bits=4), save=False, progress=False,
                 calibration=_calibration())
    assert main(["export", str(run), "--format", "gptq", "--out", str(tmp_path / "e")]) == 2
    assert f"no grids ({PARAMS_FILE}) in {run}" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "full"), "--out", str(tmp_path / "e")]) == 2
    assert "no magr_run.json in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(run), "--format", "awq", "--out", str(tmp_path / "e")])
    assert "invalid choice: 'awq'" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def _calibration():
    from magr.pipeline.calibration_data import Calibration

    return Calibration(calib="tinystories", nsamples=4, seqlen=64)


# --------------------------------------------------------------------------- real loads (third party)
EVAL = Evaluation(eval_sets=("tinystories",), eval_seqlen=128, max_windows=2)


def _round_trip(folder, model, params, tok, gptq_backend=None):
    """Reload ``folder`` with the third-party loader: grid comparison and the two perplexities."""
    from magr.deploy.reload import compare_grids, load_exported, loaded_weights, reloaded_grids

    reloaded = load_exported(folder, gptq_backend=gptq_backend)
    cmp = compare_grids(model_codes(model, params), reloaded_grids(folder, reloaded), loaded_weights(reloaded))
    ppl = [EVAL.perplexities(m, tok, "cpu")["tinystories"]["ppl"] for m in (model, reloaded)]
    return cmp, ppl


def _assert_exact(cmp, ppl):
    assert cmp["codes"] and cmp["zero"] and cmp["g_idx"] and cmp["scale_equals_fp16_of_ours"]
    assert cmp["weight_max_diff_in_steps"] < 0.01  # float16 rounding of scale * (q - z) only
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-3)


def test_gptq_checkpoint_loads_in_transformers_with_our_codes(tmp_path, capsys):
    """`magr quantize` writes the run folder, `magr export` packs it; gptqmodel unpacks the same codes."""
    needs("gptqmodel"), needs("optimum")
    from magr.cli import main
    from magr.pipeline.persistence import load_quant_params

    run = tmp_path / "run"
    assert main(["quantize", "--model", "stories260k", "--method", "magr+optq", "--bits", "4", "--iters", "10",
                 "--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "gptq", "--out", str(tmp_path / "gptq")]) == 0
    info = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert info["quant_method"] == "gptq" and info["checkpoint_format"] == "gptq" and info["group_size"] == -1
    model, tok = load_model(str(run))
    # gptqmodel's default CPU kernel (torch_fused) needs widths divisible by 16; stories260K has 172
    cmp, ppl = _round_trip(tmp_path / "gptq", model, load_quant_params(run), tok, gptq_backend="torch")
    _assert_exact(cmp, ppl)


def test_compressed_tensors_checkpoint_from_quantize_save_format(tmp_path, capsys):
    """`magr quantize --save-format compressed-tensors --fp16-scale`: run folder plus OUT/compressed-tensors."""
    needs("compressed_tensors")
    from magr.cli import main
    from magr.pipeline.persistence import load_quant_params

    assert main(["quantize", "--model", "stories260k", "--method", "rtn", "--bits", "3", "--fp16-scale",
                 "--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--out", str(tmp_path),
                 "--save-format", "compressed-tensors"]) == 0
    folder = tmp_path / "compressed-tensors"
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized" and qcfg["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    model, tok = load_model(str(tmp_path))
    cmp, ppl = _round_trip(folder, model, load_quant_params(tmp_path), tok)
    _assert_exact(cmp, ppl)
    assert cmp["scale_max_rel_diff"] == 0.0  # fp16_scale: the stored scales are ours exactly
    # a second run into the same folder is refused before any work: OUT/compressed-tensors is not empty
    assert main(["quantize", "--model", "stories260k", "--method", "rtn", "--calib", "tinystories",
                 "--nsamples", "2", "--seqlen", "64", "--out", str(tmp_path), "--save-format", "compressed-tensors"]) == 2
    assert "compressed-tensors exists and is not empty" in capsys.readouterr().err
    # a grid the format cannot load is refused before any work too
    assert main(["quantize", "--model", "stories260k", "--method", "rtn", "--bits", "3", "--calib", "tinystories",
                 "--nsamples", "2", "--seqlen", "64", "--out", str(tmp_path / "g3"), "--save-format", "gptq"]) == 2
    assert "3-bit GPTQ needs both widths to be multiples of 32" in capsys.readouterr().err
    assert not (tmp_path / "g3").exists()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.model.layers[0].mlp.up_proj.weight.data[5] = model.model.layers[0].mlp.up_proj.weight.data[5].abs()
    return model


def test_3bit_gptq_with_a_zero_point_of_0_loads_as_gptq_v2(tmp_path, stories_tokenizer):
    """32-multiple widths: 3-bit codes straddle words; an all-positive row has zero point 0 (v1 cannot)."""
    needs("gptqmodel"), needs("optimum")
    model = _tiny_llama()
    cfg = QuantConfig.build(method="rtn", bits=3, group_size=32)
    res = quantize_model(model, CALIB, cfg, device="cpu", progress=False)
    assert (res.params["model.layers.0.mlp.up_proj"].zero[5] == 0).all()
    with pytest.raises(ValueError, match=r"mlp.up_proj: row 5 group 0 has zero point 0, which GPTQ v1"):
        export_model(model, stories_tokenizer, res.params, cfg.grid, tmp_path / "v1", Export("gptq", "v1"))
    export_model(model, stories_tokenizer, res.params, cfg.grid, tmp_path / "q", Export("gptq"))
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["checkpoint_format"] == "gptq_v2" and qcfg["bits"] == 3 and qcfg["group_size"] == 32
    from magr.deploy.reload import compare_grids, load_exported, loaded_weights, reloaded_grids

    reloaded = load_exported(tmp_path / "q")
    cmp = compare_grids(model_codes(model, res.params), reloaded_grids(tmp_path / "q", reloaded),
                        loaded_weights(reloaded))
    assert cmp["codes"] and cmp["zero"] and cmp["weight_max_diff_in_steps"] < 0.01
    x = torch.randint(3, 512, (1, 32))
    with torch.no_grad():
        ref, got = model(x).logits, reloaded(x).logits.float()
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_on_grid_check_follows_the_saved_weights():
    """Every saved weight must be scale * (code - zero) with a code in range (refit grids included)."""
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    p = Grid(4).params(W)
    s, z = p.columns()
    Q = quantize(W, s, z, p.maxq)
    codes = layer_codes("l", Q, p).codes
    assert torch.equal(codes.long(), quantize_codes(W, s, z, p.maxq).long())  # the codes RTN rounded W to
    assert torch.equal(layer_codes("l", Q.half(), p).codes, codes)  # a float16 run: rounded weights, same codes
    with pytest.raises(ValueError, match=r"weights stored in torch.bfloat16 cannot pin down 8-bit codes"):
        p8 = Grid(8).params(W)
        layer_codes("l8", quantize(W, *p8.columns(), p8.maxq).bfloat16(), p8)
    p.scale[2, 0] *= 1.5  # a grid that is not the one the weights were rounded to
    with pytest.raises(ValueError, match=r"l: weight \[2, \d+\] = .* is not on its saved grid"):
        layer_codes("l", Q, p)
