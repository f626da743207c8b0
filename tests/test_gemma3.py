"""Gemma 3, the second model family: a tiny random Gemma3ForCausalLM (a sliding-window and a global attention
layer, QK-norm, tied embeddings) saved as a safetensors folder runs through every method of the pipeline and
the perplexity, with its family's window protocol (BOS at the start of every window) applied and recorded."""
from __future__ import annotations

import json

import pytest
import torch

from magr.core.methods import PRESETS, QuantConfig
from magr.core.quantizers import quantize
from magr.evaluation.perplexity import Evaluation
from magr.pipeline.calibration import block_forward, walk_blocks
from magr.pipeline.calibration_data import Calibration
from magr.pipeline.families import family_of, window_protocol
from magr.pipeline.models import check_architecture, load_model
from magr.pipeline.persistence import load_quant_params
from magr.runs import perplexity_run, quantize_run

SEQLEN = 48  # longer than the sliding window (16): the two layer types see different masks


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                           query_pre_attn_scalar=16, tie_word_embeddings=True)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory, shared):
    """The tiny Gemma 3 with stories260K's sentencepiece tokenizer (512 pieces, BOS = 1), saved as safetensors."""
    from magr.pipeline.tokenizer import SentencePieceTokenizer

    folder = tmp_path_factory.mktemp("gemma3")
    tiny_gemma3().save_pretrained(folder)
    SentencePieceTokenizer(shared / "models" / "stories260K" / "tokenizer.model").save_pretrained(folder)
    return folder


def test_the_tiny_model_has_both_layer_types_qk_norm_and_tied_embeddings(gemma_folder):
    model, tok = load_model(str(gemma_folder))
    assert type(model).__name__ == "Gemma3ForCausalLM"
    check_architecture(model)  # Gemma3ForCausalLM is a supported architecture: no warning path
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert hasattr(model.model.layers[0].self_attn, "q_norm")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert window_protocol(model).family == window_protocol(str(gemma_folder)).family == "gemma"
    assert tok.bos_token_id == 1


def test_every_block_sees_its_own_mask_and_rotary_embedding():
    """Block inputs walked by magr equal the model's hidden states, sliding-window and global layers alike."""
    model = tiny_gemma3()
    calib = torch.randint(3, 512, (2, SEQLEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(calib, output_hidden_states=True).hidden_states
    for blk in walk_blocks(model, calib, "cpu"):
        torch.testing.assert_close(blk.inps, hidden[blk.index], msg=f"inputs of block {blk.index}")
        if blk.index + 1 < model.config.num_hidden_layers:
            torch.testing.assert_close(block_forward(blk.block, blk.inps, blk.kwargs), hidden[blk.index + 1])


@pytest.mark.parametrize("method", list(PRESETS))
@pytest.mark.parametrize("group_size", [None, 16])
def test_every_method_runs_on_gemma3(gemma_folder, tmp_path, method, group_size):
    quant = QuantConfig.build(method=method, bits=3, group_size=group_size, iters=10,
                              cd_passes=2 if method == "magr+optq-cd" else None)
    meta = quantize_run(str(gemma_folder), tmp_path / "run", quant, Calibration("tinystories", 4, SEQLEN, seed=0),
                        Evaluation(("tinystories",), eval_seqlen=SEQLEN, max_windows=2), device="cpu",
                        progress=False, forward_dtype="bfloat16")
    assert meta["window_protocol"]["family"] == "gemma"
    assert meta["window_protocol"]["calib_bos"] is meta["calibration"]["calib_bos"] is True
    assert meta["ppl"]["tinystories"]["bos_per_window"] is True
    assert torch.isfinite(torch.tensor(meta["ppl"]["tinystories"]["ppl"]))
    written = json.loads((tmp_path / "run" / "magr_run.json").read_text())
    assert written["window_protocol"] == meta["window_protocol"]
    model, _ = load_model(str(tmp_path / "run"))
    params = load_quant_params(tmp_path / "run")
    assert len(params) == 2 * 7
    for name, p in params.items():  # every linear layer lies on its saved grid
        W = model.get_submodule(name).weight.data.float()
        scale, zero = p.columns()
        torch.testing.assert_close(quantize(W, scale, zero, p.maxq), W, atol=1e-6, rtol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_perplexity_follows_the_family_protocol_unless_set(gemma_folder):
    ev = Evaluation(("tinystories",), eval_seqlen=SEQLEN, max_windows=2)
    auto = perplexity_run(str(gemma_folder), ev, device="cpu")
    off = perplexity_run(str(gemma_folder), Evaluation(("tinystories",), SEQLEN, max_windows=2, bos_per_window=False),
                         device="cpu")
    assert auto["window_protocol"]["eval_bos"] is True and auto["ppl"]["tinystories"]["bos_per_window"] is True
    assert off["window_protocol"]["eval_bos"] is False
    assert auto["ppl"]["tinystories"]["ppl"] != off["ppl"]["tinystories"]["ppl"]


def test_calibration_windows_start_with_bos_for_gemma_only(stories_tokenizer):
    cal = Calibration("tinystories", 3, 32, seed=0)
    plain = cal.tokens(stories_tokenizer)
    gemma = cal.for_protocol(family_of("gemma3_text").protocol).tokens(stories_tokenizer)
    llama = cal.for_protocol(family_of("llama").protocol)
    assert llama.calib_bos is False and torch.equal(llama.tokens(stories_tokenizer), plain)
    assert (gemma[:, 0] == stories_tokenizer.bos_token_id).all() and torch.equal(gemma[:, 1:], plain[:, 1:])
    assert Calibration("tinystories", 3, 32, calib_bos=False).for_protocol(family_of("gemma").protocol).calib_bos is False


def test_unknown_model_types_keep_windows_as_they_are():
    assert family_of("gpt2").name == "other" and not family_of("gpt2").eval_bos
    assert family_of("llama").eval_bos is False and family_of("gemma3").eval_bos is True
