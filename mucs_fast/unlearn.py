"""Mirrored, bounded unlearning of one target x̂ (spec/MUCS.md, "Unlearning one target").

Each step, with the current weights θ:
    L_r = mean_i L(x_r,i; ε_i, σ_i)                      retain batch: B training images
    L_f = mean_i min(L(x̂; ε'_i, σ'_i), L_null)          forget batch: x̂ repeated B times
    stop if L_f ≥ (1 − tolerance)·L_null   (or after exactly max_steps steps when given)
    θ ← AdamW step on  L_r − λ·L_f

The clamp at L_null is the bound: once a forget sample is as badly denoised as by a model that knows
nothing, it stops pushing. The model stays in eval mode (dropout off), as in the reference.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterator, Optional

import torch

from .config import MUCSConfig
from .denoisers import Denoiser


class RetainStream:
    """Batches of B training indices: a fresh random permutation per epoch, incomplete last batch
    dropped — the reference's `DataLoader(shuffle=True, drop_last=True)`, but with its own generator
    so each target's stream is reproducible on its own."""

    def __init__(self, N: int, B: int, generator: torch.Generator):
        if B > N:
            raise ValueError(f"batch size B={B} exceeds the training set size N={N}; "
                             f"pass MUCSConfig(batch_size=<= {N})")
        self.N, self.B, self.generator = N, B, generator
        self._perm: Optional[torch.Tensor] = None
        self._pos = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._perm is None or self._pos + self.B > self.N:
            self._perm = torch.randperm(self.N, generator=self.generator)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.B]
        self._pos += self.B
        return idx


@dataclasses.dataclass
class UnlearnInfo:
    """What happened while unlearning one target."""

    steps: int = 0
    stop: str = "rule"  # "rule" | "max_steps" | "cap" | "nan"
    loss_r: float = math.nan  # last evaluated L_r and L_f
    loss_f: float = math.nan
    trace: list = dataclasses.field(default_factory=list)  # [(L_r, L_f)] per evaluation
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stop_reason(step: int, loss_f: float, loss_null: float, cfg: MUCSConfig) -> Optional[str]:
    """The stop rule, checked with the current weights before a step (None: keep going)."""
    if not math.isfinite(loss_f):
        return "nan"
    if cfg.max_steps is not None:  # the reference: a fixed step budget replaces the rule
        return "max_steps" if step >= cfg.max_steps else None
    if loss_f >= (1 - cfg.tolerance) * loss_null:
        return "rule"
    if step >= cfg.safety_steps:
        return "cap"
    return None


def unlearn(den: Denoiser, net: torch.nn.Module, params: list, train_x: torch.Tensor,
            train_y: Optional[torch.Tensor], x_hat: torch.Tensor, y_hat: Optional[torch.Tensor], *,
            cfg: MUCSConfig, loss_null: float, lr: float, retain: Iterator[torch.Tensor],
            generator: torch.Generator, progress: Optional[Callable] = None) -> UnlearnInfo:
    """Unlearn target x̂ [C, H, W] (label y_hat) from `net` in place; `params` are its trainable
    parameters (requires_grad set). `retain` yields index batches into train_x; `generator` draws
    the training noise. Returns the stop reason and loss trace."""
    t0 = time.perf_counter()
    net.eval()
    opt = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    info = UnlearnInfo()
    device = train_x.device
    while True:
        idx = next(retain).to(device)
        x_r = train_x[idx]
        y_r = None if train_y is None else train_y[idx]
        x_f = x_hat.unsqueeze(0).expand_as(x_r)
        y_f = None if y_hat is None else y_hat.unsqueeze(0).expand(x_r.shape[0], *y_hat.shape)
        eps_r, lev_r = den.training_noise(x_r.shape, generator, cfg.t_sched_train, device)
        if cfg.use_same_noise_train:
            eps_f, lev_f = eps_r, lev_r
        else:
            eps_f, lev_f = den.training_noise(x_f.shape, generator, cfg.t_sched_train, device)
        loss_r = den.loss(x_r, eps_r, lev_r, y_r, net=net).mean()
        loss_f = den.loss(x_f, eps_f, lev_f, y_f, net=net).clamp(max=loss_null).mean()
        lr_val, lf_val = loss_r.item(), loss_f.item()  # one host sync per step (the stop rule)
        info.loss_r, info.loss_f = lr_val, lf_val
        info.trace.append((lr_val, lf_val))
        if progress is not None:
            progress(info)
        reason = "nan" if not math.isfinite(lr_val) else stop_reason(info.steps, lf_val, loss_null, cfg)
        if reason is not None:
            info.stop = reason
            break
        opt.zero_grad(set_to_none=True)
        (loss_r - cfg.lamb * loss_f).backward()
        opt.step()
        info.steps += 1
    info.seconds = time.perf_counter() - t0
    return info
