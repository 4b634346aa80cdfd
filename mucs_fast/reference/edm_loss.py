"""edm_loss — per-sample weighted denoising loss with the EDM skip/out scalings folded in.

    r[b, i] = c_skip[b]·x_noisy[b, i] + c_out[b]·out[b, i] − target[b, i]
    L[b]    = weight[b] · (1/D) Σ_i r[b, i]²                      (D = C·H·W)

Karras et al. 2022 (EDM), eq. 2 and Table 1; spec/MUCS.md "Per-sample diffusion loss".
- D-form (the net returns D = c_skip·x_noisy + c_out·F itself): c_skip = None (0), c_out = None (1),
  target = x, weight = λ(σ) = (σ² + σ_d²)/(σ·σ_d)².
- F-form (raw network output F): c_skip, c_out from σ, target = x, weight = λ(σ).
- VP/ε-prediction: out = ε_θ, target = ε, weight = 1.

Precision: the accumulation dtype follows `out`: half/bfloat16/float32 → float32 (result float32
[B]), float64 → float64 (for gradcheck); every other input is converted to it first. The op
mucs_fast::edm_loss differentiates `out` only (the engine never needs the others' gradients);
its backward is edm_loss_backward below. Order: torch.sum decides this reference's summation
order; the compiled kernels use the fixed lane order of csrc/core/edm_loss.h.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _residual(
    out: Tensor,
    x_noisy: Optional[Tensor],
    target: Tensor,
    c_skip: Optional[Tensor],
    c_out: Optional[Tensor],
) -> Tensor:
    B = out.shape[0]
    acc = _acc_dtype(out)
    r = out.reshape(B, -1).to(acc)
    if c_out is not None:
        r = c_out.to(acc)[:, None] * r
    if c_skip is not None:
        r = r + c_skip.to(acc)[:, None] * x_noisy.reshape(B, -1).to(acc)
    return r - target.reshape(B, -1).to(acc)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def edm_loss(
    out: Tensor,
    x_noisy: Optional[Tensor],
    target: Tensor,
    c_skip: Optional[Tensor],
    c_out: Optional[Tensor],
    weight: Tensor,
) -> Tensor:
    """L [B]; out, x_noisy, target: [B, ...] of equal shape; c_skip, c_out, weight: [B]."""
    r = _residual(out, x_noisy, target, c_skip, c_out)
    return weight.to(r.dtype) * r.square().mean(1)


def edm_loss_backward(
    grad: Tensor,
    out: Tensor,
    x_noisy: Optional[Tensor],
    target: Tensor,
    c_skip: Optional[Tensor],
    c_out: Optional[Tensor],
    weight: Tensor,
) -> Tensor:
    """∂(Σ_b grad[b]·L[b])/∂out = grad[b]·weight[b]·(2/D)·c_out[b]·r[b, i], shaped and typed like
    out."""
    D = out[0].numel()
    r = _residual(out, x_noisy, target, c_skip, c_out)
    scale = grad.to(r.dtype) * weight.to(r.dtype) * (2.0 / D)
    if c_out is not None:
        scale = scale * c_out.to(r.dtype)
    return (scale[:, None] * r).reshape(out.shape).to(out.dtype)
