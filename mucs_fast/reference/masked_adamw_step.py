"""masked_adamw_step — one AdamW step over K stacked weight sets, each target on its own clock.

For every tensor p [K, ...] with gradient g, moments m, v and every target k with active[k]
(Loshchilov & Hutter 2019, Algorithm 2; the update of torch.optim.AdamW, decoupled weight decay):

    p_k ← p_k · (1 − lr·wd)
    m_k ← m_k + (1 − β1)·(g_k − m_k)
    v_k ← β2·v_k + (1 − β2)·g_k²
    p_k ← p_k − (lr / (1 − β1^t_k)) · m_k / (√v_k / √(1 − β2^t_k) + eps)

with t_k = step[k] (the step number after this update, ≥ 1). Targets with active[k] = False are
left untouched (p, m, v): a target that met its stop rule, its cap or a NaN freezes while the
others go on: the mask and the per-target step clock are what this op adds to AdamW (named
`bounded_adamw_step` before 2026-12-03; the bound of MUCS, the clamp at L_null, lives in the
objective, `unlearn.mirrored_objective`, not in the step).

Precision: the bias corrections are computed in float64 per target and rounded to the tensor
dtype; the elementwise update runs in the tensors' dtype (float32), in the order written above,
every operation correctly rounded. √v goes through float64 for float32 tensors: torch.sqrt on the
CPU is not correctly rounded (MKL/SLEEF, off by 1 ulp for ~16 % of float32 inputs, depending on the
build and the CPU), whereas sqrt in float64 rounded to float32 is (double rounding is innocuous for
√ when 53 ≥ 2·24 + 2), so the compiled kernels (IEEE sqrt) can match these bits on every machine.
float64 tensors use torch.sqrt (within 1 ulp).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def bias_corrections(step: Tensor, lr: float, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """(step_size [K], √(1 − β2^t) [K]) in float64."""
    t = step.to(torch.float64)
    step_size = lr / (1 - beta1**t)
    bc2_sqrt = (1 - beta2**t).sqrt()
    return step_size, bc2_sqrt


def _sqrt_rn(v: Tensor) -> Tensor:
    """√v correctly rounded for float32 (and half types); torch.sqrt for float64."""
    return v.sqrt() if v.dtype == torch.float64 else v.double().sqrt().to(v.dtype)


@torch.no_grad()
def masked_adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    step: Tensor,
    active: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In place. params/grads/exp_avgs/exp_avg_sqs: lists of [K, ...] tensors; step: int [K];
    active: bool [K]."""
    step_size, bc2_sqrt = bias_corrections(step, lr, beta1, beta2)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        shape = (-1,) + (1,) * (p.dim() - 1)
        a = active.to(p.device).view(shape)
        ss = step_size.to(p.device, p.dtype).view(shape)
        b2 = bc2_sqrt.to(p.device, p.dtype).view(shape)
        p_new = p * (1 - lr * weight_decay)
        m_new = m + (1 - beta1) * (g - m)
        v_new = v * beta2 + (1 - beta2) * g * g
        p_new = p_new - ss * (m_new / (_sqrt_rn(v_new) / b2 + eps))
        p.copy_(torch.where(a, p_new, p))
        m.copy_(torch.where(a, m_new, m))
        v.copy_(torch.where(a, v_new, v))
