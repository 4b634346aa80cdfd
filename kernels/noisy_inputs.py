"""Triton kernel of noisy_inputs (launched by mucs_fast/ops/noisy_inputs.py).

    out[m·n + j, i] = c[m] · (a[m]·x[j, i] + b[m]·ε[m(, j), i])          (noise-major rows)

Source: Karras et al. 2022 (EDM), eq. 2 and Table 1 (a = 1, b = σ, c = c_in or none); Ho et al.
2020 (DDPM), eq. 4 (a = √ᾱ_t, b = √(1 − ᾱ_t)); reference mucs_fast/reference/noisy_inputs.py,
C++/CUDA csrc/core/noisy_inputs.h (same operations: t1 = a·x, t2 = b·ε, s = t1 + t2, out = c·s).

Reduction order: none (elementwise). One program per (output row, block of a row).

Precision: x, ε, a, b, c are converted to Acc = float32 (float64 for float64 x); each product and
sum IEEE-rounded in Acc, no FMA (kernels/_common.py); the result rounded once to x's dtype, so
the output matches the reference and the C++/CUDA kernels bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import LAUNCH, acc_dtype, on_device, round_to, rows, tl_dtype

MAX_BLOCK = 1024


@triton.jit
def _noisy_inputs_kernel(
    out_ptr,
    x_ptr,
    x_rs,
    eps_ptr,
    eps_ms,
    eps_ns,
    a_ptr,
    a_s,
    b_ptr,
    b_s,
    c_ptr,
    c_s,
    n,
    D,
    HAS_C: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    m, j = r // n, r % n
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < D
    x = tl.load(x_ptr + j * x_rs + i, mask=mask, other=0.0).to(ACC)
    e = tl.load(eps_ptr + m * eps_ms + j * eps_ns + i, mask=mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + m * a_s).to(ACC)
    b = tl.load(b_ptr + m * b_s).to(ACC)
    s = a * x + b * e
    if HAS_C:
        s = tl.load(c_ptr + m * c_s).to(ACC) * s
    tl.store(out_ptr + r * D + i, round_to(s, out_ptr.dtype.element_ty), mask=mask)


def noisy_inputs(x: Tensor, eps: Tensor, a: Tensor, b: Tensor, c: Optional[Tensor]) -> Tensor:
    """out [M·n, *S] in x's dtype (arguments checked by the caller, mucs_fast.ops)."""
    n, M = x.shape[0], a.shape[0]
    D = int(torch.Size(x.shape[1:]).numel())
    out = torch.empty((M * n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    if M * n == 0 or D == 0:
        return out
    xr = rows(x, n, D)
    if eps.dim() == x.dim():  # [M, *S]: one noise per sample, shared by the n images
        er = rows(eps, M, D)
        eps_ms, eps_ns = er.stride(0), 0
    else:
        er = eps.reshape(M, n, D)
        if D > 1 and er.stride(2) != 1:
            er = er.contiguous()
        eps_ms, eps_ns = er.stride(0), er.stride(1)
    cc = c if c is not None else a
    block = min(MAX_BLOCK, triton.next_power_of_2(D))
    grid = (M * n, triton.cdiv(D, block))
    with on_device(x):
        _noisy_inputs_kernel[grid](
            out,
            xr,
            xr.stride(0),
            er,
            eps_ms,
            eps_ns,
            a,
            a.stride(0),
            b,
            b.stride(0),
            cc,
            cc.stride(0),
            n,
            D,
            HAS_C=c is not None,
            ACC=tl_dtype(acc_dtype(x.dtype)),
            BLOCK=block,
            **LAUNCH,
        )
    return out
