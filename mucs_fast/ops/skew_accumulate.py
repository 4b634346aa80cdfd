"""mucs_fast::skew_accumulate as a torch.library op: schema, kernels, fake.

    S[k, n] = Σ_m f(L_u[k, n, m], L_t[n, m]),   f(u, t) = (u − t)/(u + t + eps)  (or u − t)

(equation, source, precision: mucs_fast/reference/skew_accumulate.py and
csrc/core/skew_accumulate.h). Implementations: the plain-PyTorch reference on every device
(CompositeExplicitAutograd); the C++ kernel of mucs_fast._C on CPU; Triton or CUDA C++ on CUDA
(mucs_fast/ops/_backend.py), all adding in ascending m. Scores are not differentiated, so the op
has no autograd formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import _backend
from ._checks import acc_dtype, check_tensor

_SCHEMA = (
    "skew_accumulate(Tensor loss_u, Tensor loss_t, float eps=0.001, bool use_ratio=True) -> Tensor"
)
_lib = torch.library.Library("mucs_fast", "FRAGMENT")
_lib.define(_SCHEMA)
_cuda_lib = torch.library.Library(_backend.CUDA_NAMESPACE, "FRAGMENT")
_cuda_lib.define(_SCHEMA)


def skew_accumulate(
    loss_u: Tensor, loss_t: Tensor, eps: float = 1e-3, use_ratio: bool = True
) -> Tensor:
    """S [K, n] = Σ_m f(loss_u[k, n, m], loss_t[n, m]) from loss_u [K, n, M], loss_t [n, M].

    float32 (float64 for float64 loss_u), accumulated in ≥ fp32; the compiled kernels add over m in
    ascending order. The MUCS score is S / M.
    """
    _backend.load()
    return torch.ops.mucs_fast.skew_accumulate.default(loss_u, loss_t, eps, use_ratio)


def _check_args(loss_u: Tensor, loss_t: Tensor) -> None:
    op = "skew_accumulate"
    check_tensor(op, "loss_u", loss_u, loss_u.device)
    check_tensor(op, "loss_t", loss_t, loss_u.device)
    torch._check(
        loss_u.dim() == 3, lambda: f"{op}: loss_u must be [K, n, M], got {list(loss_u.shape)}"
    )
    torch._check(
        loss_t.dim() == 2 and loss_t.shape == loss_u.shape[1:],
        lambda: f"{op}: loss_t must be [n, M] = {list(loss_u.shape[1:])}, got {list(loss_t.shape)}",
    )


def _skew_accumulate_default(loss_u, loss_t, eps=1e-3, use_ratio=True):
    _check_args(loss_u, loss_t)
    return reference.skew_accumulate(loss_u, loss_t, eps, use_ratio)


def _skew_accumulate_triton(loss_u, loss_t, eps=1e-3, use_ratio=True):
    _check_args(loss_u, loss_t)
    return _backend.triton_module("skew_accumulate").skew_accumulate(loss_u, loss_t, eps, use_ratio)


_lib.impl("skew_accumulate", _skew_accumulate_default, "CompositeExplicitAutograd")
_backend.add_triton_kernel("skew_accumulate", _skew_accumulate_triton, _lib)


@torch.library.register_fake("mucs_fast::skew_accumulate", lib=_lib)
def _skew_accumulate_fake(loss_u, loss_t, eps=1e-3, use_ratio=True):
    _check_args(loss_u, loss_t)
    return loss_u.new_empty(loss_u.shape[:2], dtype=acc_dtype(loss_u.dtype))
