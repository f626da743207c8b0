"""Tokenizers: a transformers tokenizer that encodes exactly as sentencepiece (stories260K and other llama2.c
models), and the tokenizer that goes with each model source :func:`magr.pipeline.models.load_model` understands.

transformers' own Llama tokenizers encode stories260K's sentencepiece model wrongly (shared/data/MANIFEST.md),
hence :class:`SentencePieceTokenizer`.
"""
from __future__ import annotations

import os
from pathlib import Path


def _python_tokenizer_base():
    from transformers import PreTrainedTokenizer

    return PreTrainedTokenizer


class SentencePieceTokenizer(_python_tokenizer_base()):
    """A ``transformers`` tokenizer that encodes exactly as ``sentencepiece.SentencePieceProcessor``.

    ids = [bos] + sp.encode(text) when ``add_bos_token`` (the default) and ``add_special_tokens``;
    decode = sp.decode(ids without special tokens). Special tokens (<unk>=0, <s>=1, </s>=2 for llama2.c
    models) are taken from the sentencepiece model; the pad token is <unk> when the model has none. Works with ``tok(...)``, ``tok.encode``,
    ``tok.decode``, batching/padding and lm-eval's HFLM.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | os.PathLike, add_bos_token: bool = True, add_eos_token: bool = False,
                 **kwargs):
        import sentencepiece as spm

        vocab_file = str(vocab_file)
        if not Path(vocab_file).is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {vocab_file}")
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        sp = self.sp_model

        def piece(i):
            return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

        kwargs.setdefault("unk_token", piece(sp.unk_id()))
        kwargs.setdefault("bos_token", piece(sp.bos_id()))
        kwargs.setdefault("eos_token", piece(sp.eos_id()))
        # llama2.c models have no pad piece: pad with <unk> (as lm-eval does), masked out by attention_mask
        kwargs.setdefault("pad_token", piece(sp.pad_id()) if sp.pad_id() >= 0 else piece(sp.unk_id()))
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("split_special_tokens", False)
        super().__init__(add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)

    # -- vocabulary
    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.sp_model.get_piece_size())}
        vocab.update(self._added_tokens_encoder)
        return vocab

    # -- text <-> pieces <-> ids
    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Pieces of ``text``; the generic special-token splitting only when a special token's text occurs."""
        split_special = kwargs.get("split_special_tokens", self.split_special_tokens)
        if not split_special and any(t in text for t in self._added_tokens_encoder):
            return super().tokenize(text, **kwargs)
        return self._tokenize(text)

    def convert_tokens_to_ids(self, tokens):
        """Vectorised piece -> id lookup (sentencepiece takes a list), added tokens first."""
        if tokens is None or isinstance(tokens, str):
            return super().convert_tokens_to_ids(tokens)
        tokens = list(tokens)
        added = self._added_tokens_encoder
        return [added.get(t, i) for t, i in zip(tokens, self.sp_model.piece_to_id(tokens))]

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Decode pieces with sentencepiece; special tokens pass through as their text."""
        out, run = [], []
        specials = set(self.all_special_tokens)
        for tok in tokens:
            if tok in specials:
                if run:
                    out.append(self.sp_model.decode_pieces(run))
                    run = []
                out.append(tok)
            else:
                run.append(tok)
        if run:
            out.append(self.sp_model.decode_pieces(run))
        return "".join(out)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            specials = set(self.all_special_ids)
            return [int(t in specials) for t in token_ids_0]
        nb, ne = int(self.add_bos_token), int(self.add_eos_token)
        mask = [1] * nb + [0] * len(token_ids_0) + [1] * ne
        if token_ids_1 is not None:
            mask += [1] * nb + [0] * len(token_ids_1) + [1] * ne
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        out = Path(save_directory) / name
        out.write_bytes(self.sp_model.serialized_model_proto())
        return (str(out),)


def _sentencepiece_folder_tokenizer(folder: Path) -> SentencePieceTokenizer | None:
    """Our wrapper for a folder with a bare sentencepiece ``tokenizer.model`` (no transformers tokenizer
    files) or one saved by :class:`SentencePieceTokenizer` itself; None for any other folder."""
    import json

    model_file, config_file = folder / "tokenizer.model", folder / "tokenizer_config.json"
    if not model_file.is_file():
        return None
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("tokenizer_class") != SentencePieceTokenizer.__name__:
            return None
        return SentencePieceTokenizer(model_file, add_bos_token=config.get("add_bos_token", True),
                                      add_eos_token=config.get("add_eos_token", False))
    if (folder / "tokenizer.json").is_file():
        return None
    return SentencePieceTokenizer(model_file)


def _gguf_alias_tokenizer(alias: str, gguf: Path):
    """The tokenizer of a GGUF alias, converted from the GGUF once and kept in the cache folder
    (``$MAGR_CACHE_DIR/tokenizers/<alias>-<size>-<mtime>``: Gemma-3's 262k-token vocabulary takes about 20 s to
    convert, its saved copy well under a second to load; the pipeline's saved models load such a copy too)."""
    import os
    import shutil

    from transformers import AutoTokenizer

    from ..core.cbuild import cache_dir

    stat = gguf.stat()
    folder = cache_dir() / "tokenizers" / f"{alias}-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    try:
        tokenizer.save_pretrained(str(partial))
        partial.rename(folder)
    except OSError:  # no writable cache, or another process was first: the converted tokenizer serves as it is
        pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return tokenizer


def load_tokenizer(name_or_path: str):
    """The tokenizer :func:`magr.pipeline.models.load_model` returns for ``name_or_path`` (alias, GGUF, folder or hub id)."""
    from transformers import AutoTokenizer

    from .sources import GGUF_ALIASES, stories260k_path

    key = str(name_or_path).lower()
    if key in GGUF_ALIASES:
        return _gguf_alias_tokenizer(key, GGUF_ALIASES[key]())
    if key == "stories260k":
        return SentencePieceTokenizer(stories260k_path() / "tokenizer.model")
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_dir() and (tok := _sentencepiece_folder_tokenizer(path)) is not None:
        return tok
    return AutoTokenizer.from_pretrained(str(name_or_path))
