"""Helpers shared by the Triton kernels: IEEE-rounded arithmetic and host-side plumbing.

Rounding. Triton's `/` and `tl.sqrt` on float32 are approximate (div.full.f32, sqrt.approx.f32)
and the compiler fuses a·b + c into an FMA unless launched with enable_fp_fusion=False (every
launcher here does). `div_rn`/`sqrt_rn` below are IEEE round-to-nearest for float32 and float64, so
the Triton kernels round exactly like the C++/CUDA ones (csrc/core/common.h). `round_to` rounds to
the storage dtype to nearest-even; bfloat16 is rounded with integer operations because the Triton
interpreter (TRITON_INTERPRET=1, how CI runs these kernels) truncates float32 → bfloat16 casts.
The interpreter also stores bfloat16 as raw uint16, so no kernel does arithmetic in bfloat16:
everything is converted to Acc (float32 or float64) first.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Launch options of every kernel: no FMA contraction (the C++/CUDA kernels build with
# -ffp-contract=off / --fmad=false).
LAUNCH = {"enable_fp_fusion": False}

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPE[dtype]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, else float32 (the ops' accumulation dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_device(t: torch.Tensor):
    """Context that makes t's device current (Triton launches on the current device)."""
    if t.device.type == "cpu":  # the interpreter
        return contextlib.nullcontext()
    return torch.get_device_module(t.device.type).device(t.device)


def rows(t: torch.Tensor, B: int, D: int) -> torch.Tensor:
    """t viewed as [B, D] with unit stride along D (copied only when no such view exists)."""
    r = t.reshape(B, D)
    if D > 1 and r.stride(1) != 1:
        r = r.contiguous()
    return r


@triton.jit
def f64(value):
    """A float64 scalar from a float64 argument (a Python float under the interpreter)."""
    return tl.full([], value, tl.float64)


@triton.jit
def div_rn(a, b):
    """a / b rounded to nearest (IEEE), float32 or float64."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def sqrt_rn(a):
    """√a rounded to nearest (IEEE), float32 or float64."""
    if a.dtype == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.math.sqrt_rn(a)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x (float32/float64) rounded to nearest-even in DTYPE."""
    if DTYPE == tl.bfloat16:
        x = tl.where(x != x, float("nan"), x)  # one quiet NaN, as c10::BFloat16
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
