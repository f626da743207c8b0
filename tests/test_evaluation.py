"""Perplexity: the windowing protocol, exact values on toy models, the stories260K reference figure."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from magr.pipeline.data import get_eval_tokens
from magr.evaluation.perplexity import make_windows, perplexity


class _FixedLM(torch.nn.Module):
    """Toy LM whose next-token distribution is ``probs`` whatever the context."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logp = torch.nn.Parameter(probs.log(), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logp.expand(*input_ids.shape, -1).clone())


@pytest.fixture(scope="module")
def story_tokens(stories_tokenizer, data_root):
    return get_eval_tokens("tinystories", stories_tokenizer, split="validation", data_root=data_root,
                           max_tokens=20_000)


# ------------------------------------------------------------------------------------------- windows
def test_make_windows_plain():
    w = make_windows(torch.arange(10), seqlen=4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # trailing partial window dropped


def test_make_windows_bos_per_window():
    w = make_windows(torch.tensor([1, 10, 11, 12, 13, 14, 15, 16]), seqlen=4, bos_id=1)
    assert w.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15]]  # the stream's own BOS is not doubled


def test_make_windows_max_and_2d():
    w = make_windows(torch.arange(100).unsqueeze(0), seqlen=10, max_windows=3)
    assert w.shape == (3, 10) and w[2, 0].item() == 20


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=torch.arange(5), seqlen=8), "not enough for one window"),
    (dict(tokens=torch.arange(5), seqlen=1), "seqlen must be at least 2"),
    (dict(tokens=torch.zeros(2, 5, dtype=torch.long), seqlen=2), r"1-D.*\(2, 5\)"),
    (dict(tokens=torch.arange(50), seqlen=5, max_windows=0), "max_windows"),
])
def test_make_windows_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_windows(**kwargs)


# -------------------------------------------------------------------------------------- exact values
def test_uniform_model_perplexity_is_vocab_size():
    model = _FixedLM(torch.full((37,), 1 / 37, dtype=torch.float64))
    tokens = torch.randint(0, 37, (1000,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, tokens, seqlen=64, progress=False) == pytest.approx(37, rel=1e-9)


def test_fixed_distribution_perplexity_matches_cross_entropy():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    model = _FixedLM(probs)
    tokens = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3, 2, 0, 1, 1])
    # windows of 4: predicted tokens are positions 1..3 of each window
    predicted = torch.cat([w[1:] for w in tokens.view(3, 4)])
    expected = math.exp(-probs.log()[predicted].mean().item())
    assert perplexity(model, tokens, seqlen=4, progress=False) == pytest.approx(expected, rel=1e-12)
    # with BOS (here id 3) per window every stream token is predicted once (3 per window, 4 windows)
    expected_bos = math.exp(-probs.log()[tokens].mean().item())
    assert perplexity(model, tokens, seqlen=4, bos_id=3, progress=False) == pytest.approx(expected_bos, rel=1e-12)


# ------------------------------------------------------------------------------------------ stories260K
def test_stories260k_reference_perplexity(stories260k, story_tokens):
    """MANIFEST: about 4.26 on the first ~20k tokens, 512-token windows, BOS at the start of each."""
    model, _ = stories260k
    ppl = perplexity(model, story_tokens, seqlen=512, bos_id=1, progress=False)
    assert ppl == pytest.approx(4.26, abs=0.03)
    # without a BOS per window the first tokens of each window lose their usual start: a different number
    assert abs(perplexity(model, story_tokens, seqlen=512, progress=False) - ppl) > 0.05


def test_perplexity_batch_size_invariant_and_matches_hf_loss(stories260k, story_tokens):
    model, _ = stories260k
    p1 = perplexity(model, story_tokens, seqlen=256, max_windows=6, progress=False)
    p3 = perplexity(model, story_tokens, seqlen=256, max_windows=6, batch_size=4, progress=False)
    assert math.isfinite(p1) and 1 < p1 < 512
    assert p3 == pytest.approx(p1, rel=1e-5)
    windows = make_windows(story_tokens, 256, max_windows=6)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert p1 == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_perplexity_restores_training_mode(stories260k, story_tokens):
    model, _ = stories260k
    model.train()
    perplexity(model, story_tokens, seqlen=128, max_windows=2, progress=False)
    assert model.training


def test_perplexity_bad_batch_size(stories260k, story_tokens):
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(stories260k[0], story_tokens, seqlen=128, batch_size=0)


@pytest.mark.cuda
def test_perplexity_cuda_matches_cpu(stories260k, story_tokens):
    model, _ = stories260k
    cpu = perplexity(model, story_tokens, seqlen=512, bos_id=1, max_windows=8, progress=False)
    gpu = perplexity(model, story_tokens, seqlen=512, bos_id=1, max_windows=8, device="cuda", progress=False)
    assert next(model.parameters()).device.type == "cpu"  # moved back
    assert gpu == pytest.approx(cpu, rel=1e-3)
    model.to("cuda")
    assert perplexity(model, story_tokens, seqlen=512, bos_id=1, max_windows=8, progress=False) == pytest.approx(
        cpu, rel=1e-3)
