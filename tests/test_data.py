"""Data loaders on the offline copies: protocol texts, shapes, seeded determinism, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from magr.pipeline import data
from magr.pipeline.calibration_data import calibration_documents, get_calibration, joined_windows
from magr.pipeline.data import eval_text, get_eval_tokens


# ---------------------------------------------------------------------------------------------- texts
def test_wikitext2_eval_text_protocol(data_root):
    text = eval_text("wikitext2", "test", data_root=data_root)
    # 2891 non-empty rows (MANIFEST), each ending with its own LF as the hub rows do, joined by "\n\n"
    assert text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is an English film")
    assert "\r" not in text
    assert text.count("\n") == 2891 + 2 * 2890


def test_c4_eval_text_joins_documents(data_root):
    text = eval_text("c4", "validation", data_root=data_root)
    with open(data_root / "c4" / "c4-validation.slice.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert text == " ".join(docs[: data.C4_EVAL_DOCS])
    assert eval_text("c4", "test", data_root=data_root) == text  # C4 has no test split


def test_tinystories_heldout_is_tail(data_root):
    whole = eval_text("tinystories", "validation", data_root=data_root)
    held = eval_text("tinystories", "heldout", data_root=data_root)
    (calib,), _ = calibration_documents("tinystories", data_root=data_root)
    assert calib + held == whole
    assert 0.15 < len(held) / len(whole) < 0.25
    assert calib.endswith("\n\n")  # cut at a story boundary


def test_wikitext2_calibration_standin_warns(data_root, caplog):
    with caplog.at_level("WARNING", logger="magr.pipeline.calibration_data"):
        rows, inside = calibration_documents("wikitext2", data_root=data_root)
    text = "".join(rows)
    assert "wiki.valid.tokens" in caplog.text and not inside
    assert "<unk>" in text and "Homarus gammarus" in text


# --------------------------------------------------------------------------------------------- tokens
def test_eval_tokens_tinystories(stories_tokenizer, data_root):
    toks = get_eval_tokens("tinystories", stories_tokenizer, split="validation", data_root=data_root)
    assert toks.dtype == torch.long and toks.dim() == 1
    assert toks[0].item() == 1 and (toks == 1).sum().item() == 1  # BOS only at the very start
    assert toks.numel() == 393_019
    short = get_eval_tokens("tinystories", stories_tokenizer, split="test", data_root=data_root, max_tokens=100)
    assert torch.equal(short, toks[:100])


def test_eval_tokens_c4_capped(stories_tokenizer, data_root):
    toks = get_eval_tokens("c4", stories_tokenizer, split="validation", data_root=data_root)
    assert toks.numel() == data.C4_EVAL_TOKENS  # the tiny vocabulary makes far more than 256 x 2048 tokens


def test_calibration_shapes_and_determinism(stories_tokenizer, data_root):
    kw = dict(nsamples=8, seqlen=512, data_root=data_root)
    a = get_calibration("tinystories", stories_tokenizer, seed=0, **kw)
    b = get_calibration("tinystories", stories_tokenizer, seed=0, **kw)
    c = get_calibration("tinystories", stories_tokenizer, seed=1, **kw)
    d = get_calibration("tinystories", stories_tokenizer, seed=0, sampler="joined", **kw)
    assert a.shape == (8, 512) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert (a >= 0).all() and (a < 512).all()


def test_c4_joined_calibration_windows_are_full_and_span_documents(stories_tokenizer, data_root):
    # most C4 documents are shorter than 2048 tokens, so the joined sampler's windows cross document boundaries
    with open(data_root / "c4" / "c4-train.slice.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f]
    lengths = [len(ids) for ids in stories_tokenizer.sp_model.encode(docs)]
    assert sum(n >= 2048 for n in lengths) < len(lengths) / 2
    w = get_calibration("c4", stories_tokenizer, nsamples=16, seqlen=2048, seed=0, data_root=data_root,
                        sampler="joined")
    assert w.shape == (16, 2048)
    joined = torch.tensor([1] + stories_tokenizer.sp_model.encode(" ".join(docs)))
    for row in w[:4]:  # every window is a contiguous slice of the joined token stream
        starts = (joined[: joined.numel() - 2047] == row[0]).nonzero().flatten()
        assert any(torch.equal(joined[s:s + 2048], row) for s in starts.tolist())


@pytest.mark.parametrize("source", ["wikitext2", "tinystories"])
def test_calibration_other_sources(stories_tokenizer, data_root, source):
    w = get_calibration(source, stories_tokenizer, nsamples=4, seqlen=256, seed=3, data_root=data_root)
    assert w.shape == (4, 256)


def test_released_sampler_equals_the_released_loaders(stories_tokenizer):
    """On a synthetic dataset of long and short documents, the released sampler gives the windows of a plain
    transcription of the released code's get_c4 / get_wikitext2 loops (module-level random, seeded)."""
    import random

    from magr.pipeline.calibration_data import released_document_windows, released_text_windows

    words = "the cat sat on a mat while one dog ran to the park and back again".split()
    gen = random.Random(7)
    docs = [" ".join(gen.choice(words) for _ in range(gen.choice([5, 30, 400, 900]))) for _ in range(60)]
    nsamples, seqlen, seed = 9, 128, 3

    random.seed(seed)  # get_c4: retry until a document is longer than seqlen, then a window inside it
    expected = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = stories_tokenizer(docs[i])["input_ids"]
            if len(ids) > seqlen:
                break
        j = random.randint(0, len(ids) - seqlen - 1)
        expected.append(ids[j:j + seqlen])
    got = released_document_windows(docs, stories_tokenizer, nsamples, seqlen, seed)
    assert got.tolist() == expected

    stream = torch.as_tensor(stories_tokenizer("\n\n".join(docs))["input_ids"])
    random.seed(seed)  # get_wikitext2: windows of the "\n\n"-joined text
    starts = [random.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    assert released_text_windows(stream, nsamples, seqlen, seed).tolist() == [stream[s:s + seqlen].tolist()
                                                                             for s in starts]
    assert released_document_windows(docs[:3], stories_tokenizer, 2, 10_000, 0) is None  # none long enough


def test_c4_released_sampler_offline(stories_tokenizer, data_root, caplog):
    w = get_calibration("c4", stories_tokenizer, nsamples=6, seqlen=512, seed=0, data_root=data_root)
    docs, inside = calibration_documents("c4", data_root)
    assert inside and w.shape == (6, 512)
    encoded = [torch.as_tensor(stories_tokenizer(d)["input_ids"]) for d in docs]
    for row in w:  # every window lies inside one document
        assert any(any(torch.equal(e[s:s + 512], row) for s in (e[:-512] == row[0]).nonzero().flatten().tolist())
                   for e in encoded if e.numel() > 512)
    with caplog.at_level("WARNING", logger="magr.pipeline.calibration_data"):
        long = get_calibration("c4", stories_tokenizer, nsamples=2, seqlen=100_000, seed=0, data_root=data_root)
    assert long.shape == (2, 100_000) and "falling back" in caplog.text


def test_tinystories_calibration_avoids_heldout(stories_tokenizer, data_root):
    held = eval_text("tinystories", "heldout", data_root=data_root)
    w = get_calibration("tinystories", stories_tokenizer, nsamples=32, seqlen=64, seed=0, data_root=data_root)
    for row in w[:8]:
        assert stories_tokenizer.decode(row[8:56].tolist()) not in held


def test_joined_windows_bounds():
    tokens = torch.arange(100)
    w = joined_windows(tokens, nsamples=200, seqlen=100, seed=5)
    assert (w == tokens).all()  # only one possible window
    w = joined_windows(tokens, nsamples=50, seqlen=10, seed=5)
    assert ((w[:, 1:] - w[:, :-1]) == 1).all()  # contiguous windows
    assert w[:, 0].max() <= 90 and w[:, 0].unique().numel() > 1  # every start fits, and the starts vary


# --------------------------------------------------------------------------------------- local files
def test_local_txt_and_jsonl(stories_tokenizer, tmp_path):
    txt = tmp_path / "story.txt"
    txt.write_text("Once upon a time, there was a cat. " * 50)
    toks = get_eval_tokens(str(txt), stories_tokenizer)
    assert toks[0].item() == 1 and toks.numel() > 300
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"Story {i}. The dog ran fast."}) for i in range(40)))
    assert eval_text(jl).startswith("Story 0. The dog ran fast.\n\nStory 1.")
    w = get_calibration(str(jl), stories_tokenizer, nsamples=3, seqlen=32, seed=0)
    assert w.shape == (3, 32)


# -------------------------------------------------------------------------------------------- errors
def test_unknown_source(stories_tokenizer):
    with pytest.raises(ValueError, match=r"'ptb'.*wikitext2, c4, tinystories"):
        get_eval_tokens("ptb", stories_tokenizer)


def test_missing_local_file(stories_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        get_calibration(str(tmp_path / "absent.txt"), stories_tokenizer, 4, 64, 0)


def test_missing_offline_file(stories_tokenizer, tmp_path):
    (tmp_path / "c4").mkdir()
    with pytest.raises(FileNotFoundError, match="c4-validation.slice.jsonl"):
        get_eval_tokens("c4", stories_tokenizer, data_root=tmp_path)


def test_missing_data_root(stories_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_eval_tokens("c4", stories_tokenizer, data_root=tmp_path / "nowhere")


def test_bad_split(stories_tokenizer, data_root):
    with pytest.raises(ValueError, match=r"'train'.*allowed: test"):
        get_eval_tokens("wikitext2", stories_tokenizer, split="train", data_root=data_root)


def test_text_too_short(stories_tokenizer, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("Once upon a time.")
    with pytest.raises(ValueError, match=r"too short.*seqlen=2048"):
        get_calibration(str(f), stories_tokenizer, nsamples=2, seqlen=2048, seed=0)


def test_bad_jsonl(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*'text'"):
        eval_text(f)


def test_resolve_source(data_root, tmp_path):
    assert data.resolve_source("c4", data_root) == ("c4", data_root)
    f = tmp_path / "x.txt"
    f.write_text("hello")
    assert data.resolve_source(str(f)) == ("file", f)
    with pytest.raises(ValueError, match="nosuchset"):
        data.resolve_source("nosuchset", data_root)
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text("x\n")
    with pytest.raises(FileNotFoundError, match="wiki.valid.tokens"):  # the calibration stand-in is missing
        data.resolve_source("wikitext2", tmp_path)


def test_a_text_is_tokenized_once_per_tokenizer_files(monkeypatch):
    """tokenize_text remembers a text per tokenizer (class, files, vocabulary, BOS / EOS): a tokenizer loaded again
    from the same file does not tokenize it again; one that adds no BOS does; the caller's copy is its own."""
    from magr.pipeline.sources import stories260k_path
    from magr.pipeline.tokenizer import SentencePieceTokenizer

    monkeypatch.setattr(data, "_TOKENIZED", type(data._TOKENIZED)())
    calls = []
    encode = SentencePieceTokenizer._tokenize
    monkeypatch.setattr(SentencePieceTokenizer, "_tokenize", lambda self, t, **k: calls.append(t) or encode(self, t))
    text = "Once upon a time there was a little dog. " * 20
    path = stories260k_path() / "tokenizer.model"

    first = data.tokenize_text(text, SentencePieceTokenizer(path))
    first[0] = -1  # the caller's copy
    again = data.tokenize_text(text, SentencePieceTokenizer(path))
    assert len(calls) == 1 and again[0] != -1 and torch.equal(again[1:], first[1:])
    no_bos = data.tokenize_text(text, SentencePieceTokenizer(path, add_bos_token=False))
    assert len(calls) == 2 and torch.equal(no_bos, again[1:]) and len(data._TOKENIZED) == 2
