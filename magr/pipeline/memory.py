"""How much memory a streamed run needs, from the model's shapes alone (README "Models larger than memory").

A streamed run (:mod:`magr.pipeline.streaming`) holds, besides the Python / torch runtime:

- host: the resident tensors (embeddings, lm_head unless tied, final norm) in the model's dtype, and at most two
  blocks' tensors read from disk (the open block and the prefetched next one);
- compute device: the open block in the model's dtype; the method's float32 working set on the largest group of
  layers sharing an input (:data:`WORKING_SET`: copies of the group's weights and of its H = X^T X, measured); the
  calibration
  activations, block inputs and outputs, nsamples x seqlen x hidden each in the forward dtype; one forward batch's
  MLP intermediates; and for perplexity every window's hidden states (inputs and outputs of a block).

On a CPU run host and device are one memory: the sum.
"""
from __future__ import annotations

import ctypes
import logging
import sys

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shapes:
    """The shapes of a Llama-family decoder that decide its memory (a transformers config's fields)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def of(cls, config) -> Shapes:
        """From a transformers config (or any object with its attribute names)."""
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def block_params(self) -> int:
        """q, o (hidden x hidden), k, v (kv_width x hidden), gate, up, down (hidden x intermediate), two norms."""
        h, f = self.hidden, self.intermediate
        return 2 * h * h + 2 * self.kv_width * h + 3 * h * f + 2 * h

    @property
    def resident_params(self) -> int:
        """Embeddings, lm_head (unless tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.resident_params


#: Per method, the float32 working set of one layer group's quantization as (copies of the group's weights,
#: copies of its n x n H): the peak above the call's start of ``magr.pipeline.blocks.quantize_group`` fitted on two
#: shapes (``python benchmarks/layer_memory.py``, CPU, one thread; benchmarks/NOTES.md "Memory of one layer"),
#: rounded up, plus the layer statistics in H's column (H and H_last; none for RTN); MagR by the larger of its fista
#: (tf32) and spg (bf16, the profiles') solvers, spg's. MagR's iterates, step memory and projections are most of the
#: weights' copies; OPTQ holds two n x n matrices besides H at once, three with act-order (measured with and without;
#: its entry is act-order's). Measured on float32 layers: a half-precision weight adds its float32 copy (one of a).
WORKING_SET = {"rtn": (5, 1), "optq": (4, 5), "magr+rtn": (20, 6), "magr+optq": (20, 6), "magr+optq-cd": (20, 6)}


def working_set_bytes(s: Shapes, method: str = "magr+optq", weight_bytes: int = 4) -> int:
    """The method's float32 working set on the largest group of layers sharing an input (:data:`WORKING_SET`), for
    weights of ``weight_bytes`` (under 4: one more copy, their float32 conversion)."""
    if method not in WORKING_SET:
        raise ValueError(f"method {method!r} has no measured working set; allowed: {', '.join(WORKING_SET)}")
    a, b = WORKING_SET[method]
    a += 1 if weight_bytes < 4 else 0
    h, f, kv = s.hidden, s.intermediate, s.kv_width
    groups = [(h * (h + 2 * kv), h), (h * h, h), (2 * h * f, h), (h * f, f)]  # (weights, inputs) of q/k/v, o, gate/up, down
    return max(4 * a * w + 4 * b * n * n for w, n in groups)


def streaming_memory(s: Shapes, nsamples: int = 128, seqlen: int = 2048, dtype_bytes: int = 2,
                     forward_bytes: int = 2, eval_windows: int = 256, eval_seqlen: int = 2048,
                     forward_batch: int = 8, method: str = "magr+optq") -> dict[str, int]:
    """Bytes a streamed run needs (module docstring): ``host`` and ``device`` for quantization on a GPU,
    ``calibration`` (the block inputs and outputs, included in ``device``), ``eval`` (perplexity's hidden
    states, device), ``cpu`` (a CPU run: the larger of quantization and evaluation, all in one memory), and the
    model's parts: ``model``, ``block``, ``resident``."""
    block, resident = s.block_params * dtype_bytes, s.resident_params * dtype_bytes
    calibration = 2 * nsamples * seqlen * s.hidden * forward_bytes
    intermediates = 3 * forward_batch * seqlen * s.intermediate * forward_bytes
    device = block + working_set_bytes(s, method, dtype_bytes) + calibration + intermediates
    evaluation = 2 * eval_windows * eval_seqlen * s.hidden * forward_bytes
    logits = eval_seqlen * s.vocab * 4
    host = resident + 2 * block
    return {"model": s.params * dtype_bytes, "block": block, "resident": resident, "host": host,
            "calibration": calibration, "device": device, "eval": evaluation + logits + block,
            "cpu": host + max(device - block, evaluation + logits)}


#: The published configs' shapes of the paper's models (config.json of meta-llama/Llama-2-*-hf).
LLAMA2 = {"7B": Shapes(4096, 11008, 32, 32, 32, 32000), "13B": Shapes(5120, 13824, 40, 40, 40, 32000),
          "70B": Shapes(8192, 28672, 80, 64, 8, 32000)}


def memory_table(models: dict[str, Shapes] = LLAMA2, **protocol) -> str:
    """The README's table: per model, the streamed run's memory in GiB under ``protocol`` (the keywords of
    :func:`streaming_memory`; default the paper's: MagR+OPTQ, float16, 128 x 2048 calibration tokens, 256 x 2048
    C4 evaluation windows)."""
    header = ("| model | weights | one block | resident (embeddings, lm_head) | host (GPU run) | calibration "
              "activations (in + out) | device: quantization | device: perplexity | a CPU run, in all |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, s in models.items():
        m = {k: v / GIB for k, v in streaming_memory(s, **protocol).items()}
        rows.append(f"| {name} | {m['model']:.1f} | {m['block']:.2f} | {m['resident']:.2f} | {m['host']:.2f} | "
                    f"{m['calibration']:.2f} | {m['device']:.2f} | {m['eval']:.2f} | {m['cpu']:.1f} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------- the allocator
log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
STEADY_MMAP_BYTES = 1 << 20                   # buffers from 1 MiB up get their own mmap, given back when freed
STEADY_FROM_BLOCK_BYTES = 256 << 20           # streamed models whose largest block is at least this


def steady_allocator(nbytes: int = STEADY_MMAP_BYTES) -> bool:
    """Have glibc's malloc serve every buffer of ``nbytes`` or more with its own mmap and return freed memory above
    ``nbytes`` to the system (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD, as MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ would at start). Setting them also stops glibc from raising its mmap threshold each time
    a large buffer is freed: with that dynamic threshold the block-sized buffers of a streamed run came from the
    heap and its peak crept up block after block (7B-shaped OPTQ, 10 blocks, one thread: 6.34 -> 6.67 GiB; with
    these settings 6.25 GiB flat; benchmarks/NOTES.md). Allocation only, no arithmetic changes (torch aligns its
    buffers itself). Returns False where malloc is not glibc's (macOS, musl): nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1 and libc.mallopt(M_TRIM_THRESHOLD, int(nbytes)) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        log.info("allocator: buffers of %d bytes or more are mmapped and given back when freed", nbytes)
    return ok
