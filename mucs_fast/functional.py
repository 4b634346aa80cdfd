"""K copies of one network evaluated as one: stacked trainable weights under `torch.func.vmap`.

The K unlearned copies of a model differ only in their trainable parameters. `StackedNet` keeps
those as [K, ...] tensors and shares every frozen parameter and buffer, and `StackedNet.loss`
runs `den.loss` for all K through `torch.func.functional_call` + `vmap`. Inputs given without a K
dimension are shared: vmap then computes everything upstream of the first trainable weight (the
frozen prefix) once, not K times.

Two ops have no usable batching rule and are rerouted while a batched call runs (`vmap_safe`):
- group_norm (diffusers UNet2DModel): its native kernel asks `is_contiguous(channels_last)`, which
  vmap does not implement ("NYI: querying is_contiguous inside of vmap ..."); it is computed from
  its definition (mean/var over each group, fp32 statistics) instead;
- scaled_dot_product_attention on CPU: vmap falls back to a slow per-sample loop; the math form
  (softmax(q·kᵀ/√d)·v) batches.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """GroupNorm from its definition (biased variance), statistics in ≥ fp32."""
    N, C = x.shape[0], x.shape[1]
    xg = x.reshape(N, num_groups, -1)
    acc = xg.float() if xg.dtype in (torch.float16, torch.bfloat16) else xg
    mean = acc.mean(-1, keepdim=True)
    var = (acc - mean).square().mean(-1, keepdim=True)
    y = ((acc - mean) * torch.rsqrt(var + eps)).to(x.dtype).reshape(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def sdpa_math(
    q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """softmax(q·kᵀ·scale + mask)·v (no dropout: the engine runs models in eval mode)."""
    if dropout_p:
        raise ValueError("sdpa_math: dropout is not supported (models run in eval mode)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        s = s.masked_fill(
            ~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf")
        )
    if attn_mask is not None:
        s = (
            s.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else s + attn_mask
        )
    return torch.matmul(s.softmax(-1).to(v.dtype), v)


class vmap_safe(TorchFunctionMode):
    """Reroute the ops above while a vmapped call runs (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm or func is torch.group_norm:
            return group_norm(*args, **kwargs)
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "cpu":
            return sdpa_math(*args, **kwargs)
        return func(*args, **kwargs)


class StackedNet:
    """A module plus K stacked versions of some of its parameters.

    weights: {name: [K, *param.shape]} for the stacked (trainable) names; all other parameters and
    buffers are the module's own, shared by the K copies.
    """

    def __init__(self, net: torch.nn.Module, weights: dict):
        self.net = net
        self.weights = weights
        self.names = list(weights)
        self.K = next(iter(weights.values())).shape[0]
        shared = dict(net.named_parameters())
        shared.update(dict(net.named_buffers()))
        for n in self.names:
            shared.pop(n)
        self.shared = {n: t.detach() for n, t in shared.items()}
        # the wrapper of `network` exists before any call: made inside a compiled function, a new
        # module is a pending mutation that breaks the graph at every functional_call after it
        self._methods: dict = (
            {"network": _MethodAsForward(net, "network")} if hasattr(net, "network") else {}
        )

    def module(self, weights: dict) -> "_Call":
        """The net with trainable parameters `weights` ({name: tensor of the parameter's shape},
        e.g. one copy's slices), callable like the module; frozen parameters are shared."""
        return _Call(self.net, {**self.shared, **weights}, self._methods)

    def vmap(self, fn, *args, in_dims, weights: Optional[dict] = None):
        """fn(net_k, *args_k) for the K copies, stacked on dim 0. `net_k` is called like the
        module (and exposes its methods); in_dims per arg: 0 = one slice per copy, None = shared."""
        weights = self.weights if weights is None else weights
        shared, methods = self.shared, self._methods

        def one(w, *a):
            return fn(_Call(self.net, {**shared, **w}, methods), *a)

        if next(iter(weights.values())).shape[0] == 1:
            # K = 1 is the same computation without the batching transform: models that cannot be
            # vmapped (e.g. ops without a batching rule) still run, and nothing is paid for vmap.
            squeeze = lambda t, d: t if d is None else t.select(d, 0)  # noqa: E731
            out = one(
                {n: w[0] for n, w in weights.items()},
                *(squeeze(a, d) for a, d in zip(args, in_dims)),
            )
            return out.unsqueeze(0)
        # randomness="different": a model that draws random numbers in forward (the reference's
        # conditional embedders draw a label-dropout mask even in eval mode) gets independent draws
        # per copy, as K separate runs would; models without randomness are unaffected.
        with vmap_safe():
            return vmap(one, in_dims=(0, *in_dims), randomness="different")(weights, *args)

    def loss(
        self, den, x, eps, level, y=None, weights: Optional[dict] = None, in_dims=(0, 0, 0, 0)
    ) -> torch.Tensor:
        """den.loss of the K copies → [K, B]."""

        def fn(net, x, eps, level, y):
            return den.loss(x, eps, level, y, net=net)

        dims = (*in_dims[:3], in_dims[3] if y is not None else None)
        y = den.forward_labels(y)  # outside vmap: a text model reads its condition rows here
        return self.vmap(fn, x, eps, level, y, in_dims=dims, weights=weights)


def flat_views(flat: torch.Tensor, shapes: dict) -> dict:
    """{name: view [K, *shape]} into a flat [K, P] buffer, in `shapes` order."""
    out, off = {}, 0
    for n, shape in shapes.items():
        size = math.prod(shape)
        out[n] = flat[:, off : off + size].view(flat.shape[0], *shape)
        off += size
    return out


class _MethodAsForward(torch.nn.Module):
    """`net.<name>` as a module's forward: `functional_call` only runs `forward`, so a method
    with substituted parameters is a functional call of this wrapper (parameters `net.<...>`)."""

    def __init__(self, net: torch.nn.Module, name: str):
        super().__init__()
        self.net, self.name = net, name

    def forward(self, *args, **kwargs):
        return getattr(self.net, self.name)(*args, **kwargs)


class _Call:
    """`net` with substituted parameters, callable like `net`; its methods (e.g. `network`, the
    raw F of EDM nets) run with the substituted parameters too. `methods` caches one
    `_MethodAsForward` per method name.

    `network` is an explicit method on purpose: torch.compile (dynamo) mistraces a method
    returned from `__getattr__` and kept the module's own weights, so the compiled K-stacked
    scoring pass scored every copy as the original (all scores 0). `__getattr__` still serves
    other attributes and methods in eager code."""

    def __init__(self, net, params, methods: dict):
        self._net, self._params, self._methods = net, params, methods

    def __call__(self, *args, **kwargs):
        return functional_call(self._net, self._params, args, kwargs, strict=False)

    def call_method(self, name: str, *args, **kwargs):
        """net.<name>(*args, **kwargs) with the substituted parameters."""
        wrapper = self._methods.get(name)
        if wrapper is None:
            wrapper = self._methods[name] = _MethodAsForward(self._net, name)
        params = {f"net.{n}": t for n, t in self._params.items()}
        return functional_call(wrapper, params, args, kwargs, strict=False)

    def network(self, *args, **kwargs):
        return self.call_method("network", *args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._net, name)
        if not (callable(attr) and getattr(attr, "__self__", None) is self._net):
            return attr
        return lambda *args, **kwargs: self.call_method(name, *args, **kwargs)


def working_copy(net: torch.nn.Module, device) -> torch.nn.Module:
    """A deep copy of `net` on `device` in eval mode: what a method computes with, so that the
    caller's module keeps its device, train/eval mode and requires_grad flags."""
    return copy.deepcopy(net).to(device).eval()
