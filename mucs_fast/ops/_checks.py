"""Argument checks shared by the default (reference) kernels and the fakes of the mucs_fast ops.

They raise for exactly the inputs the C++ kernels reject (csrc/checks.h), with messages naming the
op and the argument, so a bad call fails the same way on every backend and under torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and result) dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(op: str, name: str, t: Tensor, device: torch.device) -> None:
    torch._check(
        t.dtype in FLOATS,
        lambda: f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}",
    )
    torch._check(
        t.device == device,
        lambda: f"{op}: {name} must be on {device} like the first input, got {t.device}",
    )


def check_per_sample(op: str, name: str, t: Tensor, B, device: torch.device) -> None:
    check_tensor(op, name, t, device)
    torch._check(
        t.dim() == 1 and t.shape[0] == B,
        lambda: f"{op}: {name} must have shape [B] = [{B}], got {list(t.shape)}",
    )
