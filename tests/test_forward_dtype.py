"""Half-precision forwards (``forward_dtype``): the forwards run in bfloat16 while the math keeps the float32
weights; ``None`` or the model's own dtype changes nothing."""
import pytest
import torch

from magr.core.methods import QuantConfig
from magr.core.quantizers import quantize
from magr.evaluation.perplexity import perplexity
from magr.pipeline.blocks import quantize_model
from magr.pipeline.checkpoints import resume_key
from magr.pipeline.models import cast_inputs, forward_cast

CALIB = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
EVAL = torch.randint(3, 512, (4 * 64,), generator=torch.Generator().manual_seed(1))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_forward_cast_casts_for_the_block_and_restores_the_same_tensors(stories260k):
    model, _ = stories260k
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2
    before = _weights(model)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    with forward_cast(model, torch.bfloat16):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their dtype
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_forward_cast_restores_after_an_exception(stories260k):
    model, _ = stories260k
    with pytest.raises(RuntimeError, match="boom"):
        with forward_cast(model, torch.bfloat16):
            raise RuntimeError("boom")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cast_inputs_keeps_masks_and_integers():
    mask = torch.tensor([[0.0, torch.finfo(torch.float32).min]])
    out = cast_inputs({"m": mask, "pos": torch.arange(3), "cs": (torch.ones(2), torch.zeros(2))}, torch.bfloat16)
    assert out["m"].dtype == torch.bfloat16 and torch.isfinite(out["m"]).all() and out["m"][0, 1] < -1e38
    assert out["pos"].dtype == torch.long and out["cs"][0].dtype == torch.bfloat16
    assert cast_inputs(mask, None) is mask


def test_model_dtype_as_forward_dtype_is_bit_identical(stories260k, _stories260k_cached):
    import copy

    cfg = QuantConfig.build(method="magr+optq", bits=3, iters=10)
    a, _ = stories260k
    b = copy.deepcopy(_stories260k_cached[0])
    quantize_model(a, CALIB, cfg, device="cpu", progress=False)
    quantize_model(b, CALIB, cfg, device="cpu", progress=False, forward_dtype=torch.float32)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bfloat16_forwards_keep_float32_weights_on_their_grids(stories260k, _stories260k_cached):
    import copy

    cfg = QuantConfig.build(method="magr+optq", bits=3, iters=10)
    ref = copy.deepcopy(_stories260k_cached[0])
    model, _ = stories260k
    ref_res = quantize_model(ref, CALIB, cfg, device="cpu", progress=False)
    res = quantize_model(model, CALIB, cfg, device="cpu", progress=False, forward_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for name, p in res.params.items():
        W = model.get_submodule(name).weight.data
        scale, zero = p.columns()
        torch.testing.assert_close(quantize(W, scale, zero, p.maxq), W, atol=1e-6, rtol=1e-5)
    # the statistics came from bfloat16 forwards: block 0's inputs are the same embeddings rounded, later
    # blocks see other inputs, so some codes differ, but the result is close
    diff = [name for name in res.params if not torch.equal(model.get_submodule(name).weight, ref.get_submodule(name).weight)]
    assert diff, "bfloat16 forwards changed nothing: the forward dtype was not applied"
    # ... and the layers' relative reconstruction errors on their own statistics stay alike on average
    mean = [sum(r["recon_error_rel"] for r in x.records) / len(x.records) for x in (ref_res, res)]
    assert 0.8 < mean[1] / mean[0] < 1.25, mean


def test_bfloat16_perplexity_is_close_and_leaves_the_model_unchanged(stories260k):
    model, _ = stories260k
    before = _weights(model)
    p32 = perplexity(model, EVAL, seqlen=64, progress=False)
    p16 = perplexity(model, EVAL, seqlen=64, progress=False, forward_dtype=torch.bfloat16)
    assert p16 != p32 and abs(p16 / p32 - 1) < 0.05
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_the_resume_key_names_the_forward_dtype(stories260k):
    model, _ = stories260k
    cfg = QuantConfig.build(method="optq", bits=4)
    k32 = resume_key(model, cfg, CALIB, "cpu")
    kbf = resume_key(model, cfg, CALIB, "cpu", torch.bfloat16)
    assert k32["forward_dtype"] == "float32" and kbf["forward_dtype"] == "bfloat16"
    assert {k for k in k32 if k32[k] != kbf[k]} == {"forward_dtype"}
