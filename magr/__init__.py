"""magr: MagR weight magnitude reduction (Zhang et al., NeurIPS 2024) with RTN / OPTQ quantization.

A method is a composition of steps (magr.methods): MagR (preprocessing), RTN or OPTQ (quantizer), CD
(refinement); ``QuantConfig.build(method=..., **settings)`` gives one run's settings and
``quantize_model`` applies them block by block.
"""
from .calibration_data import Calibration
from .evaluation import Evaluation
from .fista import FAST_ITERS, fast_iters_matching, magr_fista
from .methods import PRESETS, Method, QuantConfig
from .optq import OPTQ, optq
from .pipeline import QuantResult, quantize_model
from .preprocessing import MagR
from .projection import l1_threshold, linf_norms, project_l1_ball, prox_linf
from .quantizers import RTN, Grid, QuantParams, default_beta, quantize, rtn
from .refinement import CD, cd_objective, cd_refine
from .solver import MagrInfo, lambda_max, magr_ista, magr_objective

__version__ = "0.1.0"

__all__ = [
    "MagR", "RTN", "OPTQ", "CD", "Grid", "Method", "PRESETS", "QuantConfig", "Calibration", "Evaluation",
    "quantize_model", "QuantResult",
    "project_l1_ball", "prox_linf", "l1_threshold", "linf_norms",
    "magr_ista", "magr_fista", "fast_iters_matching", "FAST_ITERS", "magr_objective", "lambda_max", "MagrInfo",
    "QuantParams", "quantize", "rtn", "default_beta", "cd_refine", "cd_objective", "optq",
]
