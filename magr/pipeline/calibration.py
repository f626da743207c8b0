"""Calibration features block by block: block 0's inputs, block forwards, and per-layer statistics.

OPTQ's procedure: the calibration windows run through the embeddings once; block i's inputs are the
outputs of blocks 0..i-1 (quantized ones, when quantizing). Per linear layer the statistics are

    H = sum over all calibration tokens of x x^T          (OPTQ's Hessian up to a factor; CD's covariance)
    H_last = X_last^T X_last of the last calibration sample (the released code's X for MagR; X_last is kept too)

One block at a time sits on the compute device; the rest of the model stays where it was. With a forward
dtype (``forward_dtype``, e.g. bfloat16) the block inputs and every block forward run in that dtype while the
weights the math reads stay in the model's dtype (:func:`magr.pipeline.models.forward_cast`), and H is
accumulated in float32 from the half-precision inputs.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .models import cast_inputs, checked_layers, decoder_layers, forward_cast
from .streaming import ResidentBlocks

FORWARD_BATCH = 8
"""Calibration samples per forward pass through a block."""


class LayerStats:
    """Accumulates H = sum x x^T over all calibration tokens and H_last = X_last^T X_last of a layer's input (and
    keeps X_last, float32, for solvers that use X itself)."""

    def __init__(self, n: int, device):
        self.H = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.H_last = None
        self.X_last = None
        self.tokens = 0
        self.has_last = False  # whether the current batch ends with the last calibration sample

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (batch, seqlen, in)."""
        x = x.reshape(-1, x.shape[-2], x.shape[-1]).float()
        flat = x.reshape(-1, x.shape[-1])
        self.H += flat.T @ flat
        self.tokens += flat.shape[0]
        if self.has_last:
            self.X_last = x[-1].clone()
            self.H_last = self.X_last.T @ self.X_last


class StopForward(Exception):
    """Raised by a hook once the inputs it needs are captured, to skip the rest of a forward pass."""


def passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextmanager
def layers_replaced(model: nn.Module, forward_of):
    """Every decoder layer's forward replaced by ``forward_of(i)`` for the ``with`` block (the layers' own
    weights are never touched: the blocks run elsewhere, one at a time), then restored."""
    layers = decoder_layers(model)
    own_forward = [layer.__dict__.get("forward") for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.forward = forward_of(i)
        yield layers
    finally:
        for layer, fwd in zip(layers, own_forward):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, device) -> tuple[torch.Tensor, list[dict]]:
    """Run the embeddings on every calibration row and return block 0's inputs and every block's keyword
    arguments.

    Returns (inputs (nsamples, seqlen, hidden) on ``device``, one dict per decoder layer with the kwargs of
    its call, such as the rotary position embeddings and the attention mask, shared by all samples of equal
    length). The kwargs are taken per layer because models with sliding-window or alternating attention
    (Gemma2, Qwen2 with ``layer_types``) give each kind of layer its own mask: for the first row every layer
    runs as a pass-through and records what the model passes it; the other rows stop at layer 0.
    """
    layers = decoder_layers(model)
    per_layer: list[dict | None] = [None] * len(layers)
    inps = []

    def hook(module, args, kwargs, i):
        if i == 0:
            inps.append((args[0] if args else kwargs["hidden_states"]).detach())
        if per_layer[i] is None:
            per_layer[i] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache")}
        if per_layer[-1] is not None:  # the last layer has its kwargs (set just above when i is the last)
            raise StopForward

    emb, rot = model.model.embed_tokens, getattr(model.model, "rotary_emb", None)
    moved = [m for m in (emb, rot) if m is not None]
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    for m in moved:
        m.to(device)
    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: hook(m, a, k, i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        with layers_replaced(model, lambda i: passthrough):  # the blocks run later, one at a time (walk_blocks)
            for row in tokens:
                try:
                    model(row.unsqueeze(0).to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
        for m, home in zip(moved, homes):
            if home.type != "meta":
                m.to(home)
    for kwargs in per_layer:
        kwargs["use_cache"] = False
    return torch.cat(inps, 0), per_layer


def block_forward(block: nn.Module, inps: torch.Tensor, kwargs: dict, batch: int = FORWARD_BATCH,
                  forward_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The block's outputs for all calibration samples, ``batch`` samples per forward pass (its parameters
    cast to ``forward_dtype`` for the pass, when given; ``inps`` and ``kwargs`` already in that dtype)."""
    outs = []
    with forward_cast(block, forward_dtype):
        for i in range(0, inps.shape[0], batch):
            out = block(inps[i : i + batch], **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs, 0)


@dataclass
class BlockInputs:
    """Block ``index`` on the compute device with the calibration inputs it receives."""

    index: int
    block: nn.Module
    inps: torch.Tensor | None  # None: walked without calibration data
    kwargs: dict | None
    forward_dtype: torch.dtype | None = None  # the dtype of the block's forwards (None: its own)
    outputs: torch.Tensor | None = None  # set by stats(keep_outputs=True): the next block's inputs

    @torch.no_grad()
    def stats(self, groups: Sequence[Sequence[str]], batch: int = FORWARD_BATCH,
              keep_outputs: bool = False) -> dict[str, LayerStats]:
        """Forward the inputs through the block and accumulate the statistics of the linear layers in
        ``groups`` (name tuples; the layers of a tuple share one input, so one accumulator, hooked on the
        first). Each forward stops once the last group's input is captured. Returns name -> statistics
        (None for every layer of a block walked without inputs).

        ``keep_outputs``: run the whole block and keep its outputs in ``self.outputs``, which the walk then
        passes on as the next block's inputs: one forward per block instead of two, for walks that leave the
        weights as they are (Figure 1, Table 1; a quantizing walk needs the outputs of the changed block)."""
        if self.inps is None:
            return {name: None for names in groups for name in names}
        stats: dict[str, LayerStats] = {}
        handles = []
        for k, names in enumerate(groups):
            first = self.block.get_submodule(names[0])
            st = LayerStats(first.in_features, self.inps.device)
            stats.update({name: st for name in names})

            def hook(module, args, st=st, stop=k == len(groups) - 1 and not keep_outputs):
                st.add(args[0])
                if stop:
                    raise StopForward

            handles.append(first.register_forward_pre_hook(hook))
        n, outs = self.inps.shape[0], []
        try:
            with forward_cast(self.block, self.forward_dtype):
                for i in range(0, n, batch):
                    for st in stats.values():
                        st.has_last = i + batch >= n
                    try:
                        out = self.block(self.inps[i : i + batch], **self.kwargs)
                        if keep_outputs:
                            outs.append(out[0] if isinstance(out, tuple) else out)
                    except StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        if keep_outputs:
            self.outputs = torch.cat(outs, 0)
        return stats


@torch.no_grad()
def walk_blocks(model: nn.Module, calib: torch.Tensor | None, device, last: int | None = None,
                forward_batch: int = FORWARD_BATCH, forward_dtype: torch.dtype | None = None,
                blocks=None) -> Iterator[BlockInputs]:
    """Yield each decoder block with its calibration inputs, in order; after the caller is done with a
    block (it may quantize it), the block's outputs become the next block's inputs. Stops after ``last``.
    (Wrap it in tqdm for a progress bar: it yields ``last + 1`` blocks, all of them by default.) With
    ``calib=None`` (methods that read no data) the blocks come without inputs and nothing is forwarded.
    ``forward_dtype``: the dtype of the inputs and of every block forward (None: the model's own).
    ``blocks``: where the blocks come from (:mod:`magr.pipeline.streaming`; default: ``model``'s own, in memory);
    a block is opened when the walk reaches it and closed once its outputs are computed."""
    if calib is not None and (calib.dim() != 2 or calib.numel() == 0):
        raise ValueError(f"calibration tokens must be a non-empty (nsamples, seqlen) tensor, got {tuple(calib.shape)}")
    layers = checked_layers(model)
    n = len(layers) if last is None else last + 1
    if not 0 < n <= len(layers):
        raise ValueError(f"last block {last} out of range; the model has blocks 0..{len(layers) - 1}")
    device = torch.device(device)
    if next(model.parameters()).dtype == forward_dtype:
        forward_dtype = None  # the model's own dtype: nothing to cast
    if calib is not None:
        inps, layer_kwargs = capture_block_inputs(model, calib, device)
        inps, layer_kwargs = cast_inputs(inps, forward_dtype), cast_inputs(layer_kwargs, forward_dtype)
    else:
        inps, layer_kwargs = None, [None] * n
    blocks = blocks if blocks is not None else ResidentBlocks(model)
    for i in range(n):
        block = blocks.open(i, device)
        blk = BlockInputs(i, block, inps, layer_kwargs[i], forward_dtype)
        yield blk
        if i + 1 < n and blk.outputs is not None:
            inps = blk.outputs  # the caller's stats(keep_outputs=True) ran the unchanged block
        elif i + 1 < n and inps is not None:
            inps = block_forward(block, inps, layer_kwargs[i], batch=forward_batch, forward_dtype=forward_dtype)
        blocks.close(i, block)
        if device.type == "cuda":
            torch.cuda.empty_cache()
