"""Noise levels and the inference noise bank (spec/MUCS.md, "Noise banks").

The bank is drawn once and shared by the original model, every unlearned model and every training
image: that sharing is the "noise-consistent" part of MUCS. Levels are σ for EDM models and integer
timesteps t for VP/DDPM models; `Denoiser` objects say which (`denoisers.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ._io import tensor_digest
from .data import Source


def karras_sigma(
    s: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """σ(s) = (σ_max^{1/ρ} + s·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ at positions s ∈ [0, 1] (0: σ_max).

    The operation order of the reference (and of every grid mucs_fast draws: the inference bank,
    sorted-uniform training levels, the drop-in's replay), so grids are bitwise identical to it."""
    return (sigma_max ** (1 / rho) + s * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def karras_sigmas(
    num: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None
) -> torch.Tensor:
    """The Karras grid of `num` levels, largest first: σ(s) at s = linspace(0, 1, num)."""
    return karras_sigma(torch.linspace(0, 1, num, device=device), sigma_min, sigma_max, rho)


def grid_size(M: int, t_sched: float) -> int:
    """Number of grid levels of which the first (largest) M form the bank: int(M / t_sched)."""
    return int(M / t_sched)


@dataclasses.dataclass
class NoiseBank:
    """M shared noise samples: unit Gaussian ε [M, C, H, W] and levels [M] (σ or t)."""

    eps: torch.Tensor
    level: torch.Tensor

    @property
    def M(self) -> int:
        return self.eps.shape[0]

    def to(self, device) -> "NoiseBank":
        return NoiseBank(self.eps.to(device), self.level.to(device))

    def select(self, idx: torch.Tensor) -> "NoiseBank":
        """The samples `idx` (in that order): a segment of the bank."""
        idx = idx.to(self.eps.device)
        return NoiseBank(self.eps[idx], self.level[idx])

    def fingerprint(self) -> str:
        return tensor_digest({"eps": self.eps, "level": self.level})


def estimate_t_sched(
    x: Source,
    sigmas_full: torch.Tensor,
    B: int,
    generator: Optional[torch.Generator] = None,
    num_consec: int = 3,
    qtl: float = 0.05,
) -> float:
    """t_sched="auto": the fraction of the full σ grid above half the `qtl` quantile of pairwise
    normalized Euclidean distances between training images.

    As the reference intends (its version crashes): images are shuffled into batches of B, and each
    batch is compared with the previous `num_consec` batches; distance = ‖a − b‖₂ / √D.

    x: the N training images (batches are read as they are compared); sigmas_full: [M] σ of
    every level of the full grid (its device is where the distances are computed).
    """
    N = len(x)
    device = sigmas_full.device
    perm = torch.randperm(N, generator=generator, device="cpu")
    starts = list(range(0, N - B + 1, B))

    def batch(idx):  # flattened float images of the batch (read when needed: x may be streamed)
        b = x.take(idx, device)
        return b.reshape(b.shape[0], -1)

    if len(starts) <= 1:  # a single batch: compare it with itself, off-diagonal only
        one = batch(perm if not starts else perm[:B])
        D = one.shape[1]
        d = torch.cdist(one[None], one[None]).squeeze(0) / D**0.5
        dists = [d[~torch.eye(d.shape[0], dtype=torch.bool, device=d.device)]]
    else:
        dists, window = [], []
        for i, s0 in enumerate(starts):
            cur = batch(perm[s0 : s0 + B])
            D = cur.shape[1]
            if window:
                prev = torch.cat(window)
                dists.append(
                    (torch.cdist(cur[None], prev[None]).squeeze(0) / D**0.5).flatten().cpu()
                )
            window = (window + [cur])[-num_consec:]
    d = torch.cat(dists).cpu()
    if d.numel() == 0:
        raise ValueError('t_sched="auto" needs at least 2 training images')
    return t_sched_from_distances(d, sigmas_full, qtl)


def t_sched_from_distances(
    distances: torch.Tensor, sigmas_full: torch.Tensor, qtl: float = 0.05
) -> float:
    """The fraction of the full grid `sigmas_full` [M] above half the `qtl` quantile of the pairwise
    distances, and at least 1/M (one level: the bank is never empty)."""
    d = torch.sort(distances.reshape(-1).cpu()).values
    threshold = d[int(qtl * d.numel())] / 2
    M = sigmas_full.numel()
    return max((sigmas_full.cpu() > threshold).float().mean().item(), 1.0 / M)
