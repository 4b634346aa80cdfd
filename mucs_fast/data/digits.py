"""scikit-learn's bundled digits: the embedded demo's training set (no download)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def load_digits(size: int = 16, mode: str = "resize") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes; no download).

    Pixel values 0..16 map linearly to [-1, 1] (v/8 − 1). mode:
    - "resize": bilinear upsampling of the 8×8 image to size×size (align_corners=False; for
      size = 8 the images are returned unchanged);
    - "pad": the 8×8 image centered on a size×size canvas of −1 (background); size ≥ 8.
    Returns (images float32 [1797, 1, size, size], labels int64 [1797]).
    """
    from sklearn.datasets import load_digits as _sk_digits

    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"load_digits: size must be a positive int, got {size!r}")
    d = _sk_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1
    y = torch.as_tensor(d.target, dtype=torch.int64)
    if mode == "resize":
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    elif mode == "pad":
        if size < 8:
            raise ValueError(f'load_digits(mode="pad"): size must be >= 8, got {size}')
        lo = (size - 8) // 2
        canvas = torch.full((x.shape[0], 1, size, size), -1.0)
        canvas[:, :, lo : lo + 8, lo : lo + 8] = x
        x = canvas
    else:
        raise ValueError(f'load_digits: mode must be "resize" or "pad", got {mode!r}')
    return x.clamp_(-1, 1).contiguous(), y
