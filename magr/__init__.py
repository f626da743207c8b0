"""magr: MagR weight magnitude reduction (Zhang et al., NeurIPS 2024) with RTN / OPTQ quantization.

Layout (each sub-package's docstring says what it holds and may import; tests/test_layout.py checks it):
core (the math) <- pipeline (the run) <- evaluation, deploy <- runs (whole jobs) <- reproduction <- cli.

A method is a composition of steps (magr.core.methods): MagR (preprocessing), RTN or OPTQ (quantizer), CD
(refinement); ``QuantConfig.build(method=..., **settings)`` gives one run's settings and
``quantize_model`` applies them block by block.
"""
# the math
from .core.fista import FAST_ITERS, fast_iters_matching, magr_fista
from .core.methods import PRESETS, Method, QuantConfig
from .core.optq import OPTQ, optq
from .core.preprocessing import MagR
from .core.projection import l1_threshold, linf_norms, project_l1_ball, prox_linf
from .core.quantizers import RTN, Grid, QuantParams, default_beta, quantize, rtn
from .core.refinement import CD, cd_objective, cd_refine
from .core.solver import MagrInfo, lambda_max, magr_ista, magr_objective
# the run, its evaluation, and whole jobs
from .pipeline.blocks import QuantResult, quantize_model
from .pipeline.calibration_data import Calibration
from .evaluation.perplexity import Evaluation
from .runs import perplexity_run, quantize_run

__version__ = "0.1.0"

__all__ = [
    "MagR", "RTN", "OPTQ", "CD", "Grid", "Method", "PRESETS", "QuantConfig", "Calibration", "Evaluation",
    "quantize_model", "QuantResult", "quantize_run", "perplexity_run",
    "project_l1_ball", "prox_linf", "l1_threshold", "linf_norms",
    "magr_ista", "magr_fista", "fast_iters_matching", "FAST_ITERS", "magr_objective", "lambda_max", "MagrInfo",
    "QuantParams", "quantize", "rtn", "default_beta", "cd_refine", "cd_objective", "optq",
]
