"""Exported checkpoints read back by the third-party loaders (the round trip of :mod:`magr.deploy.export`).

:func:`load_exported` loads a folder with ``AutoModelForCausalLM.from_pretrained`` (transformers + optimum +
gptqmodel for GPTQ; transformers + compressed-tensors for ``pack-quantized``, de-quantized on load, the route
that takes asymmetric grids). :func:`reloaded_grids` returns, per linear layer, the codes (out, in), zero
points and scales (out, G) and g_idx as those libraries unpack them - gptqmodel's unpacking of each loaded
module (zero points after its v1 -> v2 conversion), compressed-tensors' ``unpack_from_int32`` of the stored
tensors - so they can be compared with the exporter's :class:`magr.deploy.export.LayerCodes`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .export import EXPORT_FILE


def export_info(folder) -> dict:
    """The ``magr_export.json`` of an exported folder."""
    return json.loads((Path(folder) / EXPORT_FILE).read_text())


def load_exported(folder, dtype: torch.dtype = torch.float16, gptq_backend: str | None = None):
    """The model in ``folder`` through transformers; ``gptq_backend`` picks gptqmodel's kernel (e.g. "torch";
    default: gptqmodel's choice), run eagerly. compressed-tensors checkpoints are de-quantized while loading."""
    from transformers import AutoModelForCausalLM

    from ..pipeline.models import allow_unused_imports

    allow_unused_imports()  # the loaders may use every package they find
    info = export_info(folder)
    fmt = info["format"]
    kw = {}
    if fmt == "gptq" and gptq_backend is not None:
        from transformers import GPTQConfig

        kw["quantization_config"] = GPTQConfig(bits=info["grid"]["bits"], backend=gptq_backend)
    elif fmt == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map="cpu", **kw)
    for module in model.modules():
        # gptqmodel's torch kernel wraps each module's de-quantization in torch.compile, keyed on data
        # pointers: on a model of 200 layers it recompiles per layer until torch's recompile limit (minutes
        # per forward on the CPU); the eager method computes the same weights
        if "dequantize_weight" in vars(module):
            del module.dequantize_weight
    return model.eval()


def _gptq_module_grid(module) -> dict[str, torch.Tensor]:
    """gptqmodel's own unpacking of one loaded module (its dequantize path, stopped before the multiply)."""
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    got = {}
    module._dequantize_from_codes = lambda weight, zeros, num_itr=1: got.update(codes=weight, zeros=zeros)
    try:
        PackableQuantLinear.dequantize_weight(module)
    finally:
        del module._dequantize_from_codes
    n = module.in_features
    return {"codes": got["codes"][:n].T.long(), "zero": got["zeros"].T.long(),
            "scale": module.scales.T.float(), "g_idx": module.g_idx.long()}


def reloaded_grids(folder, model=None) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: codes, zero, scale, g_idx as the format's library unpacks them (module docstring).

    GPTQ needs the ``model`` loaded by :func:`load_exported`; compressed-tensors reads the folder.
    """
    info = export_info(folder)
    bits = info["grid"]["bits"]
    if info["format"] == "gptq":
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear

        return {name: _gptq_module_grid(m) for name, m in model.named_modules() if isinstance(m, BaseQuantLinear)}
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from ..pipeline.shards import TensorFiles

    files = TensorFiles.of_folder(folder)  # one model.safetensors, or one shard per block (a streamed export)
    tensors = files.read(files.names())
    offset = 2 ** (bits - 1)
    out = {}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key[: -len(".weight_packed")]
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        scale = tensors[f"{name}.weight_scale"]
        codes = unpack_from_int32(tensors[key], bits, shape).long() + offset
        if f"{name}.weight_zero_point" in tensors:
            zero = unpack_from_int32(tensors[f"{name}.weight_zero_point"], bits, scale.shape, packed_dim=0).long()
            zero = zero + offset
        else:
            zero = torch.full(scale.shape, offset, dtype=torch.long)
        g = shape[1] // scale.shape[1]
        out[name] = {"codes": codes, "zero": zero, "scale": scale.float(), "g_idx": torch.arange(shape[1]) // g}
    return out


def loaded_weights(model) -> dict[str, torch.Tensor]:
    """The (out x in) weight each quantized linear layer of a reloaded model computes with."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "qweight"):
            out[name] = m.dequantize_weight().T.float()
        elif isinstance(m, torch.nn.Linear) and ".layers." in name:
            out[name] = m.weight.data.float()
    return out


def compare_grids(ours: dict, reloaded: dict, weights: dict | None = None) -> dict:
    """Whether the reloaded codes, zeros and g_idx equal ours exactly, the largest relative scale difference
    (ours vs stored), and, given the reloaded model's ``weights`` (:func:`loaded_weights`), the largest
    difference from fp16(scale) * (q - zero) relative to the scale."""
    if set(ours) != set(reloaded):
        raise ValueError(f"layers differ: {sorted(set(ours) ^ set(reloaded))[:3]}")
    same = {"codes": True, "zero": True, "g_idx": True}
    scale_fp16_equal, scale_rel = True, 0.0
    for name, lc in ours.items():
        r = reloaded[name]
        same["codes"] &= torch.equal(lc.codes, r["codes"])
        same["zero"] &= torch.equal(lc.zero, r["zero"])
        same["g_idx"] &= torch.equal(lc.g_idx, r["g_idx"])
        scale_fp16_equal &= torch.equal(lc.scale.half().float(), r["scale"])
        scale_rel = max(scale_rel, float(((r["scale"] - lc.scale).abs() / lc.scale).max()))
    result = {**same, "scale_equals_fp16_of_ours": scale_fp16_equal, "scale_max_rel_diff": scale_rel}
    if weights is not None:
        gap = 0.0
        for name, lc in ours.items():
            s16 = lc.scale.half().float()[:, lc.g_idx]
            expected = s16 * (lc.codes - lc.zero[:, lc.g_idx])
            gap = max(gap, float(((weights[name] - expected).abs() / s16).max()))
        result["weight_max_diff_in_steps"] = gap
    return result
