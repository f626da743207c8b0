"""magr: MagR weight magnitude reduction (Zhang et al., NeurIPS 2024) with RTN / OPTQ quantization."""
from .optq import optq
from .projection import l1_threshold, linf_norms, project_l1_ball, prox_linf
from .quantizers import (
    QuantParams,
    Quantizer,
    cd_objective,
    cd_refine,
    default_beta,
    quantize,
    rtn,
)
from .solver import (
    FAST_ITERS,
    MagrInfo,
    fast_iters_matching,
    lambda_max,
    magr_objective,
    magr_preprocess,
    magr_preprocess_fast,
    magr_preprocess_group,
)

__version__ = "0.1.0"

__all__ = [
    "project_l1_ball", "prox_linf", "l1_threshold", "linf_norms",
    "magr_preprocess", "magr_preprocess_fast", "magr_preprocess_group", "fast_iters_matching", "FAST_ITERS",
    "magr_objective", "lambda_max", "MagrInfo",
    "Quantizer", "QuantParams", "quantize", "rtn", "default_beta", "cd_refine", "cd_objective",
    "optq",
]
