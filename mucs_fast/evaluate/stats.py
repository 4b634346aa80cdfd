"""The statistics of the counterfactual protocol (spec/EVALUATION.md), computed as the reference's
`eval.py` computes them.

For one metric, `sim_m` are the pre-vs-post similarities of the images whose model was retrained
without method m's top-k union, `sim_r` the same after random removal (higher = more alike).

- AUC = ROC AUC with the method's images as class 0 and random's as class 1, scored by similarity:
  P(sim_random > sim_method) (+ ½ P(tie)). 0.5: no better than random; higher is better.
- Ratio = mean_i 100·(sim_m,i / max(median(sim_r), 0.01) − 1) %, with the interval
  1.98·std(r)/√n (std with Bessel's correction). More negative is better. For negated distances
  (the reference's formula breaks there: a negative median is clamped to 0.01) the same quantity is
  taken on the distance d = −sim with the sign flipped so that "more negative = changed more"
  still holds: 100·(median(d_r) − d_m,i) / max(median(d_r), 0.01). Both read as "% less similar
  than after random removal", and both are 0 when the method's and random's images agree.
- p-values: Mann–Whitney U. Targets: one-sided, alternative "less" (the method's similarities are
  stochastically smaller than the other's); controls: two-sided.
- Overlap of top-k sets A, B: |A ∩ B| / min(|A|, |B|).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import torch

CI_FACTOR = 1.98  # the reference's 95 % factor (t-quantile for n ≈ 100)


def _np(x) -> np.ndarray:
    return torch.as_tensor(x).detach().double().cpu().numpy().reshape(-1)


def auc(sim_method, sim_random) -> float:
    """P(sim_random > sim_method) as a ROC AUC (sklearn's roc_auc_score); 0.5 = random."""
    from sklearn.metrics import roc_auc_score

    m, r = _np(sim_method), _np(sim_random)
    if m.size == 0 or r.size == 0:
        return math.nan
    y_true = np.concatenate([np.zeros(m.size), np.ones(r.size)])
    return float(roc_auc_score(y_true, np.concatenate([m, r])))


def ratio(sim_method, sim_random, distance: bool = False) -> tuple[float, float]:
    """(mean Ratio %, 1.98·std/√n) of the method's similarities against random's median."""
    m, r = _np(sim_method), _np(sim_random)
    if m.size == 0 or r.size == 0:
        return math.nan, math.nan
    if distance:
        d_m, med = -m, float(np.median(-r))
        vals = 100.0 * (med - d_m) / max(med, 0.01)
    else:
        vals = 100.0 * (m / max(float(np.median(r)), 0.01) - 1.0)
    ci = (
        CI_FACTOR * float(np.std(vals, ddof=1)) / math.sqrt(vals.size)
        if vals.size > 1
        else math.nan
    )
    return float(np.mean(vals)), ci


def mannwhitney_p(sim_method, sim_other, alternative: str) -> float:
    """Mann–Whitney U p-value; NaN when undefined (an empty group)."""
    from scipy import stats

    a, b = _np(sim_method), _np(sim_other)
    if a.size == 0 or b.size == 0:
        return math.nan
    if np.unique(np.concatenate([a, b])).size == 1:
        return 1.0 if alternative == "two-sided" else 0.5  # all values tied: no evidence either way
    return float(stats.mannwhitneyu(a, b, alternative=alternative).pvalue)


def group_stats(sim_method, sim_random, distance: bool, group: str) -> dict:
    """{"auc", "ratio", "ratio_ci", "p", "n"} of one method, metric and group
    ("targets"/"controls")."""
    r, ci = ratio(sim_method, sim_random, distance)
    alt = "less" if group == "targets" else "two-sided"
    return {
        "auc": auc(sim_method, sim_random),
        "ratio": r,
        "ratio_ci": ci,
        "p": mannwhitney_p(sim_method, sim_random, alt),
        "n": int(_np(sim_method).size),
    }


def overlap(a: Iterable[int], b: Iterable[int]) -> float:
    a, b = set(int(v) for v in a), set(int(v) for v in b)
    if not a or not b:
        return math.nan
    return len(a & b) / min(len(a), len(b))


def mean_ci(vals: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in vals if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    ci = CI_FACTOR * float(np.std(v, ddof=1)) / math.sqrt(v.size) if v.size > 1 else math.nan
    return float(v.mean()), ci


def within_overlaps(topk: torch.Tensor) -> list[float]:
    """Overlaps of every pair of targets' top-k sets (rows of topk [K, k])."""
    rows = [set(r.tolist()) for r in torch.as_tensor(topk)]
    return [overlap(a, b) for a, b in itertools.combinations(rows, 2)]


def cross_overlaps(topk_a: torch.Tensor, topk_b: torch.Tensor) -> list[float]:
    """Per target k: overlap of method a's and method b's top-k sets."""
    return [
        overlap(a.tolist(), b.tolist())
        for a, b in zip(torch.as_tensor(topk_a), torch.as_tensor(topk_b))
    ]


def union(topk: torch.Tensor) -> torch.Tensor:
    """Sorted unique training ids of all rows of topk [K, k]."""
    return torch.unique(torch.as_tensor(topk).reshape(-1))


def rank_average(
    score_list: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None
) -> torch.Tensor:
    """Rank-average ensemble of several [K, N] score matrices: each row is turned into ranks
    normalized to [0, 1] (the highest score → 1; ties get their average rank), then averaged."""
    from scipy.stats import rankdata

    if not score_list:
        raise ValueError("rank_average: no score matrices")
    shape = tuple(score_list[0].shape)
    for s in score_list:
        if tuple(s.shape) != shape:
            raise ValueError(f"rank_average: shapes differ: {shape} vs {tuple(s.shape)}")
    weights = [1.0] * len(score_list) if weights is None else list(weights)
    N = shape[1]
    acc = np.zeros(shape, dtype=np.float64)
    for w, s in zip(weights, score_list):
        r = rankdata(torch.as_tensor(s).double().numpy(), axis=1, method="average")
        acc += w * (r - 1) / max(N - 1, 1)
    return torch.from_numpy(acc / sum(weights)).float()
