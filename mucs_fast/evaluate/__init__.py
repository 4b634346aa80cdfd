"""The counterfactual evaluation of attribution methods (spec/EVALUATION.md).

    from mucs_fast.evaluate import EvalConfig, evaluate, quick_config
    results = evaluate("eval_out", EvalConfig(seeds=(0, 1, 2)))   # results.json's dict

Methods: `METHODS` (name → fn(ctx, targets, target_labels) -> scores [K, N]), `get_method`
(also "ensemble:a+b" and "center:m"), `register_method`. Metrics: `metrics.METRICS`; statistics:
`stats`. Nothing here runs at import time.
"""

from .methods import METHODS, MethodContext, check_method, get_method, register_method
from .metrics import DEFAULT_METRICS, METRICS, compute_metrics, ssim
from .pipeline import (
    PHASES,
    QUICK,
    EvalConfig,
    StopEvaluation,
    evaluate,
    quick_config,
    summarize,
    topk_of,
)

__all__ = [
    "DEFAULT_METRICS",
    "METHODS",
    "METRICS",
    "PHASES",
    "QUICK",
    "EvalConfig",
    "MethodContext",
    "StopEvaluation",
    "check_method",
    "compute_metrics",
    "evaluate",
    "get_method",
    "quick_config",
    "register_method",
    "ssim",
    "summarize",
    "topk_of",
]
