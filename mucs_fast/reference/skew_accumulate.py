"""skew_accumulate — the noise-consistent skew of MUCS, summed over the shared noise samples.

    S[k, n] = Σ_m f(L_u[k, n, m], L_t[n, m]),
    f(u, t) = (u − t) / (u + t + eps)   (use_ratio = True, the MUCS score)
            = u − t                      (use_ratio = False, the "difference" ablation)

Serrà et al. 2026, spec/MUCS.md "Score": score[k, n] = S[k, n] / M. Returning the sum (not the
mean) lets callers accumulate over chunks of noises.

Precision: f and the sum in float32 (float64 for float64 loss_u); loss_t is converted to that dtype.
Order: torch.sum decides this reference's summation order; the compiled kernels (csrc/core/
skew_accumulate.h) add f in ascending m, one thread per (k, n), so they agree with it to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def skew_accumulate(
    loss_u: Tensor, loss_t: Tensor, eps: float = 1e-3, use_ratio: bool = True
) -> Tensor:
    """loss_u [K, n, M], loss_t [n, M] → S [K, n], float32 (float64 for float64 loss_u)."""
    acc = torch.float64 if loss_u.dtype == torch.float64 else torch.float32
    u = loss_u.to(acc)
    t = loss_t.to(acc).unsqueeze(0)
    f = (u - t) / (u + t + eps) if use_ratio else u - t
    return f.sum(-1)
