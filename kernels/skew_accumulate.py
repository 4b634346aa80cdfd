"""Triton kernel of skew_accumulate (launched by mucs_fast/ops/skew_accumulate.py).

    S[k, n] = Σ_m f(L_u[k, n, m], L_t[n, m]),   f(u, t) = (u − t) / (u + t + eps)   (or u − t)

Source: Serrà et al. 2026 (arXiv 2605.17938), spec/MUCS.md "Score": score = S / M; reference
mucs_fast/reference/skew_accumulate.py, C++/CUDA csrc/core/skew_accumulate.h (same operand order:
(u + t) + eps).

Reduction order: the one of the C++ and CUDA kernels, so all three give the same bits: each (k, n)
row adds f over m = 0, 1, ..., M − 1 in ascending order (a program holds ROWS rows side by side and
walks m; consecutive m of a row share cache lines). No atomics.

Precision: loss_u and loss_t are read in their dtypes and converted to Acc = float32 (float64 for
float64 loss_u); f and the sum in Acc, IEEE-rounded, no FMA (kernels/_common.py); S stored in Acc.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import LAUNCH, acc_dtype, div_rn, f64, on_device, tl_dtype

ROWS = 128


@triton.jit
def _skew_accumulate_kernel(
    S_ptr,
    u_ptr,
    u_ks,
    u_ns,
    t_ptr,
    t_ns,
    N,
    M,
    rows,
    eps: tl.float64,
    RATIO: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask = r < rows
    k, n = r // N, r % N
    u_row = u_ptr + k * u_ks + n * u_ns
    t_row = t_ptr + n * t_ns
    e = f64(eps).to(ACC)
    s = tl.zeros([ROWS], ACC)
    for m in range(0, M):
        u = tl.load(u_row + m, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_row + m, mask=mask, other=0.0).to(ACC)
        if RATIO:
            s = s + div_rn(u - t, u + t + e)
        else:
            s = s + (u - t)
    tl.store(S_ptr + r, s, mask=mask)


def skew_accumulate(
    loss_u: Tensor, loss_t: Tensor, eps: float = 1e-3, use_ratio: bool = True
) -> Tensor:
    """S [K, n] in Acc (arguments checked by the caller, mucs_fast.ops)."""
    K, N, M = loss_u.shape
    acc = acc_dtype(loss_u.dtype)
    S = torch.empty(K, N, dtype=acc, device=loss_u.device)
    u = loss_u if M <= 1 or loss_u.stride(2) == 1 else loss_u.contiguous()
    t = loss_t if M <= 1 or loss_t.stride(1) == 1 else loss_t.contiguous()
    if K * N:
        with on_device(loss_u):
            _skew_accumulate_kernel[(triton.cdiv(K * N, ROWS),)](
                S,
                u,
                u.stride(0),
                u.stride(1),
                t,
                t.stride(0),
                N,
                M,
                K * N,
                float(eps),
                RATIO=bool(use_ratio),
                ACC=tl_dtype(acc),
                ROWS=ROWS,
                **LAUNCH,
            )
    return S
