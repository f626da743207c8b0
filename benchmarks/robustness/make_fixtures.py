"""Fixture models for the before/after cases (written with whatever magr is on PYTHONPATH)."""
import shutil, torch
from pathlib import Path
from magr.pipeline.models import load_model
from magr.pipeline.sources import stories260k_path
R = Path("/tmp/robust/models")
model, tok = load_model("stories260k")
def save(m, name):
    out = R / name
    if out.exists(): shutil.rmtree(out)
    m.save_pretrained(out); shutil.copy(stories260k_path() / "tokenizer.model", out / "tokenizer.model")
save(model, "a")
g = torch.Generator().manual_seed(5)
b, _ = load_model("stories260k")
with torch.no_grad():
    for n, p in b.named_parameters():
        if "layers" in n: p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
save(b, "b")
for name, where, val in (("nan", "model.layers.2.mlp.down_proj.weight", float("nan")),
                         ("inf", "model.layers.1.self_attn.q_proj.weight", float("inf"))):
    m, _ = load_model("stories260k")
    with torch.no_grad(): m.get_submodule(where.rsplit(".", 1)[0]).weight[5, 7] = val
    save(m, name)
z, _ = load_model("stories260k")
with torch.no_grad(): z.model.layers[1].self_attn.o_proj.weight.zero_()
save(z, "zero")
# a tiny Gemma2 with alternating sliding-window attention (window 32)
from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
cfg = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, sliding_window=32, max_position_embeddings=512)
save(Gemma2ForCausalLM(cfg).eval(), "gemma2")
save(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=512, n_positions=512)), "gpt2")
Path("/tmp/robust/short.txt").write_text("Once upon a time there was a cat.\n")
Path("/tmp/robust/afile").write_text("not a folder\n")
print("ok", sorted(p.name for p in R.iterdir()))
