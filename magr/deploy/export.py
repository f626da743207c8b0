"""Deployable low-bit checkpoints: a quantized run packed into the GPTQ or compressed-tensors format.

The run folder holds de-quantized weights w and grids (scale, zero, g_idx) per linear layer
(:mod:`magr.pipeline.persistence`). The integer codes are recovered exactly and checked, before anything is written:

    q = round(w / scale) + zero,   q in [0, 2^b - 1],   |scale * (q - zero) - w| <= tol

(tol: half an ulp of the stored dtype at |w| plus 1e-5 * scale; a weight off its grid is refused), and every
zero point must be an integer in [0, 2^b - 1] (with beta < 1 a row of mostly negative weights gets
round(-xmin / delta) > 2^b - 1: ``Grid(clamp_zero=True)`` keeps it storable). Then, per linear layer
(out x in, G groups; packing: :mod:`magr.deploy.packing`, along the dimension named):

- ``gptq`` (``quant_method: gptq``; transformers + optimum + gptqmodel, vLLM's gptq kernels):
  ``qweight`` int32 (ceil(in*b/32), out), the codes packed along in; ``qzeros`` int32 (G, ceil(out*b/32)),
  the zero points packed along out, stored as zero - 1 in ``checkpoint_format: gptq`` (v1, read by every GPTQ
  kernel; cannot hold a zero point of 0) or as they are in ``gptq_v2``; ``scales`` float16 (G, out);
  ``g_idx`` int32 (in,), the group of each input; group_size -1 means per channel.
- ``compressed-tensors`` (format ``pack-quantized``; transformers + compressed-tensors, vLLM):
  ``weight_packed`` int32 (out, ceil(in*b/32)), the codes packed along in (compressed-tensors' signed code
  q - 2^(b-1) plus its offset 2^(b-1) is our q); ``weight_scale`` float16 (out, G); ``weight_shape`` (out, in);
  asymmetric grids add ``weight_zero_point`` int32 (ceil(out*b/32), G), zero points packed along out.

- ``gguf`` (llama.cpp, ollama): ``model.gguf`` with 4-bit asymmetric grids as Q4_1 and 8-bit symmetric ones
  as Q8_0, per channel or per group of a multiple of 32 (:mod:`magr.deploy.llamacpp`; other grids refused).

The reloaded weight is fp16(scale) * (q - zero); ``Grid(fp16_scale=True)`` rounds scales to float16 while
quantizing, so the exported model computes exactly the weights that were evaluated. Embeddings, norms and
lm_head are stored in float16. The folder (config with ``quantization_config``, tokenizer, weights,
``magr_export.json``) is written to a temporary sibling and renamed into place, so a failure leaves nothing.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..pipeline.models import linear_shapes
from ..pipeline.shards import write_sharded
from ..pipeline.streaming import LAYERS_PREFIX
from .packing import pack_int32
from ..pipeline.persistence import PARAMS_FILE, load_quant_params, lock_problem, read_run, save_tokenizer, write_json
from ..core.quantizers import Grid, QuantParams
from ..core.settings import check_choice, setting

log = logging.getLogger(__name__)

FORMATS = ("gptq", "compressed-tensors", "gguf")
GPTQ_VERSIONS = ("auto", "v1", "v2")
#: group sizes the GPTQ loaders' kernels accept (gptqmodel's torch kernel; -1 is per channel)
GPTQ_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
EXPORT_FILE = "magr_export.json"


@dataclass(frozen=True)
class Export:
    """How a quantized run is written as a deployable checkpoint (module docstring)."""

    format: str = setting("gptq", "checkpoint format: gptq, compressed-tensors, or gguf (llama.cpp: 4-bit asymmetric "
                                  "grids as Q4_1, 8-bit symmetric as Q8_0)", choices=FORMATS)
    gptq_version: str = setting("auto", "GPTQ zero points: v1 (stored as zero - 1, read by every GPTQ kernel; "
                                        "cannot hold a zero point of 0), v2 (as they are) or auto (v1 unless "
                                        "some zero point is 0)", choices=GPTQ_VERSIONS)

    def __post_init__(self):
        check_choice("format", self.format, FORMATS)
        check_choice("gptq_version", self.gptq_version, GPTQ_VERSIONS)


@dataclass
class LayerCodes:
    """One linear layer on its grid: codes (out, in) and zero (out, G) int64, scale (out, G), g_idx (in,)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor


# ------------------------------------------------------------------------------------- checks and codes
def check_output_folder(out) -> Path:
    """``out`` as a Path; ValueError if it exists and is not an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} exists and is not empty; choose a new folder or remove it")
    return out


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def check_grid(name: str, p: QuantParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of a layer's grid in float32, once every scale is finite and positive and every zero point
    an integer in [0, 2^b - 1]; else ValueError naming the layer, the row and group, and what is allowed."""
    maxq = p.maxq
    scale, zero = p.scale.float(), p.zero.float()
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        r, g = _first(~(torch.isfinite(scale) & (scale > 0)))
        raise ValueError(f"{name}: row {r} group {g} has scale {float(scale[r, g])}; allowed: finite and > 0")
    bad = (zero != zero.round()) | (zero < 0) | (zero > maxq)
    if bad.any():
        r, g = _first(bad)
        raise ValueError(
            f"{name}: row {r} group {g} has zero point {float(zero[r, g]):g}; packed formats store integers "
            f"in [0, {maxq}] at {maxq.bit_length()} bits ({int(bad.sum())} of {bad.numel()} grids are outside). "
            "With beta < 1 a row or group of mostly negative weights gets round(-min/delta) > 2^bits - 1: "
            "quantize again with --clamp-zero (Grid(clamp_zero=True))")
    return scale, zero


def layer_codes(name: str, W: torch.Tensor, p: QuantParams) -> LayerCodes:
    """The integer codes of a saved weight on its saved grid (module docstring), or ValueError naming the
    layer, the row, the value and what is allowed."""
    maxq = p.maxq
    scale, zero = check_grid(name, p)
    Wf = W.float()
    s, z = (t.float() for t in p.columns())
    q = torch.round(Wf / s) + z
    tol = torch.finfo(W.dtype).eps / 2 * Wf.abs() + 1e-5 * s
    if bool((tol >= 0.5 * s).any()):
        raise ValueError(f"{name}: weights stored in {W.dtype} cannot pin down {maxq.bit_length()}-bit codes; "
                         "quantize with --dtype float32")
    off = (q < 0) | (q > maxq) | ((s * (q - z) - Wf).abs() > tol)
    if off.any():
        r, c = _first(off)
        raise ValueError(
            f"{name}: weight [{r}, {c}] = {float(Wf[r, c]):.7g} is not on its saved grid (scale "
            f"{float(s[r, c]):.7g}, zero {float(z[r, c]):g}, codes 0..{maxq}; {int(off.sum())} weights off): "
            "the grids in the run folder are not the final ones; save the grids the weights were rounded to")
    return LayerCodes(q.long(), scale, zero.long(), p.g_idx.long())


def _check_all_quantized(model: nn.Module, params: dict[str, QuantParams]) -> None:
    missing = sorted(set(linear_shapes(model)) - set(params))
    if missing:
        raise ValueError(f"no grid for {len(missing)} linear layer(s), e.g. {missing[0]}; every decoder linear "
                         "layer must be quantized to export")


def model_codes(model: nn.Module, params: dict[str, QuantParams]) -> dict[str, LayerCodes]:
    """:func:`layer_codes` of every quantized layer; ValueError if a decoder linear layer has no grid."""
    _check_all_quantized(model, params)
    return {name: layer_codes(name, model.get_submodule(name).weight.data.cpu(), params[name].cpu())
            for name in sorted(params)}


def _trivial_g_idx(p: QuantParams) -> bool:
    n, groups = p.g_idx.numel(), p.scale.shape[1]
    return torch.equal(p.g_idx.long().cpu(), torch.arange(n) // (n // groups))


def _layout(export: Export, params: dict[str, QuantParams]) -> tuple[str | None, bool]:
    """(GPTQ version or None, desc_act) of the checkpoint, from the grids alone (each checked first); ValueError
    for a permuted g_idx in a format that cannot hold one."""
    zeros = {name: check_grid(name, params[name])[1].long() for name in sorted(params)}
    desc_act = not all(_trivial_g_idx(p) for p in params.values())
    if desc_act and export.format != "gptq":
        what = "GGUF blocks take" if export.format == "gguf" else f"{export.format} export takes"
        raise ValueError(f"this run's g_idx is permuted (act-order with static groups); {what} g_idx = "
                         "input // group_size only; allowed: --format gptq")
    return (_gptq_version(export, zeros) if export.format == "gptq" else None), desc_act


def check_exportable(grid: Grid, export: Export, shapes: dict[str, tuple[int, int]], model=None) -> None:
    """Fail before any work when the format cannot hold this grid on layers of these (out, in) shapes (and, given
    the ``model`` or its skeleton, when GGUF cannot hold its architecture)."""
    if export.format == "gguf":
        from .llamacpp import check_gguf_model, check_gguf_shapes, gguf_type

        gguf_type(grid)
        check_gguf_shapes(shapes)
        if model is not None:
            check_gguf_model(model, shapes)
    if export.format == "gptq":
        if grid.group_size is not None and grid.group_size not in GPTQ_GROUP_SIZES:
            raise ValueError(f"group_size {grid.group_size} cannot be loaded as GPTQ; allowed: per channel or "
                             f"{', '.join(map(str, GPTQ_GROUP_SIZES))}")
        if grid.bits == 3:
            for name, (out, n) in shapes.items():
                if out % 32 or n % 32:
                    raise ValueError(f"{name} is {out} x {n}: 3-bit GPTQ needs both widths to be multiples of 32 "
                                     "(loaders unpack 32 codes from 3 words); allowed: 2, 4 or 8 bits, or "
                                     "the compressed-tensors format")


# -------------------------------------------------------------------------------------------- writers
def _gptq_version(export: Export, zeros: dict[str, torch.Tensor]) -> str:
    name = next((n for n, zero in zeros.items() if bool((zero == 0).any())), None)  # first layer with a zero 0
    has_zero0 = name is not None
    if export.gptq_version == "v1" and has_zero0:
        r, g = _first(zeros[name] == 0)
        raise ValueError(f"{name}: row {r} group {g} has zero point 0, which GPTQ v1 (stores zero - 1) cannot "
                         "hold; allowed with v1: zero points 1..2^bits-1; use --gptq-version v2 or auto")
    version = "v2" if export.gptq_version == "v2" or has_zero0 else "v1"
    if version == "v2" and export.gptq_version == "auto":
        log.warning("some zero point is 0: writing checkpoint_format gptq_v2 (vLLM reads it with its gptq kernel)")
    return version


def gptq_tensors(name: str, lc: LayerCodes, bits: int, version: str) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer (module docstring)."""
    zeros = lc.zero - 1 if version == "v1" else lc.zero
    return {f"{name}.qweight": pack_int32(lc.codes, bits).T.contiguous(),
            f"{name}.qzeros": pack_int32(zeros.T, bits).contiguous(),
            f"{name}.scales": lc.scale.T.to(torch.float16).contiguous(),
            f"{name}.g_idx": lc.g_idx.to(torch.int32).contiguous()}


def ct_tensors(name: str, lc: LayerCodes, bits: int, sym: bool) -> dict[str, torch.Tensor]:
    """The compressed-tensors ``pack-quantized`` tensors of one layer (module docstring)."""
    out = {f"{name}.weight_packed": pack_int32(lc.codes, bits),
           f"{name}.weight_scale": lc.scale.to(torch.float16).contiguous(),
           f"{name}.weight_shape": torch.tensor(list(lc.codes.shape), dtype=torch.int64)}
    if not sym:
        out[f"{name}.weight_zero_point"] = pack_int32(lc.zero.T, bits).T.contiguous()
    return out


def quantization_config(grid: Grid, export: Export, version: str, desc_act: bool) -> dict:
    """The ``quantization_config`` entry of config.json for this grid and format."""
    if export.format == "gptq":
        return {"quant_method": "gptq", "bits": grid.bits, "group_size": grid.group_size or -1,
                "desc_act": desc_act, "sym": grid.sym, "lm_head": False, "pack_dtype": "int32",
                "checkpoint_format": "gptq_v2" if version == "v2" else "gptq",
                "meta": {"quantizer": ["magr"]}}
    weights = {"num_bits": grid.bits, "type": "int", "symmetric": grid.sym, "dynamic": False, "actorder": None,
               "strategy": "group" if grid.group_size else "channel", "group_size": grid.group_size,
               "block_structure": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors in float16 (embeddings, norms, lm_head, biases are stored so), on the CPU."""
    return {k: (v.to(torch.float16) if v.is_floating_point() else v).cpu().contiguous() for k, v in state.items()}


def _float_tensors(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer saved by save_pretrained except the quantized weights, in float16."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    skip = {f"{n}.weight" for n in quantized}
    return _half({k: v for k, v in state.items() if k not in skip})


def _packed(name: str, lc: LayerCodes, grid: Grid, export: Export, version: str | None) -> dict[str, torch.Tensor]:
    """One layer's tensors in the export format."""
    if export.format == "gptq":
        return gptq_tensors(name, lc, grid.bits, version)
    return ct_tensors(name, lc, grid.bits, grid.sym)


def export_model(model: nn.Module, tokenizer, params: dict[str, QuantParams], grid: Grid, out,
                 export: Export = Export(), source: str | None = None) -> Path:
    """Write ``model`` (its linear layers on the grids ``params``) as a checkpoint in ``export.format``."""
    from safetensors.torch import save_file

    out = check_output_folder(out)
    check_exportable(grid, export, linear_shapes(model))
    _check_all_quantized(model, params)
    version, desc_act = _layout(export, params)
    codes = model_codes(model, params)
    if export.format == "gguf":
        return _write_gguf_folder(model, tokenizer, codes, grid, out, export, source)
    tensors = _float_tensors(model, set(codes))
    for name, lc in codes.items():
        tensors.update(_packed(name, lc, grid, export, version))
        bias = model.get_submodule(name).bias
        if bias is not None:
            tensors[f"{name}.bias"] = bias.data.to(torch.float16).cpu()

    def write_weights(folder: Path) -> None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return _write_folder(model, tokenizer, grid, export, version, desc_act, out, source, len(codes), write_weights)


def export_streamed(source_model, tokenizer, params: dict[str, QuantParams], grid: Grid, out,
                    export: Export = Export(), source: str | None = None) -> Path:
    """:func:`export_model` of a streamed model (:class:`magr.pipeline.streaming.StreamedModel`), block by
    block: block i's tensors are read, packed and written as shard i, then dropped; the resident tensors are the
    last shard and the index is written after them (GPTQ and compressed-tensors; GGUF needs the whole model)."""
    model = source_model.model
    out = check_output_folder(out)
    if export.format == "gguf":
        raise ValueError("a GGUF export reads the whole model; export the saved run folder with its full load")
    check_exportable(grid, export, linear_shapes(model))
    _check_all_quantized(model, params)
    version, desc_act = _layout(export, params)
    n = len(source_model) + 1

    def packed_block(i: int) -> dict[str, torch.Tensor]:
        state = {f"{LAYERS_PREFIX}{i}.{k}": v for k, v in source_model.read_block(i).items()}
        tensors = _half({k: v for k, v in state.items() if k.removesuffix(".weight") not in params})
        for name in sorted(n for n in params if n.startswith(f"{LAYERS_PREFIX}{i}.")):
            lc = layer_codes(name, state[f"{name}.weight"], params[name].cpu())
            tensors.update(_packed(name, lc, grid, export, version))
        return tensors

    def shards():  # one at a time: each block's shard, then the resident tensors
        for i in tqdm(range(n - 1), desc=f"export {export.format}", unit="block"):
            yield packed_block(i)
        yield _half(source_model.resident_state())

    def write_weights(folder: Path) -> None:
        write_sharded(folder, shards(), n)

    return _write_folder(model, tokenizer, grid, export, version, desc_act, out, source, len(params), write_weights)


def _write_folder(model, tokenizer, grid: Grid, export: Export, version, desc_act: bool, out: Path, source,
                  layers: int, write_weights) -> Path:
    """The export folder (config with ``quantization_config``, generation config, tokenizer, the weights that
    ``write_weights(folder)`` writes, ``magr_export.json``), written to a temporary sibling and renamed."""
    qcfg = quantization_config(grid, export, version, desc_act)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.quantization_config = qcfg
        config.dtype = torch.float16
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if export.format == "gptq":
            write_json(tmp / "quantize_config.json", qcfg)
        save_tokenizer(tokenizer, tmp)
        write_weights(tmp)
        meta = {"format": export.format, "export": asdict(export), "grid": asdict(grid), "source": source,
                "quantization_config": qcfg, "layers": layers}
        write_json(tmp / EXPORT_FILE, meta)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d layers as %s to %s", layers, export.format, out)
    return out


def _tokenizer_folders(stage: Path, source: str | None) -> list[Path]:
    """Where the GGUF writer looks for tokenizer files: the staged export, the run folder, its source model."""
    from ..pipeline.models import model_source
    from ..pipeline.persistence import RUN_FILE

    folders = [stage]
    if source:
        folders.append(Path(source))
        run_file = Path(source) / RUN_FILE
        if run_file.is_file():
            kind, where = model_source(read_run(source)["model"])
            if kind == "folder":
                folders.append(Path(where))
    return folders


def _write_gguf_folder(model, tokenizer, codes, grid, out: Path, export: Export, source) -> Path:
    """The GGUF file (:mod:`magr.deploy.llamacpp`), read back and checked, with its tokenizer and
    ``magr_export.json``, written to a temporary sibling and renamed into place."""
    from .llamacpp import GGUF_FILE, check_gguf, write_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_tokenizer(tokenizer, tmp)
        written = write_gguf(model, codes, grid, tmp / GGUF_FILE, _tokenizer_folders(tmp, source))
        check = check_gguf(tmp / GGUF_FILE, model, codes, grid)
        write_json(tmp / EXPORT_FILE, {"format": "gguf", "export": asdict(export), "grid": asdict(grid),
                                       "source": source, "layers": len(codes), **written, "read_back": check})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d layers as GGUF %s to %s (read back: max |difference| %.3g)", len(codes),
             written["gguf_type"], out / GGUF_FILE, check["max_abs_diff"])
    return out


def export_run(run_dir, out, export: Export = Export(), load: str = "auto") -> Path:
    """Pack the run folder ``run_dir`` (written by ``magr quantize`` with the model saved) into ``out``: block
    by block (:func:`export_streamed`) unless ``load`` is ``full`` or the format is GGUF (the whole model)."""
    from ..pipeline.models import DTYPES
    from ..pipeline.preflight import check_weight_files
    from ..pipeline.streaming import open_model

    run_dir = Path(run_dir)
    check_output_folder(out)
    busy = lock_problem(run_dir)  # a run writing into it now (or killed while it did)
    if busy is not None:
        raise ValueError(busy)
    run = read_run(run_dir)
    if not (run_dir / PARAMS_FILE).is_file():
        raise FileNotFoundError(f"no grids ({PARAMS_FILE}) in {run_dir}: the run was quantized without saving "
                                "the model; rerun `magr quantize` without --no-save")
    check_weight_files(str(run_dir))
    grid = Grid(**run["config"]["grid"])
    params = load_quant_params(run_dir)
    # in the run's dtype: weights saved in float16 carry its rounding, which the on-grid check allows for
    model, tokenizer, blocks = open_model(str(run_dir), dtype=DTYPES[run.get("dtype", "float32")],
                                          load="full" if export.format == "gguf" else load)
    if blocks.streamed:
        return export_streamed(blocks, tokenizer, params, grid, out, export, source=str(run_dir))
    return export_model(model, tokenizer, params, grid, out, export, source=str(run_dir))
