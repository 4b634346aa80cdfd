"""Pointwise (1×1, stride 1) convolutions evaluated as channel matmuls, for the CPU.

The reference's DiT has a convolutional frontend (`lib/nn.py::ConvBlock2d`: a 1×1 `conv1` and
`skip`, mirrored by 1×1 `ConvTranspose2d`s in the decoder) run on every image·noise pair. With a
handful of channels oneDNN's convolution runs those 1×1 kernels far below the rate of the same
sums written as one matmul over channels (2-channel 16×16 inputs, 1 thread: a 2→8 ConvTranspose2d
81 ms, Conv2d 44 ms, the matmul 9 ms per 1,600 images), and they are most of the tiny models'
forward time. `pointwise_view(module)` returns a copy of the module tree that shares every
parameter and buffer with `module` and in which those layers compute W·x + b with torch.matmul:
the same parameters under the same names (so `functional_call`, vmap, the trainable set and
autograd see the same model), the same values up to float rounding (the sum over input channels
runs in another order). The caller's module is not changed.
"""

from __future__ import annotations

import copy

import torch


def _pointwise(x: torch.Tensor, w: torch.Tensor, b) -> torch.Tensor:
    """W·x + b over channels: x [..., C, H, W], w [O, C], b [O] or None → [..., O, H, W]."""
    y = torch.matmul(w, x.flatten(-2))
    if b is not None:
        y = y + b[:, None]
    return y.view(*x.shape[:-3], w.shape[0], *x.shape[-2:])


class PointwiseConv2d(torch.nn.Conv2d):
    """A 1×1, stride-1 Conv2d (weight [O, C, 1, 1]) as a channel matmul."""

    def forward(self, x):
        return _pointwise(x, self.weight[:, :, 0, 0], self.bias)


class PointwiseConvTranspose2d(torch.nn.ConvTranspose2d):
    """A 1×1, stride-1 ConvTranspose2d (weight [C, O, 1, 1]) as a channel matmul."""

    def forward(self, x, output_size=None):
        return _pointwise(x, self.weight[:, :, 0, 0].t(), self.bias)


def _is_pointwise(m: torch.nn.Module) -> bool:
    if type(m) not in (torch.nn.Conv2d, torch.nn.ConvTranspose2d):
        return False  # subclasses may override forward: leave them alone
    plain = (
        m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding in ((0, 0), "valid")
    )
    if isinstance(m, torch.nn.ConvTranspose2d):
        return plain and m.output_padding == (0, 0)
    return plain and m.padding_mode == "zeros"


def pointwise_view(module: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """(a structural copy of `module` sharing its parameters and buffers, with every plain 1×1
    stride-1 Conv2d / ConvTranspose2d computed as a matmul; how many layers were swapped).
    With none to swap, `module` itself is returned."""
    found = [m for m in module.modules() if _is_pointwise(m)]
    if not found:
        return module, 0
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    view = copy.deepcopy(module, memo)
    n = 0
    for m in view.modules():
        if _is_pointwise(m):
            m.__class__ = (
                PointwiseConvTranspose2d
                if isinstance(m, torch.nn.ConvTranspose2d)
                else PointwiseConv2d
            )
            n += 1
    return view, n
