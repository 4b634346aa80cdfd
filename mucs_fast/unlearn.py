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


def mirrored_objective(loss_r: torch.Tensor, loss_f: torch.Tensor, loss_null: float, lamb: float,
                       bounded: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_r, L_f, objective) from per-sample losses [..., B] of the retain and forget batches.

    L_r = mean L(x_r), L_f = mean min(L(x̂), L_null) (no clamp when not `bounded`: the ablation),
    objective = L_r − λ·L_f: descending it keeps the data and pushes the target's loss up to the bound.
    """
    loss_f = loss_f.clamp(max=loss_null) if bounded else loss_f
    L_r, L_f = loss_r.mean(-1), loss_f.mean(-1)
    return L_r, L_f, L_r - lamb * L_f


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
        loss_f = den.loss(x_f, eps_f, lev_f, y_f, net=net)
        loss_f = (loss_f.clamp(max=loss_null) if cfg.bounded else loss_f).mean()
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


def unlearn_batched(den: Denoiser, net: torch.nn.Module, names: list, train_x: torch.Tensor,
                    train_y: Optional[torch.Tensor], x_hats: torch.Tensor, y_hats: Optional[torch.Tensor], *,
                    cfg: MUCSConfig, loss_null: float, lr: float, retains: list, generators: list,
                    progress: Optional[Callable] = None):
    """Unlearn K targets at once: K stacked copies of the trainable weights (`names`) of `net`,
    one vmapped forward/backward per step for all targets still running.

    Each target k has its own retain stream `retains[k]`, noise generator `generators[k]`, AdamW
    state and step clock, and stops on its own (stop rule, cap, NaN); stopped targets leave the
    stack, so the others run at the cost of the survivors only. With the same streams, target k
    follows the trajectory `unlearn` would give it alone (up to float rounding: vmapped matmuls).

    The trainable weights of all running targets live in one flat [K, P] buffer (per-parameter
    views feed the network), so the gradient arrives as one [K, P] tensor and one fused
    `bounded_adamw_step` updates every weight of every target.

    Returns ({name: [K, ...] unlearned weights}, [UnlearnInfo] * K).
    """
    from .functional import StackedNet, flat_views
    from .ops import bounded_adamw_step

    t0 = time.perf_counter()
    net.eval()
    K = x_hats.shape[0]
    B = cfg.B
    device = train_x.device
    params = dict(net.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    stack = StackedNet(net, flat_views(torch.zeros(1, sum(params[n].numel() for n in names),
                                                   device=device), shapes))
    W = torch.cat([params[n].detach().reshape(1, -1) for n in names], 1).repeat(K, 1)  # [K, P]
    final = W.clone()
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    steps = torch.zeros(K, dtype=torch.int64)
    infos = [UnlearnInfo() for _ in range(K)]
    active = list(range(K))  # original index of each row of W, m, v
    while active:
        A = len(active)
        idx = torch.stack([next(retains[k]) for k in active]).to(device)  # [A, B]
        x_r = train_x[idx]
        y_r = None if train_y is None else train_y[idx]
        noise_r, noise_f = [], []
        for k in active:
            noise_r.append(den.training_noise(x_r.shape[1:], generators[k], cfg.t_sched_train, device))
            noise_f.append(noise_r[-1] if cfg.use_same_noise_train else
                           den.training_noise(x_r.shape[1:], generators[k], cfg.t_sched_train, device))
        x_f = x_hats[active].unsqueeze(1).expand_as(x_r)
        x = torch.cat([x_r, x_f], 1)  # [A, 2B, ...]: retain then forget, one forward per step
        eps = torch.cat([torch.stack([e for e, _ in noise_r]), torch.stack([e for e, _ in noise_f])], 1)
        lev = torch.cat([torch.stack([s for _, s in noise_r]), torch.stack([s for _, s in noise_f])], 1)
        y = None
        if train_y is not None:
            y_f = y_hats[active].unsqueeze(1).expand(A, B, *y_hats.shape[1:])
            y = torch.cat([y_r, y_f], 1)
        W.requires_grad_(True)
        L = stack.loss(den, x, eps, lev, y, weights=flat_views(W, shapes))  # [A, 2B]
        loss_r = L[:, :B].mean(1)
        loss_f = (L[:, B:].clamp(max=loss_null) if cfg.bounded else L[:, B:]).mean(1)
        vals = torch.stack([loss_r, loss_f], 1).detach().cpu()  # one host sync per step for all targets
        keep = []
        for i, k in enumerate(active):
            info = infos[k]
            info.loss_r, info.loss_f = float(vals[i, 0]), float(vals[i, 1])
            info.trace.append((info.loss_r, info.loss_f))
            reason = "nan" if not math.isfinite(info.loss_r) else \
                stop_reason(info.steps, info.loss_f, loss_null, cfg)
            if reason is None:
                keep.append(i)
            else:
                info.stop = reason
                info.seconds = time.perf_counter() - t0
                final[k] = W[i].detach()
        if keep:
            cont = torch.zeros(A, dtype=torch.bool)
            cont[keep] = True
            objective = (loss_r - cfg.lamb * loss_f)[cont.to(device)].sum()
            (grad,) = torch.autograd.grad(objective, [W])
            steps_a = steps[active] + cont.long()
            bounded_adamw_step([W.detach()], [grad], [m], [v], steps_a, cont, lr, cfg.betas[0], cfg.betas[1],
                               cfg.adam_eps, cfg.weight_decay)
            for i in keep:
                infos[active[i]].steps += 1
            steps[active] = steps_a
        W = W.detach()
        if len(keep) < A:  # compact: finished targets leave the stack
            sel = torch.tensor(keep, dtype=torch.long, device=device)
            W, m, v = W[sel], m[sel], v[sel]
            active = [active[i] for i in keep]
        if progress is not None:
            progress(infos, active)
    return flat_views(final, shapes), infos
