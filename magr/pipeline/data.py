"""Evaluation token streams and calibration windows: WikiText-2, C4, TinyStories or a local text file.

Offline first: the copies in ``shared_root()/data`` (see shared/data/MANIFEST.md) are used whenever a data
root is available; otherwise the hub datasets are loaded with ``datasets`` (needs network access).

Published protocol (GPTQ / MagR code):

- evaluation: tokenize the whole text once (the tokenizer's own BOS, if it adds one, sits at the very start
  only), then cut non-overlapping windows (:func:`magr.evaluation.perplexity.perplexity`).
  WikiText-2 = ``"\\n\\n".join(rows of the test split)``; C4 = ``" ".join(first 1100 validation documents)``,
  first 256 x 2048 tokens; TinyStories = the validation stories.
- calibration: ``nsamples`` random windows of ``seqlen`` tokens of the train split, seeded
  (:mod:`magr.pipeline.calibration_data`).

Offline stand-ins (logged): WikiText-2 raw *train* is not available, so calibration uses wiki.valid.tokens;
the C4 slices hold 1025 validation / 1041 train documents; TinyStories has only validation.txt, so its
calibration windows come from the first :data:`TINYSTORIES_CALIB_FRACTION` of the text and ``split="heldout"``
evaluates the remaining part only.
"""
from __future__ import annotations

import io
import json
import logging
from collections import OrderedDict
from pathlib import Path

import torch


log = logging.getLogger(__name__)

SOURCES = ("wikitext2", "c4", "tinystories")
LOCAL_SUFFIXES = (".txt", ".jsonl")
C4_EVAL_DOCS = 1100
C4_EVAL_TOKENS = 256 * 2048
TINYSTORIES_CALIB_FRACTION = 0.8

# offline files, relative to the data root
OFFLINE = {
    ("wikitext2", "test"): "wikitext2/wiki.test.raw",
    ("wikitext2", "train"): "wikitext2/wiki.valid.tokens",  # stand-in: raw train is not available offline
    ("c4", "validation"): "c4/c4-validation.slice.jsonl",
    ("c4", "train"): "c4/c4-train.slice.jsonl",
    ("tinystories", "validation"): "tinystories/validation.txt",
}
# hub datasets (network only)
HUB_WIKITEXT = ("wikitext", "wikitext-2-raw-v1")
HUB_C4 = "allenai/c4"
HUB_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
HUB_TINYSTORIES = "roneneldan/TinyStories"

EVAL_SPLITS = {
    "wikitext2": ("test",),
    "c4": ("validation",),
    "tinystories": ("validation", "heldout"),
}


# ------------------------------------------------------------------------------------------- helpers
def default_data_root() -> Path | None:
    """``shared_root()/data`` when it exists, else None (hub datasets)."""
    from .sources import shared_root

    try:
        root = shared_root() / "data"
    except FileNotFoundError:
        return None
    return root if root.is_dir() else None


def resolve_root(data_root) -> Path | None:
    if data_root is None:
        return default_data_root()
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_root {str(root)!r} is not a folder")
    return root


def offline_file(root: Path, source: str, split: str) -> Path:
    path = root / OFFLINE[(source, split)]
    if not path.is_file():
        raise FileNotFoundError(f"offline {source} {split} file not found: {path}")
    return path


#: the encoding of every text file read (local .txt / .jsonl files and the offline copies)
ENCODING = "utf-8"


def decode_error(path: Path, exc: UnicodeDecodeError) -> ValueError:
    """A ValueError naming the file, the byte offset and line of the first byte that is not UTF-8, and the fix.

    ``exc`` may come from a streamed read (its offsets relative to a chunk): the file is decoded again whole
    to find the offset in the file."""
    data = Path(path).read_bytes()
    try:
        data.decode(ENCODING)
        start = exc.start
    except UnicodeDecodeError as whole:
        start = whole.start
    line = data.count(b"\n", 0, start) + 1
    return ValueError(f"{path} is not {ENCODING.upper()} text: byte 0x{data[start]:02x} at byte offset {start} "
                      f"(line {line}) cannot be decoded; accepted encoding: UTF-8 (ASCII is UTF-8); convert the file, "
                      f"e.g. `iconv -f latin1 -t utf-8 {path} > converted{Path(path).suffix}`")


def read_text(path: Path, newline: str | None = None) -> str:
    """The whole text of ``path`` decoded as UTF-8 (:func:`decode_error` if it is not); ``newline`` as open()'s."""
    try:
        with open(path, encoding=ENCODING, newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise decode_error(path, exc) from None


def read_jsonl_texts(path: Path, limit: int | None = None) -> list[str]:
    try:
        return _jsonl_texts(path, limit)
    except UnicodeDecodeError as exc:
        raise decode_error(path, exc) from None


def _jsonl_texts(path: Path, limit: int | None) -> list[str]:
    texts = []
    with open(path, encoding=ENCODING) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from None
            if limit is not None and len(texts) >= limit:
                break
    return texts


def wikitext_rows(path: Path) -> list[str]:
    """Rows of the hub split from the offline file: one row per line, CRLF turned into the row's final LF.

    (The hub rows end with "\\n"; the hub's 1467 empty rows are missing here, see MANIFEST.)
    """
    with io.StringIO(read_text(path, newline=""), newline="") as f:
        return [line.rstrip("\r\n") + "\n" for line in f]


def check_source(source: str) -> tuple[str, Path | None]:
    """Normalise a source: (name, None) for a known dataset, ("file", path) for a local file."""
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a string or path, got {type(source).__name__}")
    key = str(source).lower()
    if key in SOURCES:
        return key, None
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        return "file", path
    raise ValueError(f"unknown data source {str(source)!r}; allowed: {', '.join(SOURCES)} "
                     f"or a path to a local {' / '.join(LOCAL_SUFFIXES)} file")


def resolve_source(source: str, data_root=None) -> tuple[str, Path | None]:
    """Check a source before any long work; returns ("file", path) for a local file, else (name, data root).

    Raises ValueError for an unknown name, FileNotFoundError for a missing local file, data root or offline
    file of the source (root None means the hub datasets will be used).
    """
    name, path = check_source(source)
    if name == "file":
        return name, path
    root = resolve_root(data_root)
    if root is not None:
        for src, split in OFFLINE:
            if src == name:
                offline_file(root, src, split)
    return name, root


def local_text(path: Path) -> str:
    """A .txt file's whole text, or a .jsonl file's "text" fields joined by blank lines."""
    if path.suffix == ".jsonl":
        return "\n\n".join(read_jsonl_texts(path))
    return read_text(path)


# ---------------------------------------------------------------------------------------------- text
def eval_text(source: str, split: str = "test", data_root=None) -> str:
    """The evaluation text of ``source`` (before tokenization); see the module docstring.

    ``split`` is ``test`` for WikiText-2, ``validation`` for C4 (``test`` is taken as validation, C4 has
    no test split), ``validation``/``test`` (the whole file) or ``heldout`` (the part that calibration
    does not see) for TinyStories; ignored for a local file.
    """
    name, path = check_source(source)
    if name == "file":
        return local_text(path)
    if split == "test" and name in ("c4", "tinystories"):
        split = "validation"
    if split not in EVAL_SPLITS[name]:
        raise ValueError(f"unknown split {split!r} for {name}; allowed: {', '.join(EVAL_SPLITS[name])}")
    root = resolve_root(data_root)
    if name == "wikitext2":
        if root is not None:
            f = offline_file(root, name, "test")
            log.info("wikitext2 test: using the offline copy %s (non-empty rows only, see MANIFEST)", f)
            rows = wikitext_rows(f)
        else:
            from datasets import load_dataset

            rows = load_dataset(*HUB_WIKITEXT, split="test")["text"]
        return "\n\n".join(rows)
    if name == "c4":
        if root is not None:
            f = offline_file(root, name, "validation")
            docs = read_jsonl_texts(f, limit=C4_EVAL_DOCS)
            log.info("c4 validation: using the offline copy %s (%d documents; the protocol takes the first %d)",
                     f, len(docs), C4_EVAL_DOCS)
        else:
            from datasets import load_dataset

            ds = load_dataset(HUB_C4, data_files={"validation": HUB_C4_FILES["validation"]}, split="validation")
            docs = ds[:C4_EVAL_DOCS]["text"]
        return " ".join(docs)
    # tinystories
    text = tinystories_text(root)
    if split == "heldout":
        return text[tinystories_cut(text):]
    return text


def tinystories_text(root: Path | None) -> str:
    if root is not None:
        f = offline_file(root, "tinystories", "validation")
        log.info("tinystories: using the offline copy %s (validation split)", f)
        return read_text(f)
    from datasets import load_dataset

    return "\n\n".join(load_dataset(HUB_TINYSTORIES, split="validation")["text"])


def tinystories_cut(text: str) -> int:
    """Character offset splitting TinyStories into calibration (before) and held-out (after) stories."""
    cut = int(len(text) * TINYSTORIES_CALIB_FRACTION)
    boundary = text.find("\n\n", cut)
    return len(text) if boundary < 0 else boundary + 2


# -------------------------------------------------------------------------------------------- tokens
_TOKENIZED: OrderedDict = OrderedDict()  # (tokenizer class, files, vocabulary, BOS / EOS, text length, hash) -> tokens
TOKENIZED_KEEP = 4                        # texts remembered per process


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """1-D LongTensor of the whole text, tokenized with the tokenizer's default special tokens. The last
    :data:`TOKENIZED_KEEP` texts are remembered per tokenizer (its class, the files it was loaded from, its
    vocabulary size and whether it adds BOS / EOS), so the seeds and cells of one process that draw windows from
    one text tokenize it once (each seed's run loads the tokenizer again). Returns a copy the caller may change."""
    source = getattr(tokenizer, "name_or_path", None) or getattr(tokenizer, "vocab_file", None)
    key = (type(tokenizer).__qualname__, str(source), len(tokenizer), getattr(tokenizer, "add_bos_token", None),
           getattr(tokenizer, "add_eos_token", None), len(text), hash(text)) if source else None
    if key in _TOKENIZED:
        _TOKENIZED.move_to_end(key)
        return _TOKENIZED[key].clone()
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    tokens = torch.as_tensor(ids, dtype=torch.long).flatten()
    if key is not None:
        _TOKENIZED[key] = tokens.clone()
        while len(_TOKENIZED) > TOKENIZED_KEEP:
            _TOKENIZED.popitem(last=False)
    return tokens


def get_eval_tokens(source: str, tokenizer, split: str = "test", data_root=None,
                    max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of the evaluation text of ``source`` (see :func:`eval_text`), cut to ``max_tokens``.

    C4 keeps the first ``max_tokens`` (default 256 x 2048, the protocol) tokens; other sources keep all
    unless ``max_tokens`` is given.
    """
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    name, _ = check_source(source)
    tokens = tokenize_text(eval_text(source, split, data_root), tokenizer)
    if max_tokens is None and name == "c4":
        max_tokens = C4_EVAL_TOKENS
    if max_tokens is not None:
        if tokens.numel() < max_tokens and name == "c4":
            log.info("c4: %d tokens available, fewer than the protocol's %d", tokens.numel(), max_tokens)
        tokens = tokens[:max_tokens]
    log.info("%s %s: %d evaluation tokens", source, split, tokens.numel())
    return tokens
