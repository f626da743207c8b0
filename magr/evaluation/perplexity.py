"""Perplexity over non-overlapping windows (the GPTQ / MagR protocol).

    ppl = exp( sum over windows and predicted positions of -log p(x_t | x_<t)  /  number of predictions )

Each window of ``seqlen`` tokens predicts its last seqlen - 1 tokens from the ones before; windows do
not overlap and a trailing partial window is dropped. With ``bos_id`` each window is BOS followed by the
next seqlen - 1 tokens of the stream (the llama2.c convention), so the first real token is predicted too;
a BOS already at the start of the stream is dropped first.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.settings import setting
from ..pipeline.calibration import (
    block_forward,
    capture_block_inputs,
    layers_replaced,
    passthrough,
)
from ..pipeline.models import forward_cast

log = logging.getLogger(__name__)


def make_windows(tokens: torch.Tensor, seqlen: int, bos_id: int | None = None,
                 max_windows: int | None = None) -> torch.Tensor:
    """(nwindows, seqlen) non-overlapping windows of a 1-D token stream; BOS-prefixed when ``bos_id`` is set."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D (or 1 x n), got shape {tuple(tokens.shape)}")
    if bos_id is not None and tokens.numel() and tokens[0].item() == bos_id:
        tokens = tokens[1:]  # the stream's own BOS: each window gets one anyway
    step = seqlen if bos_id is None else seqlen - 1
    nwin = tokens.numel() // step
    if max_windows is not None:
        if max_windows <= 0:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        nwin = min(nwin, max_windows)
    if nwin == 0:
        raise ValueError(f"only {tokens.numel()} tokens: not enough for one window of seqlen={seqlen}")
    windows = tokens[: nwin * step].view(nwin, step)
    if bos_id is not None:
        windows = torch.cat([torch.full((nwin, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window (float64 tensor of length batch), windows on the model's device."""
    logits = model(input_ids=windows, use_cache=False).logits
    logits = logits[:, :-1, :]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = windows[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(windows.shape[0], -1).double().sum(dim=1)


@torch.no_grad()
def streamed_nll(blocks, windows: torch.Tensor, batch_size: int, device, forward_dtype: torch.dtype | None = None,
                 progress: bool = True) -> float:
    """Summed next-token NLL of ``windows`` through a model whose blocks are opened one at a time (``blocks``:
    :class:`magr.pipeline.streaming.StreamedModel`), as the released ``llama_eval``: every window's hidden states
    go through block 0, then all through block 1, ...; then the model's own head (final norm, lm_head) turns them
    into logits. The forwards are the in-memory model's, batch by batch, so the NLL is the same to the bit."""
    model = blocks.model
    device = torch.device(device)
    with blocks.resident_on(device), forward_cast(model, forward_dtype):
        hidden, kwargs = capture_block_inputs(model, windows, device)  # the embeddings, in the forward dtype
        for i in tqdm(range(len(blocks)), desc=f"perplexity blocks ({windows.shape[0]} windows)",
                      disable=not progress):
            block = blocks.open(i, device)
            hidden = block_forward(block, hidden, kwargs[i], batch=batch_size, forward_dtype=forward_dtype)
            blocks.close(i, block)
        total = 0.0
        for i in range(0, windows.shape[0], batch_size):
            last = hidden[i:i + batch_size]
            with layers_replaced(model, lambda k, last=last: (lambda *a, **kw: last) if k == 0 else passthrough):
                total += window_nll(model, windows[i:i + batch_size].to(device)).sum().item()
    return total


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048, batch_size: int = 1, device=None,
               max_windows: int | None = None, bos_id: int | None = None, progress: bool = True,
               forward_dtype: torch.dtype | None = None, blocks=None) -> float:
    """Perplexity of ``model`` on a 1-D token stream: exp(mean next-token NLL over all windows).

    Runs on ``device`` (default: where the model's parameters are); a model elsewhere is moved there for
    the evaluation and moved back afterwards. ``bos_id``: prefix each window with BOS (seqlen - 1 text
    tokens per window). ``max_windows`` caps the number of windows. ``forward_dtype``: run the forwards with
    the parameters cast to it (:func:`magr.pipeline.models.forward_cast`; the NLL is summed in float64).
    ``blocks``: a streamed model (:func:`streamed_nll`; ``model`` is its skeleton); None: ``model`` is in memory.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    windows = make_windows(tokens, seqlen, bos_id, max_windows)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        log.warning("seqlen %d exceeds the model's max_position_embeddings %d", seqlen, max_pos)
    if getattr(blocks, "streamed", False):
        start = time.perf_counter()
        total = streamed_nll(blocks, windows, batch_size, device or "cpu", forward_dtype, progress)
        return _logged(math.exp(total / (windows.shape[0] * (seqlen - 1))), windows, seqlen, start)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    if device != home:
        model.to(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    start = time.perf_counter()
    try:
        batches = range(0, windows.shape[0], batch_size)
        with forward_cast(model, forward_dtype):
            for i in tqdm(batches, desc=f"perplexity ({windows.shape[0]} x {seqlen})", disable=not progress):
                batch = windows[i:i + batch_size].to(device)
                total += window_nll(model, batch).sum().item()
                count += batch.shape[0] * (seqlen - 1)
    finally:
        if device != home:
            model.to(home)
        model.train(was_training)
    return _logged(math.exp(total / count), windows, seqlen, start)


def _logged(ppl: float, windows: torch.Tensor, seqlen: int, start: float) -> float:
    log.info("perplexity %.4f over %d windows of %d tokens (%.1f s)", ppl, windows.shape[0], seqlen,
             time.perf_counter() - start)
    return ppl


@dataclass(frozen=True)
class Evaluation:
    """Perplexity protocol: non-overlapping ``eval_seqlen``-token windows of each set's evaluation text
    (paper: 2048; C4: the first 256 x 2048 tokens, :func:`magr.pipeline.data.get_eval_tokens`)."""

    eval_sets: tuple[str, ...] = setting((), "perplexity sets: wikitext2, c4, tinystories or a .txt/.jsonl file",
                                         nargs="*")
    eval_seqlen: int = setting(2048, "perplexity window length (tokens)")
    eval_batch: int = setting(1, "windows per forward pass")
    max_windows: int | None = setting(None, "evaluate only the first N windows of each set (default: all)",
                                      type=int)
    bos_per_window: bool | None = setting(None, "start every window with BOS (default: the model family's protocol, "
                                                "magr.pipeline.families: Gemma yes, Llama no)", type=bool)

    def __post_init__(self):
        sets = self.eval_sets.split() if isinstance(self.eval_sets, str) else self.eval_sets
        object.__setattr__(self, "eval_sets", tuple(sets))
        if self.eval_seqlen < 2:
            raise ValueError(f"eval_seqlen={self.eval_seqlen} must be at least 2")
        if self.eval_batch <= 0:
            raise ValueError(f"eval_batch={self.eval_batch} must be positive")
        if self.max_windows is not None and self.max_windows <= 0:
            raise ValueError(f"max_windows={self.max_windows} must be positive (or absent: all windows)")

    def for_protocol(self, protocol) -> Evaluation:
        """A copy with ``bos_per_window`` from the model family's :class:`magr.pipeline.families.WindowProtocol`
        unless set explicitly."""
        return self if self.bos_per_window is not None else replace(self, bos_per_window=protocol.eval_bos)

    def for_model(self, model) -> Evaluation:
        """:meth:`for_protocol` with the protocol of ``model`` (loaded model, config, alias, folder or .gguf)."""
        from ..pipeline.families import window_protocol

        return self if self.bos_per_window is not None else self.for_protocol(window_protocol(model))

    def bos_id(self, tokenizer) -> int | None:
        """The token every window starts with (None: windows as they are); ``bos_per_window`` None counts as
        False (resolve it first with :meth:`for_model`)."""
        if not self.bos_per_window:
            return None
        if tokenizer.bos_token_id is None:
            raise ValueError("bos_per_window=True but the tokenizer has no BOS token; allowed: bos_per_window False")
        return tokenizer.bos_token_id

    def check(self, data_root=None) -> None:
        """Fail before any long work if a set or its offline files are missing."""
        from ..pipeline.data import resolve_source

        for name in self.eval_sets:
            resolve_source(name, data_root)

    def streams(self, tokenizer, data_root=None) -> dict[str, torch.Tensor]:
        """Every set's evaluation tokens, checked against the protocol before any long work: ValueError naming
        the set when its text is shorter than one window; a warning when it has fewer than ``max_windows``."""
        from ..pipeline.data import get_eval_tokens

        out = {}
        for name in self.eval_sets:
            tokens = get_eval_tokens(name, tokenizer, data_root=data_root)
            bos = self.bos_id(tokenizer)
            try:
                n = make_windows(tokens, self.eval_seqlen, bos, self.max_windows).shape[0]
            except ValueError as exc:
                raise ValueError(f"evaluation set {name!r}: {exc}; use a longer text or a smaller eval_seqlen") from None
            if self.max_windows is not None and n < self.max_windows:
                log.warning("evaluation set %r has only %d windows of %d tokens, fewer than max_windows=%d",
                            name, n, self.eval_seqlen, self.max_windows)
            out[name] = tokens
        return out

    def perplexities(self, model, tokenizer, device=None, data_root=None, streams=None,
                     forward_dtype: torch.dtype | None = None, blocks=None) -> dict:
        """{set: {"ppl", "seconds", "seqlen", "max_windows", "windows", "bos_per_window"}} for every set;
        ``streams``: the sets' tokens from :meth:`streams` (default: read and tokenized here); ``bos_per_window``
        None: the protocol of ``model``'s family (:meth:`for_model`);
        ``forward_dtype``: the dtype of the forwards (None: the model's own); ``blocks``: a streamed model
        (``model`` is its skeleton: :func:`perplexity`)."""
        if self.bos_per_window is None:
            return self.for_model(model).perplexities(model, tokenizer, device, data_root, streams, forward_dtype,
                                                      blocks)
        out = {}
        streams = self.streams(tokenizer, data_root) if streams is None else streams
        for name in self.eval_sets:
            t0 = time.perf_counter()
            tokens = streams[name]
            bos = self.bos_id(tokenizer)
            ppl = perplexity(model, tokens, seqlen=self.eval_seqlen, batch_size=self.eval_batch, device=device,
                             max_windows=self.max_windows, bos_id=bos, forward_dtype=forward_dtype, blocks=blocks)
            windows = make_windows(tokens, self.eval_seqlen, bos, self.max_windows).shape[0]
            out[name] = {"ppl": ppl, "seconds": time.perf_counter() - t0, "seqlen": self.eval_seqlen,
                         "max_windows": self.max_windows, "windows": windows, "bos_per_window": self.bos_per_window}
            log.info("%s perplexity: %.4f", name, ppl)
        return out
