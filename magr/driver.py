"""Block-by-block post-training quantization of Llama-family decoder models (OPTQ's procedure).

Calibration inputs of block i are the outputs of the already-quantized blocks 0..i-1. Inside a block the
seven linear layers are quantized in the true-sequential order [q, k, v] -> [o] -> [gate, up] -> [down]:
each group sees inputs computed with the groups before it already quantized. One block at a time sits
on the accelerator; the rest of the model stays where it was (CPU memory).

Per linear layer, with S = sum of x x^T over all calibration tokens (OPTQ's Hessian, up to a factor):

- ``rtn``:        Q = RTN(W)
- ``magr+rtn``:   W' = MagR(W; X_magr), Q = RTN(W')
- ``optq``:       Q = OPTQ(W; S)
- ``magr+optq``:  W' = MagR(W; X_magr), Q = OPTQ(W'; S), then the released code's coordinate-descent
                  refinement (30 passes at 2 bits, 1 pass otherwise; ``cd_passes`` overrides, 0 disables)
- ``magr+optq-cd``: the same with ``cd_passes`` passes (default 30): MagR+OPTQ-dagger of the paper.

X_magr is the feature matrix of the last calibration sample (``feature_source="last_sample"``, as the
released code) or all calibration tokens (``"all"``, H = S). MagR runs once per group of layers sharing an
input; ``magr_solver="fast"`` (default) uses FISTA with fewer iterations, reaching a lower objective than the
published 200 iterations (benchmarks/NOTES.md); ``"reference"`` is the published procedure.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .optq import optq
from .quantizers import SUPPORTED_BITS, QuantParams, Quantizer, cd_refine, default_beta, rtn
from .solver import fast_iters_matching, magr_preprocess_group

log = logging.getLogger(__name__)

METHODS = ("rtn", "magr+rtn", "optq", "magr+optq", "magr+optq-cd")
FEATURE_SOURCES = ("last_sample", "all")
MAGR_SOLVERS = ("fast", "reference")
# true-sequential groups of one decoder block; layers of a group share their input
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_NAMES = tuple(name for group in SEQUENTIAL_GROUPS for name in group)


@dataclass
class QuantConfig:
    """Settings of one quantization run (defaults: the released code's conventions)."""

    method: str = "magr+optq"
    bits: int = 4
    group_size: int | None = None  # None: per channel
    sym: bool = False
    beta: float | None = None  # None: default_beta(bits, group_size) (method-notes table)
    alpha: float | None = None  # None: 1e-3 per channel, 1e-4 per group
    iters: int = 200
    feature_source: str = "last_sample"
    magr_solver: str = "fast"  # "reference": the published procedure (eigh, sort projection, fp32)
    percdamp: float = 0.01
    blocksize: int = 128
    actorder: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    cd_passes: int | None = None  # None: 30 at 2 bits, 1 otherwise (30 for magr+optq-cd)
    device: str | None = None  # None: cuda when available, else cpu

    @property
    def uses_magr(self) -> bool:
        return self.method.startswith("magr+")

    @property
    def uses_optq(self) -> bool:
        return "optq" in self.method

    def resolved(self) -> "QuantConfig":
        """A copy with every None default filled in and every value checked."""
        c = QuantConfig(**asdict(self))
        if c.method not in METHODS:
            raise ValueError(f"method {c.method!r} is not supported; allowed: {', '.join(METHODS)}")
        if c.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={c.bits} is not supported; allowed: {SUPPORTED_BITS}")
        if c.group_size is not None and c.group_size <= 0:
            raise ValueError(f"group_size={c.group_size} must be a positive integer (or None: per channel)")
        if c.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source {c.feature_source!r} not allowed; allowed: {FEATURE_SOURCES}")
        if c.magr_solver not in MAGR_SOLVERS:
            raise ValueError(f"magr_solver {c.magr_solver!r} not allowed; allowed: {MAGR_SOLVERS}")
        if c.iters < 0:
            raise ValueError(f"iters={c.iters} must be >= 0")
        if c.beta is None:
            c.beta = default_beta(c.bits, c.group_size)
        if not 0 < c.beta <= 1:
            raise ValueError(f"beta={c.beta} must lie in (0, 1]")
        if c.alpha is None:
            c.alpha = 1e-3 if c.group_size is None else 1e-4
        if c.alpha < 0:
            raise ValueError(f"alpha={c.alpha} must be >= 0")
        if c.cd_passes is None:
            c.cd_passes = 30 if (c.bits == 2 or c.method == "magr+optq-cd") else 1
        if not c.uses_magr or not c.uses_optq:
            c.cd_passes = 0
        if c.cd_passes < 0:
            raise ValueError(f"cd_passes={c.cd_passes} must be >= 0")
        if c.device is None:
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        return c

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def checked_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a Llama-family model (models.decoder_layers), after check_architecture."""
    from .models import check_architecture, decoder_layers

    check_architecture(model)
    return decoder_layers(model)


def check_config_for_model(model: nn.Module, cfg: QuantConfig) -> None:
    """Fail before any long work if the group size does not divide every layer's input size."""
    if cfg.group_size is None:
        return
    layer = checked_layers(model)[0]
    for name in LINEAR_NAMES:
        n = layer.get_submodule(name).in_features
        if n % cfg.group_size:
            raise ValueError(
                f"group_size {cfg.group_size} does not divide the input size {n} of {name}; "
                f"allowed: a common divisor of this model's layer widths, or per channel (None)"
            )


# ---------------------------------------------------------------------------------------------------
# Calibration statistics
# ---------------------------------------------------------------------------------------------------


class _Stats:
    """Accumulates S = sum x x^T over all calibration tokens and H_last = X_last^T X_last."""

    def __init__(self, n: int, device):
        self.S = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.H_last = None
        self.tokens = 0
        self.has_last = False  # whether the current batch ends with the last calibration sample

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (batch, seqlen, in)."""
        x = x.reshape(-1, x.shape[-2], x.shape[-1]).float()
        flat = x.reshape(-1, x.shape[-1])
        self.S += flat.T @ flat
        self.tokens += flat.shape[0]
        if self.has_last:
            self.H_last = x[-1].T @ x[-1]


class _StopForward(Exception):
    """Raised by a hook once the inputs it needs are captured, to skip the rest of a forward pass."""


#: calibration samples per forward pass through a block
FORWARD_BATCH = 8


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
    """Run the embeddings on every calibration row and return block 0's inputs and keyword arguments.

    Returns (inputs (nsamples, seqlen, hidden) on ``device``, kwargs of the decoder-layer call such as
    the rotary position embeddings and the causal mask, shared by all samples of equal length).
    """
    from .models import decoder_layers

    layers = decoder_layers(model)  # the callers have run check_architecture
    captured: dict = {}
    inps = []

    def hook(module, args, kwargs):
        inps.append((args[0] if args else kwargs["hidden_states"]).detach())
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    emb, rot = model.model.embed_tokens, getattr(model.model, "rotary_emb", None)
    moved = [m for m in (emb, rot, layers[0]) if m is not None]
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    for m in moved:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in tokens:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m, home in zip(moved, homes):
            if home.type != "meta":
                m.to(home)
    kwargs = {k: v for k, v in captured.items() if k not in ("past_key_values", "use_cache")}
    kwargs["use_cache"] = False
    return torch.cat(inps, 0), kwargs


def block_forward(block: nn.Module, inps: torch.Tensor, kwargs: dict, batch: int = FORWARD_BATCH) -> torch.Tensor:
    """The block's outputs for all calibration samples, ``batch`` samples per forward pass."""
    outs = []
    for i in range(0, inps.shape[0], batch):
        out = block(inps[i : i + batch], **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs, 0)


@torch.no_grad()
def collect_stats(block: nn.Module, groups, inps: torch.Tensor, kwargs: dict,
                  batch: int = FORWARD_BATCH) -> dict[str, _Stats]:
    """Forward all calibration samples through ``block`` and accumulate the input statistics of the
    linear layers in ``groups`` (a sequence of name tuples; the layers of a tuple share one input, so
    they share one accumulator, hooked on the first). Each forward stops as soon as the last group's
    input is captured. Returns name -> statistics."""
    stats: dict[str, _Stats] = {}
    handles = []
    for k, names in enumerate(groups):
        first = block.get_submodule(names[0])
        st = _Stats(first.in_features, inps.device)
        stats.update({name: st for name in names})

        def hook(module, args, st=st, stop=k == len(groups) - 1):
            st.add(args[0])
            if stop:
                raise _StopForward

        handles.append(first.register_forward_pre_hook(hook))
    n = inps.shape[0]
    try:
        for i in range(0, n, batch):
            for st in stats.values():
                st.has_last = i + batch >= n
            try:
                block(inps[i : i + batch], **kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


# ---------------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------------


def _row_max_summary(row_max: torch.Tensor) -> dict:
    r = row_max.float()
    return {"mean": r.mean().item(), "median": r.median().item(), "max": r.max().item(), "min": r.min().item()}


def magr_layers(weights: list[torch.Tensor], st: _Stats, cfg: QuantConfig) -> tuple[list[torch.Tensor], list[dict]]:
    """MagR on layers sharing one input (paper Algorithm 1); returns the new weights and per-layer records.

    ``fast`` (default): FISTA with ``fast_iters_matching(cfg.iters)`` iterations, TF32, fused prox, rows of
    the group stacked (benchmarks/NOTES.md: a lower objective than the published 200 iterations).
    ``reference``: the published procedure per layer (exact lambda_max, ISTA, sort-based projection).
    """
    H = st.S if cfg.feature_source == "all" else st.H_last
    t0 = time.perf_counter()
    if cfg.magr_solver == "reference":
        new, infos = magr_preprocess_group(weights, H, cfg.alpha, path="reference", iters=cfg.iters,
                                           group_size=cfg.group_size, projection="sort", return_info=True)
    else:
        new, infos = magr_preprocess_group(weights, H, cfg.alpha, path="fast", iters=fast_iters_matching(cfg.iters),
                                           group_size=cfg.group_size, return_info=True)
    seconds = time.perf_counter() - t0
    rows = sum(w.shape[0] for w in weights)
    recs = []
    for w, w_new, info in zip(weights, new, infos):
        recs.append({
            "magr_objective_start": info.objective[0] if info.objective else None,
            "magr_objective_end": info.objective[-1] if info.objective else None,
            "row_max_after": _row_max_summary(w_new.abs().amax(dim=1)),
            "seconds_magr": seconds * w.shape[0] / rows,  # the group's time, split by rows
        })
    return new, recs


def quantize_layer(W_orig: torch.Tensor, W: torch.Tensor, st: _Stats, cfg: QuantConfig
                   ) -> tuple[torch.Tensor, QuantParams, dict]:
    """Quantize one weight by ``cfg.method``: ``W_orig`` the original weight, ``W`` the one to quantize
    (MagR's output, or ``W_orig``), both (out x in) float32 on the compute device. Returns (dequantized
    weight, grid parameters, record)."""
    rec: dict = {"shape": list(W_orig.shape), "tokens": st.tokens,
                 "row_max_before": _row_max_summary(W_orig.abs().amax(dim=1))}
    t1 = time.perf_counter()
    if cfg.uses_optq:
        Q, params = optq(
            W, st.S, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, beta=cfg.beta,
            blocksize=cfg.blocksize, percdamp=cfg.percdamp, actorder=cfg.actorder,
            static_groups=cfg.static_groups, return_params=True,
        )
        if cfg.cd_passes:
            Q = cd_refine(Q, W_orig, st.S, params, passes=cfg.cd_passes)
    else:
        Q, params = rtn(W, cfg.bits, cfg.group_size, cfg.sym, cfg.beta, return_params=True)
    rec["seconds_quant"] = time.perf_counter() - t1

    # layer reconstruction error against the original weight, over all calibration tokens
    D = Q.float() - W_orig
    err = float((D @ st.S * D).sum())
    ref = float((W_orig @ st.S * W_orig).sum())
    rec["recon_error"] = err
    rec["recon_error_rel"] = err / ref if ref > 0 else float("nan")
    return Q, params, rec


# ---------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------


@dataclass
class QuantResult:
    """What :func:`quantize_model` produced besides the model changed in place."""

    config: QuantConfig
    records: list[dict] = field(default_factory=list)  # one per linear layer
    params: dict[str, QuantParams] = field(default_factory=dict)  # "model.layers.i.<name>" -> grid
    seconds: float = 0.0
    block_seconds: list[float] = field(default_factory=list)


def _checkpoint_paths(folder: Path, i: int) -> tuple[Path, Path]:
    return folder / f"block_{i:03d}.pt", folder / f"block_{i:03d}.json"


@torch.no_grad()
def quantize_model(model: nn.Module, calib: torch.Tensor, cfg: QuantConfig, progress: bool = True,
                   checkpoint_dir: str | Path | None = None) -> QuantResult:
    """Quantize every linear layer of every decoder block of ``model`` in place (OPTQ's block order).

    ``calib`` is a LongTensor (nsamples, seqlen) of calibration tokens. With ``checkpoint_dir``, each
    finished block (weights, grids, records) is saved there, and a rerun with the same settings and data
    resumes after the last finished block instead of starting over.
    """
    cfg = cfg.resolved()
    check_config_for_model(model, cfg)
    if calib.dim() != 2 or calib.numel() == 0:
        raise ValueError(f"calibration tokens must be a non-empty (nsamples, seqlen) tensor, got {tuple(calib.shape)}")
    device = torch.device(cfg.device)
    layers = checked_layers(model)
    use_cache = getattr(model.config, "use_cache", False)
    model.config.use_cache = False
    result = QuantResult(cfg)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    tag = hashlib.sha1((cfg.fingerprint() + str(calib.sum().item()) + str(tuple(calib.shape))).encode()).hexdigest()[:12]
    if ckpt:
        ckpt.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    inps, kwargs = capture_block_inputs(model, calib, device)
    bar = tqdm(range(len(layers)), desc=f"{cfg.method} w{cfg.bits}", disable=not progress, unit="block")
    for i in bar:
        t_block = time.perf_counter()
        block = layers[i]
        home = next(block.parameters()).device
        block.to(device)
        pt, js = _checkpoint_paths(ckpt, i) if ckpt else (None, None)
        if pt is not None and pt.exists() and js.exists() and json.loads(js.read_text()).get("tag") == tag:
            saved = torch.load(pt, map_location=device)
            block.load_state_dict(saved["state"])
            for name, p in saved["params"].items():
                result.params[name] = QuantParams(**p)
            meta = json.loads(js.read_text())
            result.records.extend(meta["records"])
            result.block_seconds.append(meta["seconds"])
            log.info("block %d: resumed from %s", i, pt)
        else:
            passes = [(g,) for g in SEQUENTIAL_GROUPS] if cfg.true_sequential else [SEQUENTIAL_GROUPS]
            block_records = []
            for groups in passes:
                stats = collect_stats(block, groups, inps, kwargs)
                for names in groups:
                    st = stats[names[0]]
                    layers_ = [block.get_submodule(name) for name in names]
                    originals = [layer.weight.data.float() for layer in layers_]
                    if cfg.uses_magr:
                        targets, magr_recs = magr_layers(originals, st, cfg)
                    else:
                        targets, magr_recs = originals, [{"seconds_magr": 0.0} for _ in names]
                    for name, layer, W_orig, W, mrec in zip(names, layers_, originals, targets, magr_recs):
                        Q, params, rec = quantize_layer(W_orig, W, st, cfg)
                        rec.update(mrec)
                        rec["seconds"] = rec["seconds_magr"] + rec["seconds_quant"]
                        layer.weight.data.copy_(Q.to(layer.weight.dtype))
                        full = f"model.layers.{i}.{name}"
                        result.params[full] = QuantParams(params.scale.cpu(), params.zero.cpu(), params.maxq,
                                                          params.g_idx.cpu())
                        rec.update(block=i, layer=name)
                        block_records.append(rec)
                        bar.set_postfix(layer=name, err=f"{rec['recon_error_rel']:.2e}")
                    del targets, originals
                del stats
            result.records.extend(block_records)
            result.block_seconds.append(time.perf_counter() - t_block)
            if pt is not None:
                names = [f"model.layers.{i}.{n}" for n in LINEAR_NAMES]
                torch.save({"state": block.state_dict(),
                            "params": {n: asdict(result.params[n]) for n in names}}, pt)
                js.write_text(json.dumps({"tag": tag, "records": block_records,
                                          "seconds": result.block_seconds[-1]}))
        inps = block_forward(block, inps, kwargs)
        block.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.config.use_cache = use_cache
    result.seconds = time.perf_counter() - start
    bad = [r for r in result.records if not math.isfinite(r["recon_error"])]
    if bad:
        log.warning("%d layers have a non-finite reconstruction error", len(bad))
    return result


# ---------------------------------------------------------------------------------------------------
# Save and reload
# ---------------------------------------------------------------------------------------------------

QUANT_FILE = "magr_quantization.json"
PARAMS_FILE = "magr_qparams.safetensors"
RECORDS_FILE = "magr_layers.json"
SUMMARY_FILE = "magr_summary.json"  # written by `magr quantize`


def save_quantized(model: nn.Module, tokenizer, result: QuantResult, out_dir: str | Path,
                   source: str | None = None) -> Path:
    """Save the quantized model as a normal ``save_pretrained`` folder (dequantized weights in the
    model's dtype) plus the grids (``magr_qparams.safetensors``: scale, zero, g_idx per layer), the
    settings (``magr_quantization.json``) and the per-layer records (``magr_layers.json``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    try:
        tokenizer.save_pretrained(out)
    except Exception as exc:  # some tokenizers (e.g. wrappers) cannot be saved; reload by alias
        log.warning("tokenizer not saved (%s); it is reloaded from the source model %r", exc, source)
    tensors = {}
    for name, p in result.params.items():
        tensors[f"{name}.scale"] = p.scale.contiguous()
        tensors[f"{name}.zero"] = p.zero.contiguous()
        tensors[f"{name}.g_idx"] = p.g_idx.to(torch.int32).contiguous()
    save_file(tensors, str(out / PARAMS_FILE))
    meta = {"format": "magr-dequantized-v1", "source_model": source, "config": asdict(result.config),
            "maxq": 2 ** result.config.bits - 1, "seconds": result.seconds,
            "block_seconds": result.block_seconds,
            "note": "weights are stored dequantized (w = scale * (q - zero)); codes: round(w/scale)+zero"}
    (out / QUANT_FILE).write_text(json.dumps(meta, indent=2))
    (out / RECORDS_FILE).write_text(json.dumps(result.records, indent=1))
    return out


def load_quant_params(folder: str | Path) -> tuple[dict, dict[str, QuantParams]]:
    """Read back (settings, grids) written by :func:`save_quantized`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / QUANT_FILE).read_text())
    tensors = load_file(str(folder / PARAMS_FILE))
    params = {}
    for key in tensors:
        if key.endswith(".scale"):
            name = key[: -len(".scale")]
            params[name] = QuantParams(tensors[f"{name}.scale"], tensors[f"{name}.zero"], meta["maxq"],
                                       tensors[f"{name}.g_idx"].long())
    return meta, params
