"""Triton kernels of edm_loss and edm_loss_backward (launched by mucs_fast/ops/edm_loss.py).

    r[b, i] = c_skip[b]·x_noisy[b, i] + c_out[b]·out[b, i] − target[b, i]
    L[b]    = weight[b] · (1/D) Σ_i r[b, i]²                     (D = C·H·W)
    ∂L[b]/∂out[b, i] = weight[b] · (2/D) · c_out[b] · r[b, i]

Source: Karras et al. 2022 (EDM), eq. 2 and Table 1; spec/MUCS.md "Per-sample diffusion loss";
reference mucs_fast/reference/edm_loss.py, C++/CUDA csrc/core/edm_loss.h (same operand order:
c_out·out, then + c_skip·x_noisy, then − target).

Reduction order: the one of the C++ and CUDA kernels (csrc/core/common.h), so all three give the
same bits: one program per row, LANES = 256 interleaved lanes (lane l adds r² for i = l, l + 256,
... in ascending order), then the fixed pairwise tree lane[l] += lane[l + s], s = 128, ..., 1
(a [2, s] reshape summed over its first axis is exactly that step). No atomics.

Precision: every input is read in its dtype and converted to Acc = float32 (float64 for float64
out); all arithmetic in Acc, IEEE-rounded, no FMA (kernels/_common.py); L stored in Acc, the
gradient rounded once to out's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import LAUNCH, acc_dtype, div_rn, on_device, round_to, rows, tl_dtype

LANES = 256  # = core::kEdmLanes: the reduction order is part of the result
BACKWARD_BLOCK = 1024


@triton.jit
def _lane_tree_sum(acc):
    """Σ of 256 lanes by the fixed tree of core::lane_tree_sum."""
    s = tl.sum(tl.reshape(acc, [2, 128]), axis=0)
    s = tl.sum(tl.reshape(s, [2, 64]), axis=0)
    s = tl.sum(tl.reshape(s, [2, 32]), axis=0)
    s = tl.sum(tl.reshape(s, [2, 16]), axis=0)
    s = tl.sum(tl.reshape(s, [2, 8]), axis=0)
    s = tl.sum(tl.reshape(s, [2, 4]), axis=0)
    s = tl.sum(tl.reshape(s, [2, 2]), axis=0)
    return tl.sum(s, axis=0)


@triton.jit
def _scalars(
    b,
    c_skip_ptr,
    c_skip_s,
    c_out_ptr,
    c_out_s,
    SKIP: tl.constexpr,
    HAS_C_OUT: tl.constexpr,
    ACC: tl.constexpr,
):
    cs = tl.full([], 0.0, ACC)
    co = tl.full([], 1.0, ACC)
    if SKIP:
        cs = tl.load(c_skip_ptr + b * c_skip_s).to(ACC)
    if HAS_C_OUT:
        co = tl.load(c_out_ptr + b * c_out_s).to(ACC)
    return cs, co


@triton.jit
def _residual(out_ptr, x_ptr, target_ptr, i, mask, cs, co, SKIP: tl.constexpr, ACC: tl.constexpr):
    r = co * tl.load(out_ptr + i, mask=mask, other=0.0).to(ACC)
    if SKIP:
        r = r + cs * tl.load(x_ptr + i, mask=mask, other=0.0).to(ACC)
    return r - tl.load(target_ptr + i, mask=mask, other=0.0).to(ACC)


@triton.jit
def _edm_loss_kernel(
    loss_ptr,
    out_ptr,
    out_rs,
    x_ptr,
    x_rs,
    target_ptr,
    target_rs,
    c_skip_ptr,
    c_skip_s,
    c_out_ptr,
    c_out_s,
    weight_ptr,
    weight_s,
    D,
    SKIP: tl.constexpr,
    HAS_C_OUT: tl.constexpr,
    ACC: tl.constexpr,
    LANES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cs, co = _scalars(b, c_skip_ptr, c_skip_s, c_out_ptr, c_out_s, SKIP, HAS_C_OUT, ACC)
    w = tl.load(weight_ptr + b * weight_s).to(ACC)
    lanes = tl.arange(0, LANES)
    acc = tl.zeros([LANES], ACC)
    for i0 in range(0, D, LANES):
        i = i0 + lanes
        mask = i < D
        r = _residual(
            out_ptr + b * out_rs,
            x_ptr + b * x_rs,
            target_ptr + b * target_rs,
            i,
            mask,
            cs,
            co,
            SKIP,
            ACC,
        )
        acc = acc + tl.where(mask, r * r, 0.0)
    total = _lane_tree_sum(acc)
    tl.store(loss_ptr + b, w * div_rn(total, tl.cast(D, ACC)))


@triton.jit
def _edm_loss_backward_kernel(
    grad_out_ptr,
    grad_ptr,
    grad_s,
    out_ptr,
    out_rs,
    x_ptr,
    x_rs,
    target_ptr,
    target_rs,
    c_skip_ptr,
    c_skip_s,
    c_out_ptr,
    c_out_s,
    weight_ptr,
    weight_s,
    D,
    SKIP: tl.constexpr,
    HAS_C_OUT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cs, co = _scalars(b, c_skip_ptr, c_skip_s, c_out_ptr, c_out_s, SKIP, HAS_C_OUT, ACC)
    two_over_d = (tl.full([], 2.0, tl.float64) / tl.cast(D, tl.float64)).to(ACC)
    g = tl.load(grad_ptr + b * grad_s).to(ACC)
    w = tl.load(weight_ptr + b * weight_s).to(ACC)
    scale = g * w * two_over_d * co  # ((grad·weight)·(2/D))·c_out, as core::edm_loss_grad_scale
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < D
    r = _residual(
        out_ptr + b * out_rs,
        x_ptr + b * x_rs,
        target_ptr + b * target_rs,
        i,
        mask,
        cs,
        co,
        SKIP,
        ACC,
    )
    tl.store(
        grad_out_ptr + b * D + i, round_to(scale * r, grad_out_ptr.dtype.element_ty), mask=mask
    )


def _prepare(out, x_noisy, target, c_skip, c_out, weight):
    B = out.shape[0]
    D = out[0].numel() if B else int(torch.Size(out.shape[1:]).numel())
    o, t = rows(out, B, D), rows(target, B, D)
    skip = c_skip is not None
    x = rows(x_noisy, B, D) if skip else o
    vec = (c_skip if skip else weight, c_out if c_out is not None else weight, weight)
    args = (o, o.stride(0), x, x.stride(0), t, t.stride(0))
    for v in vec:
        args += (v, v.stride(0))
    meta = dict(SKIP=skip, HAS_C_OUT=c_out is not None, ACC=tl_dtype(acc_dtype(out.dtype)))
    return B, D, args, meta


def edm_loss(
    out: Tensor,
    x_noisy: Optional[Tensor],
    target: Tensor,
    c_skip: Optional[Tensor],
    c_out: Optional[Tensor],
    weight: Tensor,
) -> Tensor:
    """L [B] in Acc (arguments checked by the caller, mucs_fast.ops)."""
    B, D, args, meta = _prepare(out, x_noisy, target, c_skip, c_out, weight)
    loss = torch.empty(B, dtype=acc_dtype(out.dtype), device=out.device)
    if B:
        with on_device(out):
            _edm_loss_kernel[(B,)](loss, *args, D, LANES=LANES, **meta, **LAUNCH)
    return loss


def edm_loss_backward(
    grad: Tensor,
    out: Tensor,
    x_noisy: Optional[Tensor],
    target: Tensor,
    c_skip: Optional[Tensor],
    c_out: Optional[Tensor],
    weight: Tensor,
) -> Tensor:
    """∂(Σ_b grad[b]·L[b])/∂out, contiguous, in out's dtype (arguments checked by the caller)."""
    B, D, args, meta = _prepare(out, x_noisy, target, c_skip, c_out, weight)
    grad_out = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if B and D:
        block = min(BACKWARD_BLOCK, triton.next_power_of_2(D))
        grid = (B, triton.cdiv(D, block))
        with on_device(out):
            _edm_loss_backward_kernel[grid](
                grad_out, grad, grad.stride(0), *args, D, BLOCK=block, **meta, **LAUNCH
            )
    return grad_out
