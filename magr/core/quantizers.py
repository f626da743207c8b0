"""Uniform weight grids and round-to-nearest (RTN).

Grid of one row (or one group of ``group_size`` consecutive inputs of a row), asymmetric as in the paper
(Section 5) and the released code, which builds on GPTQ's quantizer:

    xmin = min(min w, 0),  xmax = max(max w, 0)                (the range always contains 0, as GPTQ)
    delta = beta * (xmax - xmin) / (2^b - 1),   z = round(-xmin / delta)
    q = clamp(round(w / delta) + z, 0, 2^b - 1),   w_q = delta * (q - z)

``beta`` < 1 shrinks the step (clipping the largest weights); the released code's values are
:func:`default_beta`. Symmetric grids use xmax = max(|xmin|, xmax), xmin = -xmax and z = 2^(b-1).

Two options make every grid storable in packed checkpoints (:mod:`magr.deploy.export`); both are off by default
because they change the published procedure's results:

- ``clamp_zero``: z = clamp(round(-xmin / delta), 0, 2^b - 1). With beta < 1 a row (or group) of mostly
  negative weights has -xmin / delta > (2^b - 1) / beta, so z can exceed 2^b - 1, which no packed format
  holds (and 0 is then off the grid). With beta = 1, z <= 2^b - 1 always, so the option changes nothing.
- ``fp16_scale``: delta is rounded to float16 (at least float16's smallest normal, 2^-14) before z and the
  codes are computed, so a checkpoint storing float16 scales computes exactly the evaluated weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .settings import setting

SUPPORTED_BITS = (2, 3, 4, 8)


def default_beta(bits: int, group_size: int | None = None) -> float:
    """The released code's beta: 0.8 / 0.9 / 1 for 2 / 3 / 4 bits per channel; g128 -> 0.95, g64 -> 1."""
    if group_size is not None:
        return {128: 0.95, 64: 1.0}.get(group_size, 1.0) if bits <= 3 else 1.0
    return {2: 0.8, 3: 0.9}.get(bits, 1.0)


@dataclass
class QuantParams:
    """Grid parameters: ``scale``/``zero`` have shape (out, n_groups); ``g_idx`` maps input column -> group.

    ``static``: the grids were fixed before quantization (OPTQ's static groups); a refinement keeps them.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int
    g_idx: torch.Tensor  # (in,) long
    static: bool = False

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """scale and zero expanded to one column per input, shape (out, in)."""
        return self.scale[:, self.g_idx], self.zero[:, self.g_idx]

    def cpu(self) -> "QuantParams":
        return QuantParams(self.scale.cpu(), self.zero.cpu(), self.maxq, self.g_idx.cpu(), self.static)


@dataclass(frozen=True)
class Grid:
    """Asymmetric (or symmetric) uniform grid per channel (row) or per group of consecutive inputs."""

    bits: int = setting(4, "weight bits", choices=SUPPORTED_BITS)
    group_size: int | None = setting(None, "inputs per quantization group, e.g. 128 (default: per channel)", type=int)
    sym: bool = setting(False, "symmetric grid (default asymmetric)")
    beta: float = setting(1.0, "step shrink in (0, 1] (default: the method preset's rule, e.g. the released code's "
                                    "0.8 / 0.9 / 1 at 2 / 3 / 4 bits, 0.95 at g128)")
    clamp_zero: bool = setting(False, "clamp zero points to [0, 2^bits - 1] so packed checkpoints can store them "
                                      "(changes grids only when beta < 1)")
    fp16_scale: bool = setting(False, "round scales to float16 before computing codes (what packed checkpoints "
                                      "store)")

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; allowed: {SUPPORTED_BITS}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta={self.beta} must lie in (0, 1]")
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size <= 0):
            raise ValueError(f"group_size={self.group_size} must be a positive integer (or None: per channel)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def check(self, in_features: int) -> None:
        if self.group_size is not None and in_features % self.group_size != 0:
            raise ValueError(
                f"group_size {self.group_size} does not divide in_features {in_features}; "
                f"use a divisor of {in_features} or per channel (no group size)"
            )

    def row_params(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of shape (rows, 1) from each row's own min and max."""
        W = W.float()
        zeros = torch.zeros(W.shape[0], device=W.device)
        xmin = torch.minimum(W.amin(dim=1), zeros)
        xmax = torch.maximum(W.amax(dim=1), zeros)
        if self.sym:
            xmax = torch.maximum(-xmin, xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        flat = (xmin == 0) & (xmax == 0)
        xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
        xmax = torch.where(flat, torch.ones_like(xmax), xmax)
        scale = self.beta * (xmax - xmin) / self.maxq
        if self.fp16_scale:
            scale = scale.clamp(min=2.0**-14).half().float()
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
            if self.clamp_zero:
                zero = zero.clamp(0, self.maxq)
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def params(self, W: torch.Tensor) -> QuantParams:
        """Grid parameters of a whole (out x in) weight: one per row, or one per (row, group)."""
        out, n = W.shape
        self.check(n)
        g = self.group_size or n
        scale, zero = self.row_params(W.reshape(-1, g))
        g_idx = torch.arange(n, device=W.device) // g
        return QuantParams(scale.reshape(out, -1), zero.reshape(out, -1), self.maxq, g_idx)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest grid point: delta * (clamp(round(w / delta) + z, 0, maxq) - z) (broadcasting)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The integer codes q in [0, maxq] of w on the grid (for packing)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq).to(torch.int32)


def rtn(W: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, QuantParams]:
    """Round-to-nearest quantization of a weight (out x in) on its per-row or per-group grid."""
    p = grid.params(W)
    scale, zero = p.columns()
    return quantize(W.float(), scale, zero, p.maxq).to(W.dtype), p


@dataclass(frozen=True)
class RTN:
    """Quantizer step: round to the nearest grid point (no options; the statistics are not used)."""

    name: ClassVar[str] = "rtn"
    uses_statistics: ClassVar[bool] = False

    def __call__(self, W: torch.Tensor, H: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, QuantParams]:
        return rtn(W, grid)
