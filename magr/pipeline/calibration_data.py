"""Calibration windows: ``nsamples`` random windows of ``seqlen`` tokens of a source's train split.

Two samplers (the ``sampler`` setting of :class:`Calibration`):

- ``"released"``, the released MagR code's loaders (datautils.py, Python ``random`` seeded with ``seed``):
  C4: draw a random training document, retry until its tokenisation is longer than seqlen, then a random
  window inside it (``random.randint(0, len - seqlen - 1)``); WikiText-2: random windows
  (``random.randint(0, n - seqlen - 1)``) of the tokenised ``"\\n\\n"``-joined train rows; other sources
  (TinyStories, local files, which the released code has no loader for) the same on their whole text.
  With the hub datasets this gives the released code's windows for the same seed. Offline, the C4 slice
  holds few long documents (shared/data/MANIFEST.md); when none is longer than seqlen the sampler falls
  back to ``"joined"`` and says so.
- ``"joined"``: the documents joined with " " (GPTQ's WikiText-2 train join) into one token stream and
  windows at starts drawn with a seeded torch generator, so short documents still give full windows.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

import torch

from .data import (HUB_C4, HUB_C4_FILES, HUB_WIKITEXT, TINYSTORIES_CALIB_FRACTION, check_source, local_text,
                   offline_file, read_jsonl_texts, resolve_root, tinystories_cut, tinystories_text,
                   wikitext_rows, resolve_source, tokenize_text)
from ..core.settings import check_choice, setting

log = logging.getLogger(__name__)

SAMPLERS = ("released", "joined")


def calibration_documents(source: str, data_root=None) -> tuple[list[str], bool]:
    """(documents, rows or one text of the train split or its offline stand-in; whether the released sampler
    draws windows inside single documents - C4 - rather than in the joined text)."""
    name, path = check_source(source)
    if name == "file":
        return [local_text(path)], False
    root = resolve_root(data_root)
    if name == "wikitext2":
        if root is not None:
            f = offline_file(root, name, "train")
            log.warning("wikitext2 calibration: raw train split is not available offline; using %s "
                        "(tokenized validation text with <unk>) as a stand-in", f)
            rows = wikitext_rows(f)
        else:
            from datasets import load_dataset

            rows = load_dataset(*HUB_WIKITEXT, split="train")["text"]
        return list(rows), False
    if name == "c4":
        if root is not None:
            f = offline_file(root, name, "train")
            docs = read_jsonl_texts(f)
            log.info("c4 calibration: using the offline train slice %s (%d documents)", f, len(docs))
        else:
            from datasets import load_dataset

            docs = load_dataset(HUB_C4, data_files={"train": HUB_C4_FILES["train"]}, split="train")["text"]
        return list(docs), True
    text = tinystories_text(root)
    log.warning("tinystories calibration: only the validation split exists offline; drawing windows from its "
                "first %.0f%% (evaluate on split='heldout' for text calibration has not seen)",
                100 * TINYSTORIES_CALIB_FRACTION)
    return [text[:tinystories_cut(text)]], False


def _check_sizes(nsamples: int, seqlen: int, n: int) -> None:
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    if n < seqlen:
        raise ValueError(f"text too short for calibration: {n} tokens, need at least seqlen={seqlen}")


def joined_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) windows tokens[s : s + seqlen], starts uniform in [0, n - seqlen] (torch generator)."""
    tokens = tokens.flatten()
    _check_sizes(nsamples, seqlen, tokens.numel())
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def released_text_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The released WikiText-2 sampler: random.seed(seed); start = random.randint(0, n - seqlen - 1) per window."""
    tokens = tokens.flatten()
    _check_sizes(nsamples, seqlen, tokens.numel() - 1)
    rng = random.Random(seed)
    starts = [rng.randint(0, tokens.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([tokens[s:s + seqlen] for s in starts])


def released_document_windows(docs, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor | None:
    """The released C4 sampler: random.seed(seed); per window draw documents (random.randint over all) until
    one is longer than seqlen tokens, then start = random.randint(0, len - seqlen - 1) inside it.

    Returns None when no document is longer than seqlen (checked up front for up to 10,000 documents).
    """
    _check_sizes(nsamples, seqlen, seqlen)
    encoded: dict[int, torch.Tensor] = {}

    def tokens(i: int) -> torch.Tensor:
        if i not in encoded:
            encoded[i] = tokenize_text(docs[i], tokenizer)
        return encoded[i]

    if len(docs) <= 10_000 and not any(tokens(i).numel() > seqlen for i in range(len(docs))):
        return None
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            ids = tokens(rng.randint(0, len(docs) - 1))
            if ids.numel() > seqlen:
                break
        s = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[s:s + seqlen])
    return torch.stack(windows)


def with_bos(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """The windows with their first token replaced by ``bos_id``: BOS + seqlen - 1 tokens of text each (the
    window protocol of families trained with BOS at every sequence start, :mod:`magr.pipeline.families`)."""
    out = windows.clone()
    out[:, 0] = bos_id
    return out


def get_calibration(source: str, tokenizer, nsamples: int, seqlen: int, seed: int, data_root=None,
                    sampler: str = "released", bos: bool = False) -> torch.Tensor:
    """(nsamples, seqlen) LongTensor of calibration windows of ``source``, deterministic in ``seed``; with ``bos``
    each window starts with the tokenizer's BOS (:func:`with_bos`; the sampler draws the same windows)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is None:
        raise ValueError("calib_bos=True but the tokenizer has no BOS token; allowed: calib_bos False")
    check_choice("sampler", sampler, SAMPLERS)
    docs, inside_documents = calibration_documents(source, data_root)
    windows = None
    if sampler == "released" and inside_documents:
        windows = released_document_windows(docs, tokenizer, nsamples, seqlen, seed)
        if windows is None:
            log.warning("%s calibration: no document is longer than %d tokens, so the released sampler cannot "
                        "draw a window inside one; falling back to the joined sampler", source, seqlen)
            sampler = "joined"
    if windows is None:
        if sampler == "released":  # the released WikiText-2 loader: "\n\n"-joined rows, Python random
            windows = released_text_windows(tokenize_text("\n\n".join(docs), tokenizer), nsamples, seqlen, seed)
        else:  # GPTQ's " "-joined train text, torch generator
            windows = joined_windows(tokenize_text(" ".join(docs), tokenizer), nsamples, seqlen, seed)
    log.info("%s calibration: %d windows of %d tokens (%s sampler, seed %d%s)", source, nsamples, seqlen, sampler, seed,
             ", BOS first" if bos else "")
    return with_bos(windows, bos_id) if bos else windows


@dataclass(frozen=True)
class Calibration:
    """Calibration data: ``nsamples`` random windows of ``seqlen`` tokens of the train split of ``calib``
    (paper: 128 x 2048 tokens of C4, seed 0, the released code's sampler)."""

    calib: str = setting("c4", "calibration source: c4, wikitext2, tinystories or a .txt/.jsonl file")
    nsamples: int = setting(128, "calibration windows")
    seqlen: int = setting(2048, "calibration window length (tokens)")
    seed: int = setting(0, "calibration sampling seed")
    sampler: str = setting("released", "calibration sampler: released (the released code's loaders) or joined "
                                       "(windows of the joined documents)", choices=SAMPLERS)
    calib_bos: bool | None = setting(None, "start every calibration window with BOS (default: the model family's "
                                           "protocol, magr.pipeline.families: Gemma yes, Llama no)", type=bool)

    def __post_init__(self):
        if self.nsamples <= 0 or self.seqlen <= 0:
            raise ValueError(f"nsamples={self.nsamples} and seqlen={self.seqlen} must be positive")
        check_choice("sampler", self.sampler, SAMPLERS)

    def check(self, data_root=None) -> None:
        """Fail before any long work if the source or its offline files are missing."""
        resolve_source(self.calib, data_root)

    def for_protocol(self, protocol) -> Calibration:
        """A copy with ``calib_bos`` from the model family's :class:`magr.pipeline.families.WindowProtocol` unless
        set explicitly."""
        return self if self.calib_bos is not None else replace(self, calib_bos=protocol.calib_bos)

    def for_model(self, model) -> Calibration:
        """:meth:`for_protocol` with the protocol of ``model`` (loaded model, config, alias, folder or .gguf)."""
        from .families import window_protocol

        return self if self.calib_bos is not None else self.for_protocol(window_protocol(model))

    def tokens(self, tokenizer, data_root=None) -> torch.Tensor:
        """The (nsamples, seqlen) calibration windows (:func:`get_calibration`); ``calib_bos`` None counts as
        False (resolve it first with :meth:`for_model`)."""
        return get_calibration(self.calib, tokenizer, self.nsamples, self.seqlen, self.seed, data_root, self.sampler,
                               bool(self.calib_bos))
