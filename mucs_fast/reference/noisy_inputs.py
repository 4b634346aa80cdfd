"""noisy_inputs — the noisy batch of a scoring chunk: n images under M shared noise samples.

    out[m·n + j] = c[m] · (a[m]·x[j] + b[m]·ε[m(, j)])          (noise-major rows)

Karras et al. 2022 (EDM), eq. 2 and Table 1; Ho et al. 2020 (DDPM), eq. 4; spec/MUCS.md "Noise
banks" (one bank shared by every image and model).
- EDM: a = 1, b = σ, c = None (x + σε, what the D-form net takes) or c = c_in (the F-form input).
- VP/DDPM: a = √ᾱ_t, b = √(1 − ᾱ_t), c = None.
ε is [M, *S] (one noise per sample, shared by the n images: the noise-consistent bank) or
[M, n, *S] (a noise per image and sample).

Precision and order: every input is converted to Acc = float32 (float64 for float64 x), then
t1 = a·x, t2 = b·ε, s = t1 + t2, out = c·s (no c: out = s), each product and sum rounded in Acc;
the result is rounded once to x's dtype. The compiled kernels do exactly these operations (no
fused multiply-add), so they agree with this reference bit for bit. Elementwise: no reduction.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def noisy_inputs(x: Tensor, eps: Tensor, a: Tensor, b: Tensor, c: Optional[Tensor]) -> Tensor:
    """x [n, *S], eps [M, *S] or [M, n, *S], a/b/c [M] → out [M·n, *S] in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, S, M = x.shape[0], x.shape[1:], a.shape[0]
    per_sample = (M, 1) + (1,) * len(S)
    e = eps.to(acc) if eps.dim() == x.dim() + 1 else eps.to(acc).unsqueeze(1)
    t1 = a.to(acc).view(per_sample) * x.to(acc).unsqueeze(0)
    t2 = b.to(acc).view(per_sample) * e
    s = t1 + t2
    if c is not None:
        s = c.to(acc).view(per_sample) * s
    return s.reshape(M * n, *S).to(x.dtype)
