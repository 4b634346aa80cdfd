"""Triton kernel of masked_adamw_step_ (launched by mucs_fast/ops/masked_adamw_step.py).

For every element of row k with active[k] (t = step[k], the step number after this update):
    p ← p · (1 − lr·wd);  m ← m + (1 − β1)·(g − m);  v ← β2·v + ((1 − β2)·g)·g
    p ← p − ss_k · (m / (√v / bc2_k + eps)),   ss_k = (1 / (1 − β1^t))·lr,  bc2_k = √(1 − β2^t)
Inactive rows are not touched.

Source: Loshchilov & Hutter 2019, Algorithm 2 (torch.optim.AdamW); reference
mucs_fast/reference/masked_adamw_step.py, C++/CUDA csrc/core/masked_adamw_step.h (same
operations, same order).

Reduction order: none (elementwise). One launch for all K rows: grid (blocks of a row, K); each
program computes its row's bias corrections in float64, β^t by binary exponentiation as the CUDA
kernel does (core::pow_int), so Triton and CUDA C++ give the same bits.

Precision: the scalars (1 − lr·wd, 1 − β1, β2, 1 − β2, eps) arrive as float64 and are rounded once
to the tensors' dtype T (float32 or float64), as PyTorch rounds a Python scalar; the bias
corrections are rounded to T; every elementwise operation is IEEE-rounded in T, no FMA
(kernels/_common.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import LAUNCH, div_rn, f64, on_device, sqrt_rn

BLOCK = 1024


@triton.jit
def _pow_int(base, t):
    """base^t (float64, t ≥ 0) by binary exponentiation, ascending bits, as core::pow_int."""
    r = tl.full([], 1.0, tl.float64)
    while t > 0:
        r = tl.where((t & 1) == 1, r * base, r)
        base = base * base
        t = t >> 1
    return r


@triton.jit
def _masked_adamw_step_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    step_ptr,
    active_ptr,
    P,
    lr: tl.float64,
    beta1: tl.float64,
    beta2: tl.float64,
    decay: tl.float64,
    one_m_b1: tl.float64,
    one_m_b2: tl.float64,
    eps: tl.float64,
    BLOCK: tl.constexpr,
):
    T = p_ptr.dtype.element_ty
    k = tl.program_id(1).to(tl.int64)
    on = tl.load(active_ptr + k) != 0
    t = tl.where(on, tl.load(step_ptr + k), 1)  # inactive rows: no 1/(1 − β^0)
    one = tl.full([], 1.0, tl.float64)
    ss = ((one / (one - _pow_int(f64(beta1), t))) * f64(lr)).to(T)
    bc2 = sqrt_rn(one - _pow_int(f64(beta2), t)).to(T)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < tl.where(on, P, 0)  # an inactive row reads and writes nothing
    row = k * P
    p = tl.load(p_ptr + row + i, mask=mask, other=0.0)
    g = tl.load(g_ptr + row + i, mask=mask, other=0.0)
    m = tl.load(m_ptr + row + i, mask=mask, other=0.0)
    v = tl.load(v_ptr + row + i, mask=mask, other=0.0)
    p1 = p * f64(decay).to(T)
    m1 = m + f64(one_m_b1).to(T) * (g - m)
    v1 = v * f64(beta2).to(T) + f64(one_m_b2).to(T) * g * g
    denom = div_rn(sqrt_rn(v1), bc2) + f64(eps).to(T)
    p2 = p1 - ss * div_rn(m1, denom)
    tl.store(p_ptr + row + i, p2, mask=mask)
    tl.store(m_ptr + row + i, m1, mask=mask)
    tl.store(v_ptr + row + i, v1, mask=mask)


def masked_adamw_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    active: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In place on param, exp_avg, exp_avg_sq [K, ...] (arguments checked by the caller)."""
    K = param.shape[0]
    P = param[0].numel() if K else 0
    if K == 0 or P == 0:
        return
    p, m, v = param.contiguous(), exp_avg.contiguous(), exp_avg_sq.contiguous()
    g, st = grad.contiguous(), step.contiguous()
    act = active.contiguous().view(torch.uint8)  # bool storage, read as bytes
    with on_device(param):
        _masked_adamw_step_kernel[(triton.cdiv(P, BLOCK), K)](
            p,
            g,
            m,
            v,
            st,
            act,
            P,
            float(lr),
            float(beta1),
            float(beta2),
            1.0 - lr * weight_decay,
            1.0 - beta1,
            1.0 - beta2,
            float(eps),
            BLOCK=BLOCK,
            **LAUNCH,
        )
    for dst, src in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
        if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride():
            dst.copy_(src)
