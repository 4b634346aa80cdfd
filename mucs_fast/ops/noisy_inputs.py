"""mucs_fast::noisy_inputs as a torch.library op: schema, kernels, fake, vmap, no autograd.

    out[m·n + j] = c[m] · (a[m]·x[j] + b[m]·ε[m(, j)])          (noise-major rows)

(equation, source, precision: mucs_fast/reference/noisy_inputs.py and csrc/core/noisy_inputs.h).
Implementations: the plain-PyTorch reference on every device (CompositeExplicitAutograd); the C++
kernel of mucs_fast._C on CPU; Triton or CUDA C++ on CUDA (mucs_fast/ops/_backend.py). The noisy
batch is data, not a function of trainable weights, so the op is not differentiable: calling it
with an input that requires grad (while grad mode is on) raises.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _backend
from ._checks import check_tensor

_SCHEMA = "noisy_inputs(Tensor x, Tensor eps, Tensor a, Tensor b, Tensor? c) -> Tensor"
_lib = torch.library.Library("mucs_fast", "FRAGMENT")
_lib.define(_SCHEMA)
_cuda_lib = torch.library.Library(_backend.CUDA_NAMESPACE, "FRAGMENT")
_cuda_lib.define(_SCHEMA)


def noisy_inputs(
    x: Tensor, eps: Tensor, a: Tensor, b: Tensor, c: Optional[Tensor] = None
) -> Tensor:
    """out [M·n, *S] (row m·n + j: image j under noise m) in x's dtype, computed in fp32 (fp64 for
    fp64 x) as c·((a·x) + (b·ε)).

    x [n, *S]; eps [M, *S] (shared by the n images) or [M, n, *S]; a, b, c: [M] (c may be None).
    EDM: a = 1, b = σ, c = None or c_in. VP: a = √ᾱ_t, b = √(1 − ᾱ_t).
    """
    _backend.load()
    return torch.ops.mucs_fast.noisy_inputs.default(x, eps, a, b, c)


def _check_args(x: Tensor, eps: Tensor, a: Tensor, b: Tensor, c: Optional[Tensor]) -> None:
    op = "noisy_inputs"
    dev = x.device
    check_tensor(op, "x", x, dev)
    torch._check(x.dim() >= 1, lambda: f"{op}: x must be [n, *S], got a 0-d tensor")
    check_tensor(op, "a", a, dev)
    torch._check(a.dim() == 1, lambda: f"{op}: a must have shape [M], got {list(a.shape)}")
    M, n, S = a.shape[0], x.shape[0], list(x.shape[1:])
    check_tensor(op, "eps", eps, dev)
    torch._check(
        (eps.dim() == x.dim() and list(eps.shape) == [M, *S])
        or (eps.dim() == x.dim() + 1 and list(eps.shape) == [M, n, *S]),
        lambda: (
            f"{op}: eps must be [M, *S] = {[M, *S]} or [M, n, *S] = {[M, n, *S]}, "
            f"got {list(eps.shape)}"
        ),
    )
    for name, t in (("b", b), ("c", c)):
        if t is not None:
            check_tensor(op, name, t, dev)
            torch._check(
                t.dim() == 1 and t.shape[0] == M,
                lambda: f"{op}: {name} must have shape [M] = [{M}], got {list(t.shape)}",
            )


def _noisy_inputs_default(x, eps, a, b, c):
    _check_args(x, eps, a, b, c)
    return reference.noisy_inputs(x, eps, a, b, c)


def _noisy_inputs_triton(x, eps, a, b, c):
    _check_args(x, eps, a, b, c)
    return _backend.triton_module("noisy_inputs").noisy_inputs(x, eps, a, b, c)


_lib.impl("noisy_inputs", _noisy_inputs_default, "CompositeExplicitAutograd")
_backend.add_triton_kernel("noisy_inputs", _noisy_inputs_triton, _lib)


@torch.library.register_fake("mucs_fast::noisy_inputs", lib=_lib)
def _noisy_inputs_fake(x, eps, a, b, c):
    _check_args(x, eps, a, b, c)
    return x.new_empty((a.shape[0] * x.shape[0], *x.shape[1:]))


# Autograd: registered only to refuse. Without it a caller could silently get a result that is
# cut from the graph.
def _setup_context(ctx, inputs, output):
    names = ("x", "eps", "a", "b", "c")
    grad_inputs = [n for n, t in zip(names, inputs) if t is not None and t.requires_grad]
    raise RuntimeError(
        f"noisy_inputs is not differentiable, but {', '.join(grad_inputs)} requires grad"
    )


def _backward(ctx, grad):  # never reached: _setup_context raises
    raise AssertionError("unreachable")


torch.library.register_autograd(
    "mucs_fast::noisy_inputs", _backward, setup_context=_setup_context, lib=_lib
)


# vmap. The engine's use: K models with their own noises (ε batched, x shared) fold K into M, one
# op call; a batched x (rare) loops over the vmapped dimension.
def _noisy_inputs_vmap(info, in_dims, x, eps, a, b, c):
    K = info.batch_size
    x_dim, eps_dim, a_dim, b_dim, c_dim = in_dims
    if x_dim is not None:
        rows = [
            torch.ops.mucs_fast.noisy_inputs.default(
                *(
                    t if d is None or t is None else t.select(d, k)
                    for t, d in zip((x, eps, a, b, c), in_dims)
                )
            )
            for k in range(K)
        ]
        return torch.stack(rows), 0

    def fold(t: Optional[Tensor], d: Optional[int]) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.movedim(d, 0) if d is not None else t.expand(K, *t.shape)
        return t.reshape(K * t.shape[1], *t.shape[2:])

    out = torch.ops.mucs_fast.noisy_inputs.default(
        x, fold(eps, eps_dim), fold(a, a_dim), fold(b, b_dim), fold(c, c_dim)
    )
    return out.reshape(K, -1, *out.shape[1:]), 0


torch.library.register_vmap("mucs_fast::noisy_inputs", _noisy_inputs_vmap, lib=_lib)
