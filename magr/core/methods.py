"""Methods as compositions: an optional preprocessing step, a quantizer, an optional refinement.

    Q = refine(quantizer(preprocess(W), H), W)        per linear layer, block by block (magr.pipeline.blocks)

A step is a small config dataclass that is also the step's function: ``MagR`` (preprocessing,
weights + statistics -> weights), ``RTN`` / ``OPTQ`` (quantizers, (W, H, grid) -> (Q, grid parameters)),
``CD`` (refinement, (Q, W, H, grid parameters, grid) -> (Q, the grid parameters Q lies on)). The paper's
methods are the named presets in :data:`PRESETS`, the one table that the CLI, the pipeline, the reports and
their labels read. A new method is a new row; MagR in front of another quantizer is a row whose ``quantizer``
is any callable with the quantizer signature.

:class:`QuantConfig` is one run's settings: a preset plus overrides, given as flat names (``bits``,
``group_size``, ``alpha``, ``cd_passes``, ...; :mod:`magr.core.settings`), resolved to explicit values.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass, replace

from .optq import OPTQ
from .preprocessing import MagR
from .quantizers import RTN, Grid, default_beta
from .refinement import CD
from .settings import flat_fields, from_flat

log = logging.getLogger(__name__)


def released_beta(grid: Grid) -> float:
    """beta of the released MagR code for this grid (:func:`magr.core.quantizers.default_beta`)."""
    return default_beta(grid.bits, grid.group_size)


def plain_beta(grid: Grid) -> float:
    """beta = 1: the full range, as the paper's plain RTN and OPTQ rows (the released RTN path's default)."""
    return 1.0


@dataclass(frozen=True)
class Method:
    """A named composition of steps. ``beta`` gives the grid's beta when the run does not set it."""

    label: str  # the paper's name, used in every table and legend
    quantizer: Callable
    preprocess: MagR | None = None
    refine: CD | None = None
    beta: Callable[[Grid], float] = released_beta


PRESETS: dict[str, Method] = {
    "rtn": Method("RTN", RTN(), beta=plain_beta),
    "magr+rtn": Method("MagR+RTN", RTN(), preprocess=MagR()),
    "optq": Method("OPTQ", OPTQ(), beta=plain_beta),
    # the released code always refines MagR+OPTQ by coordinate descent: 1 pass (30 at 2 bits)
    "magr+optq": Method("MagR+OPTQ", OPTQ(), preprocess=MagR(), refine=CD()),
    "magr+optq-cd": Method("MagR+OPTQ†", OPTQ(), preprocess=MagR(), refine=CD(passes=30)),
}
"""The paper's five methods. Keys are the ``method`` setting; order is the tables' order. The plain baselines
use beta 1; the MagR methods the released code's beta table (0.8 / 0.9 / 1 at 2 / 3 / 4 bits per channel)."""

STEP_CLASSES = (Grid, MagR, OPTQ, CD)


@dataclass(frozen=True)
class QuantConfig:
    """One run's explicit settings: the method's steps with every default filled in."""

    method: str
    grid: Grid
    quantizer: Callable
    preprocess: MagR | None = None
    refine: CD | None = None
    true_sequential: bool = True

    @classmethod
    def build(cls, method: str = "magr+optq", true_sequential: bool = True, **settings) -> "QuantConfig":
        """The preset ``method`` with ``settings`` (flat names) applied and every default resolved.

        Settings of a step the method does not have (alpha for RTN, say) are ignored, so one common set
        can serve every cell; an unknown name is an error.
        """
        if method not in PRESETS:
            raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(PRESETS)}")
        known = setting_names()
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; allowed: method, true_sequential, "
                             f"{', '.join(known)}")
        # None means "the default" for settings whose default is not None (beta None: the preset's rule)
        settings = {k: v for k, v in settings.items() if v is not None or known[k].default is None}
        preset = PRESETS[method]
        grid = from_flat(Grid, settings)
        if settings.get("beta") is None:
            grid = replace(grid, beta=preset.beta(grid))

        def step(obj):
            if obj is None:
                return None
            obj = from_flat(type(obj), settings, base=obj) if flat_fields(type(obj)) else obj
            return obj.resolved(grid) if hasattr(obj, "resolved") else obj

        ignored = [k for k in settings if not _belongs(k, preset) and settings[k] is not None]
        if ignored:
            log.debug("method %s has no step for %s; ignored", method, ", ".join(ignored))
        return cls(method, grid, step(preset.quantizer), step(preset.preprocess), step(preset.refine),
                   bool(true_sequential))

    @property
    def label(self) -> str:
        return PRESETS[self.method].label

    @property
    def uses_calibration(self) -> bool:
        """Whether any step reads the calibration statistics (RTN alone does not: it needs no data)."""
        return (self.preprocess is not None or self.refine is not None
                or getattr(self.quantizer, "uses_statistics", True))

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """The config that :meth:`to_dict` described (run metadata's "config")."""
        preset = PRESETS[d["method"]]
        settings = dict(d["grid"])
        for key in ("preprocess", "quantizer", "refine"):
            step, template = d.get(key), getattr(preset, key)
            if step and template is not None:
                settings.update({k: step[f.name] for k, f in flat_fields(type(template)).items() if f.name in step})
        return cls.build(method=d["method"], true_sequential=d["true_sequential"], **settings)

    def to_dict(self) -> dict:
        """Nested description for run metadata: method, label, grid and each step's settings."""
        def step(obj):
            if obj is None:
                return None
            name = getattr(obj, "name", None) or getattr(obj, "__name__", type(obj).__name__.lower())
            return {"name": name, **(asdict(obj) if is_dataclass(obj) else {})}

        return {"method": self.method, "label": self.label, "grid": asdict(self.grid),
                "preprocess": step(self.preprocess), "quantizer": step(self.quantizer),
                "refine": step(self.refine), "true_sequential": self.true_sequential,
                "uses_calibration": self.uses_calibration}

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def setting_names() -> dict[str, object]:
    """Flat name -> field of every algorithm setting (grid and steps)."""
    out: dict = {}
    for cls in STEP_CLASSES:
        out.update(flat_fields(cls))
    return out


def _belongs(name: str, preset: Method) -> bool:
    steps = [Grid] + [type(s) for s in (preset.quantizer, preset.preprocess, preset.refine) if s is not None]
    return any(name in flat_fields(cls) for cls in steps)
