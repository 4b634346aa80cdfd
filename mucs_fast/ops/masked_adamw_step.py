"""mucs_fast::masked_adamw_step_, an in-place torch.library op, and the list form the engine calls.

For every target k with active[k], on the [K, ...] tensors param p, grad g, moments m, v:

    p_k ← p_k · (1 − lr·wd);  m_k ← m_k + (1 − β1)(g_k − m_k);  v_k ← β2·v_k + (1 − β2)·g_k·g_k
    p_k ← p_k − (lr / (1 − β1^t_k)) · m_k / (√v_k / √(1 − β2^t_k) + eps)

(equation, source, precision: mucs_fast/reference/masked_adamw_step.py and
csrc/core/masked_adamw_step.h). One call updates one tensor set; the engine keeps all trainable
weights of its K targets in one flat [K, P] buffer, so one launch updates everything.
Implementations: the plain-PyTorch reference on every device (CompositeExplicitAutograd); the C++
kernel of mucs_fast._C on CPU (bit-identical to the reference); Triton or CUDA C++ on CUDA
(mucs_fast/ops/_backend.py). An optimizer step is not differentiated: no autograd formula.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import reference
from . import _backend

_SCHEMA = (
    "masked_adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
    "Tensor step, Tensor active, float lr, float beta1, float beta2, float eps, "
    "float weight_decay) -> ()"
)
_lib = torch.library.Library("mucs_fast", "FRAGMENT")
_lib.define(_SCHEMA)
_cuda_lib = torch.library.Library(_backend.CUDA_NAMESPACE, "FRAGMENT")
_cuda_lib.define(_SCHEMA)

_OP = "masked_adamw_step_"
_FLOATS = (torch.float32, torch.float64)


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
    """In place, one op call per tensor set. params/grads/exp_avgs/exp_avg_sqs: lists of [K, ...]
    float32/float64 tensors; step: integer [K], the step number after this update (≥ 1 where
    active); active: bool [K] (inactive targets are left untouched). step and active may live on
    the CPU: they are moved to each tensor's device once."""
    n = len(params)
    if not len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n:
        raise ValueError(
            f"masked_adamw_step: params, grads, exp_avgs, exp_avg_sqs must have one entry per "
            f"tensor, got {n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}"
        )
    _backend.load()
    on_device = {}
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if p.device not in on_device:
            on_device[p.device] = (step.to(p.device, torch.int64), active.to(p.device))
        step_d, active_d = on_device[p.device]
        torch.ops.mucs_fast.masked_adamw_step_.default(
            p, g, m, v, step_d, active_d, lr, beta1, beta2, eps, weight_decay
        )


def _check_args(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, active: Tensor
) -> None:
    op = _OP
    dev = param.device
    torch._check(
        param.dtype in _FLOATS,
        lambda: f"{op}: param must be float32 or float64, got {param.dtype}",
    )
    torch._check(param.dim() >= 1, lambda: f"{op}: param must be [K, ...], got a 0-d tensor")
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        torch._check(
            t.dtype == param.dtype,
            lambda: f"{op}: {name} must have param's dtype {param.dtype}, got {t.dtype}",
        )
        torch._check(
            t.device == dev, lambda: f"{op}: {name} must be on {dev} like param, got {t.device}"
        )
        torch._check(
            t.shape == param.shape,
            lambda: (
                f"{op}: {name} must have param's shape {list(param.shape)}, got {list(t.shape)}"
            ),
        )
    K = param.shape[0]
    for name, t, dtype in (("step", step, torch.int64), ("active", active, torch.bool)):
        torch._check(t.dtype == dtype, lambda: f"{op}: {name} must be {dtype}, got {t.dtype}")
        torch._check(
            t.device == dev, lambda: f"{op}: {name} must be on {dev} like param, got {t.device}"
        )
        torch._check(
            t.dim() == 1 and t.shape[0] == K,
            lambda: f"{op}: {name} must have shape [K] = [{K}], got {list(t.shape)}",
        )


def _masked_adamw_step_default(
    param, grad, exp_avg, exp_avg_sq, step, active, lr, beta1, beta2, eps, weight_decay
):
    _check_args(param, grad, exp_avg, exp_avg_sq, step, active)
    reference.masked_adamw_step(
        [param], [grad], [exp_avg], [exp_avg_sq], step, active, lr, beta1, beta2, eps, weight_decay
    )


def _masked_adamw_step_triton(
    param, grad, exp_avg, exp_avg_sq, step, active, lr, beta1, beta2, eps, weight_decay
):
    _check_args(param, grad, exp_avg, exp_avg_sq, step, active)
    _backend.triton_module("masked_adamw_step").masked_adamw_step_(
        param, grad, exp_avg, exp_avg_sq, step, active, lr, beta1, beta2, eps, weight_decay
    )


_lib.impl(_OP, _masked_adamw_step_default, "CompositeExplicitAutograd")
_backend.add_triton_kernel(_OP, _masked_adamw_step_triton, _lib)


@torch.library.register_fake(f"mucs_fast::{_OP}", lib=_lib)
def _masked_adamw_step_fake(
    param, grad, exp_avg, exp_avg_sq, step, active, lr, beta1, beta2, eps, weight_decay
):
    _check_args(param, grad, exp_avg, exp_avg_sq, step, active)
