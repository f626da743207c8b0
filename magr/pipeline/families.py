"""Model families and their window protocol: whether every evaluation and calibration window starts with BOS.

The one place this is decided. :data:`FAMILIES` maps a model's ``model_type`` (its config's, or a GGUF file's
``general.architecture``) to a family; :func:`window_protocol` returns the family's :class:`WindowProtocol`,
which :mod:`magr.runs` applies to a run's :class:`~magr.evaluation.perplexity.Evaluation` and
:class:`~magr.pipeline.calibration_data.Calibration` (unless set explicitly) and records in ``magr_run.json``.

- ``llama`` (Llama, Mistral, Qwen2/3, OLMo: SmolLM2-135M, stories260K, LLaMA-2): the GPTQ / MagR protocol. The
  text is tokenized once and cut into windows as it is, so only the stream's first window holds the tokenizer's
  BOS; calibration windows are drawn from the text as they are.
- ``gemma`` (Gemma, Gemma 2, Gemma 3): trained with BOS at the start of every sequence, and far off its
  distribution without one (Gemma-3-270M, float, WikiText-2 over 4 x 256 tokens: perplexity 89.5 without, 28.2
  with a BOS per window; issue 22). Every window is BOS followed by seqlen - 1 tokens of text, in evaluation
  (:func:`magr.evaluation.perplexity.make_windows`) and in calibration
  (:func:`magr.pipeline.calibration_data.get_calibration`), so that the statistics come from the inputs the
  model is evaluated on.

Any other model type keeps the Llama protocol (today's behaviour for every model), with a log line.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowProtocol:
    """How a family's windows start: ``eval_bos`` every perplexity window with BOS, ``calib_bos`` every
    calibration window with BOS (its first token replaced by BOS: BOS + seqlen - 1 tokens of text)."""

    family: str
    eval_bos: bool
    calib_bos: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Family:
    """A model family: the ``model_type`` names it covers and its window protocol."""

    name: str
    model_types: tuple[str, ...]
    eval_bos: bool
    calib_bos: bool
    reason: str

    @property
    def protocol(self) -> WindowProtocol:
        return WindowProtocol(self.name, self.eval_bos, self.calib_bos, self.reason)


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "olmo"), eval_bos=False, calib_bos=False,
           reason="GPTQ / MagR protocol: windows cut from the tokenized text as it is (BOS only where the text "
                  "starts)"),
    Family("gemma", ("gemma", "gemma2", "gemma3", "gemma3_text"), eval_bos=True, calib_bos=True,
           reason="trained with BOS at the start of every sequence; without one every window but the first is off "
                  "the model's distribution (reports/gemma3_270m_float_ppl.md)"),
)
OTHER = Family("other", (), eval_bos=False, calib_bos=False,
               reason="model type without a family entry: the Llama protocol (windows as they are)")


def family_of(model_type: str | None) -> Family:
    """The family whose ``model_types`` hold ``model_type`` (:data:`OTHER` for an unknown or missing one)."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    log.info("model type %r has no family entry in magr.pipeline.families: windows as they are (no BOS per "
             "window)", model_type)
    return OTHER


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _skip_gguf_value(f, kind: int) -> None:
    if kind in _GGUF_SCALARS:
        f.seek(_GGUF_SCALARS[kind], 1)
    elif kind == _GGUF_STRING:
        f.seek(struct.unpack("<Q", f.read(8))[0], 1)
    elif kind == _GGUF_ARRAY:
        item, count = struct.unpack("<IQ", f.read(12))
        if item in _GGUF_SCALARS:
            f.seek(count * _GGUF_SCALARS[item], 1)
        else:
            for _ in range(count):
                _skip_gguf_value(f, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def gguf_architecture(path) -> str | None:
    """``general.architecture`` of a GGUF file (v2/v3), read from the key-value pairs of its header up to that key
    (usually the first: the gguf package's reader parses the whole header, a 262k-token vocabulary included)."""
    with open(path, "rb") as f:
        magic, raw = f.read(4), f.read(4)
        version = struct.unpack("<I", raw)[0] if len(raw) == 4 else None
        if magic != b"GGUF" or version is None or version < 2:
            raise ValueError(f"{path} is not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
        _, n_kv = struct.unpack("<QQ", f.read(16))  # tensor count, key-value count
        for _ in range(n_kv):
            key = f.read(struct.unpack("<Q", f.read(8))[0]).decode()
            kind = struct.unpack("<I", f.read(4))[0]
            if key == "general.architecture" and kind == _GGUF_STRING:
                return f.read(struct.unpack("<Q", f.read(8))[0]).decode()
            _skip_gguf_value(f, kind)
    return None


def model_type(model) -> str | None:
    """The ``model_type`` of a loaded model, a config, or a model alias / folder / .gguf / hub id (read from its
    config.json or GGUF header, without loading weights)."""
    config = getattr(model, "config", model)
    if hasattr(config, "model_type"):
        return config.model_type
    from .models import load_config, model_source

    kind, where = model_source(model)
    if kind == "gguf":
        return gguf_architecture(where)
    return load_config(model).model_type


def window_protocol(model) -> WindowProtocol:
    """The window protocol of ``model`` (loaded model, config, alias, folder, .gguf or hub id)."""
    return family_of(model_type(model)).protocol
