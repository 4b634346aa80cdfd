"""mucs_fast::edm_loss and its backward as torch.library ops: schema, kernels, fake, autograd, vmap.

    L[b] = weight[b] · (1/D) Σ_i (c_skip[b]·x_noisy[b, i] + c_out[b]·out[b, i] − target[b, i])²

(equation, source, precision: mucs_fast/reference/edm_loss.py and csrc/core/edm_loss.h).
Implementations: the plain-PyTorch reference on every device (CompositeExplicitAutograd); the
C++ kernels of mucs_fast._C on CPU; Triton or CUDA C++ on CUDA (mucs_fast/ops/_backend.py), all
in the same fixed reduction order. Only `out` is differentiable; its
gradient is the op mucs_fast::edm_loss_backward. vmap rules fold the vmapped dimension into B,
so `torch.func.vmap` over K stacked models makes one op call of K·B rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _backend
from ._checks import acc_dtype, check_per_sample, check_tensor

_SCHEMAS = (
    "edm_loss(Tensor out, Tensor? x_noisy, Tensor target, Tensor? c_skip, Tensor? c_out, "
    "Tensor weight) -> Tensor",
    "edm_loss_backward(Tensor grad, Tensor out, Tensor? x_noisy, Tensor target, Tensor? c_skip, "
    "Tensor? c_out, Tensor weight) -> Tensor",
)
_lib = torch.library.Library("mucs_fast", "FRAGMENT")
_cuda_lib = torch.library.Library(_backend.CUDA_NAMESPACE, "FRAGMENT")
for _schema in _SCHEMAS:
    _lib.define(_schema)
    _cuda_lib.define(_schema)


def edm_loss(
    out: Tensor,
    x_noisy: Optional[Tensor],
    target: Tensor,
    c_skip: Optional[Tensor],
    c_out: Optional[Tensor],
    weight: Tensor,
) -> Tensor:
    """L [B], float32 (float64 for float64 `out`) with ≥ fp32 accumulation.

    out, target, x_noisy: [B, ...] of one shape, any float dtype; c_skip, c_out, weight: [B].
    x_noisy, c_skip, c_out may be None (c_out = 1; no skip term); c_skip needs x_noisy.
    Only `out` is differentiable.
    """
    _backend.load()
    return torch.ops.mucs_fast.edm_loss.default(out, x_noisy, target, c_skip, c_out, weight)


def edm_loss_backward(
    grad: Tensor,
    out: Tensor,
    x_noisy: Optional[Tensor],
    target: Tensor,
    c_skip: Optional[Tensor],
    c_out: Optional[Tensor],
    weight: Tensor,
) -> Tensor:
    """∂(Σ_b grad[b]·L[b])/∂out = grad[b]·weight[b]·(2/D)·c_out[b]·r[b, i], like out."""
    _backend.load()
    return torch.ops.mucs_fast.edm_loss_backward.default(
        grad, out, x_noisy, target, c_skip, c_out, weight
    )


def _check_args(
    op: str,
    out: Tensor,
    x_noisy: Optional[Tensor],
    target: Tensor,
    c_skip: Optional[Tensor],
    c_out: Optional[Tensor],
    weight: Tensor,
) -> None:
    dev = out.device
    check_tensor(op, "out", out, dev)
    torch._check(out.dim() >= 1, lambda: f"{op}: out must be [B, ...], got a 0-d tensor")
    B = out.shape[0]
    check_tensor(op, "target", target, dev)
    torch._check(
        target.shape == out.shape,
        lambda: (
            f"{op}: target must have the shape of out {list(out.shape)}, got {list(target.shape)}"
        ),
    )
    if x_noisy is not None:
        check_tensor(op, "x_noisy", x_noisy, dev)
        torch._check(
            x_noisy.shape == out.shape,
            lambda: (
                f"{op}: x_noisy must have the shape of out "
                f"{list(out.shape)}, got {list(x_noisy.shape)}"
            ),
        )
    torch._check(
        c_skip is None or x_noisy is not None, lambda: f"{op}: c_skip is given but x_noisy is None"
    )
    for name, t in (("c_skip", c_skip), ("c_out", c_out), ("weight", weight)):
        if t is not None:
            check_per_sample(op, name, t, B, dev)


# Default kernels: the reference, behind the same checks as the compiled kernels.
def _edm_loss_default(out, x_noisy, target, c_skip, c_out, weight):
    _check_args("edm_loss", out, x_noisy, target, c_skip, c_out, weight)
    return reference.edm_loss(out, x_noisy, target, c_skip, c_out, weight)


def _edm_loss_backward_default(grad, out, x_noisy, target, c_skip, c_out, weight):
    _check_args("edm_loss_backward", out, x_noisy, target, c_skip, c_out, weight)
    check_per_sample("edm_loss_backward", "grad", grad, out.shape[0], out.device)
    return reference.edm_loss_backward(grad, out, x_noisy, target, c_skip, c_out, weight)


def _edm_loss_triton(out, x_noisy, target, c_skip, c_out, weight):
    _check_args("edm_loss", out, x_noisy, target, c_skip, c_out, weight)
    return _backend.triton_module("edm_loss").edm_loss(out, x_noisy, target, c_skip, c_out, weight)


def _edm_loss_backward_triton(grad, out, x_noisy, target, c_skip, c_out, weight):
    _check_args("edm_loss_backward", out, x_noisy, target, c_skip, c_out, weight)
    check_per_sample("edm_loss_backward", "grad", grad, out.shape[0], out.device)
    return _backend.triton_module("edm_loss").edm_loss_backward(
        grad, out, x_noisy, target, c_skip, c_out, weight
    )


_lib.impl("edm_loss", _edm_loss_default, "CompositeExplicitAutograd")
_lib.impl("edm_loss_backward", _edm_loss_backward_default, "CompositeExplicitAutograd")
_backend.add_triton_kernel("edm_loss", _edm_loss_triton, _lib)
_backend.add_triton_kernel("edm_loss_backward", _edm_loss_backward_triton, _lib)


@torch.library.register_fake("mucs_fast::edm_loss", lib=_lib)
def _edm_loss_fake(out, x_noisy, target, c_skip, c_out, weight):
    _check_args("edm_loss", out, x_noisy, target, c_skip, c_out, weight)
    return out.new_empty(out.shape[:1], dtype=acc_dtype(out.dtype))


@torch.library.register_fake("mucs_fast::edm_loss_backward", lib=_lib)
def _edm_loss_backward_fake(grad, out, x_noisy, target, c_skip, c_out, weight):
    _check_args("edm_loss_backward", out, x_noisy, target, c_skip, c_out, weight)
    check_per_sample("edm_loss_backward", "grad", grad, out.shape[0], out.device)
    return out.new_empty(out.shape)


# Autograd: d/d out only. The other inputs are data, noise and σ-derived scalars in MUCS; a
# gradient for them would be silently wrong, so asking for one fails, as PyTorch's own
# not-implemented derivatives do.
_NON_DIFFERENTIABLE = ("x_noisy", "target", "c_skip", "c_out", "weight")


def _setup_context(ctx, inputs, output):
    for name, t in zip(_NON_DIFFERENTIABLE, inputs[1:]):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"edm_loss: only out is differentiable, but {name} requires grad")
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    out, x_noisy, target, c_skip, c_out, weight = ctx.saved_tensors
    grad_out = torch.ops.mucs_fast.edm_loss_backward.default(
        grad, out, x_noisy, target, c_skip, c_out, weight
    )
    return grad_out, None, None, None, None, None


torch.library.register_autograd(
    "mucs_fast::edm_loss", _backward, setup_context=_setup_context, lib=_lib
)


# vmap: fold the vmapped dimension into B, one op call, unfold. Unbatched inputs (e.g. the data
# and σ shared by K stacked models) are expanded to K copies first.
def _fold(t: Optional[Tensor], bdim: Optional[int], K: int) -> Optional[Tensor]:
    if t is None:
        return None
    t = t.movedim(bdim, 0) if bdim is not None else t.expand(K, *t.shape)
    return t.reshape(K * t.shape[1], *t.shape[2:])


def _edm_loss_vmap(info, in_dims, out, x_noisy, target, c_skip, c_out, weight):
    K = info.batch_size
    args = [_fold(t, d, K) for t, d in zip((out, x_noisy, target, c_skip, c_out, weight), in_dims)]
    B = args[0].shape[0] // K
    return torch.ops.mucs_fast.edm_loss.default(*args).reshape(K, B), 0


def _edm_loss_backward_vmap(info, in_dims, grad, out, x_noisy, target, c_skip, c_out, weight):
    K = info.batch_size
    args = [
        _fold(t, d, K) for t, d in zip((grad, out, x_noisy, target, c_skip, c_out, weight), in_dims)
    ]
    B = args[1].shape[0] // K
    g = torch.ops.mucs_fast.edm_loss_backward.default(*args)
    return g.reshape(K, B, *g.shape[1:]), 0


torch.library.register_vmap("mucs_fast::edm_loss", _edm_loss_vmap, lib=_lib)
torch.library.register_vmap("mucs_fast::edm_loss_backward", _edm_loss_backward_vmap, lib=_lib)
