"""Mirrored, bounded unlearning of K targets x̂_k at once (spec/MUCS.md, "Unlearning one target").

Each step, for every target still running, with its current weights θ_k:
    L_r = mean_i L(x_r,i; ε_i, σ_i)                      retain batch: B training images
    L_f = mean_i min(L(x̂; ε'_i, σ'_i), L_null)          forget batch: x̂ repeated B times
    stop if L_f ≥ (1 − tolerance)·L_null   (or after exactly max_steps steps when given)
    θ ← AdamW step on  L_r − λ·L_f

The clamp at L_null is the bound: once a forget sample is as badly denoised as by a model that knows
nothing, it stops pushing. The model stays in eval mode (dropout off), as in the reference.
K = 1 is the same loop with one copy (the plain one-model MUCS lives in tests/oracle.py, the
hand-written check of this loop).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterator, Optional

import torch

from .config import MUCSConfig
from .data import Source
from .denoisers import Denoiser
from .functional import StackedNet, flat_views
from .ops import masked_adamw_step


class RetainStream:
    """Batches of B training indices: a fresh random permutation per epoch, incomplete last batch
    dropped — the reference's `DataLoader(shuffle=True, drop_last=True)`, but with its own generator
    so each target's stream is reproducible on its own."""

    def __init__(self, N: int, B: int, generator: torch.Generator):
        if B > N:
            raise ValueError(
                f"batch size B={B} exceeds the training set size N={N}; "
                f"pass MUCSConfig(batch_size=<= {N})"
            )
        self.N, self.B, self.generator = N, B, generator
        self._perm: Optional[torch.Tensor] = None
        self._pos = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._perm is None or self._pos + self.B > self.N:
            self._perm = torch.randperm(self.N, generator=self.generator)
            self._pos = 0
        idx = self._perm[self._pos : self._pos + self.B]
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


def check_loss_null(value: float) -> float:
    """L_null as a bound: finite and > 0 (a fresh model whose losses are NaN or 0 cannot bound the
    ascent); ValueError naming the way out otherwise."""
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"loss_null='auto' gave {value}: the freshly initialized model produces "
            "non-finite or zero losses; pass loss_null=<number> (MUCSConfig(loss_null=...))"
        )
    return value


def mirrored_objective(
    loss_r: torch.Tensor, loss_f: torch.Tensor, loss_null: float, lamb: float, bounded: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_r, L_f, objective) from per-sample losses [..., B] of the retain and forget batches.

    L_r = mean L(x_r), L_f = mean min(L(x̂), L_null) (no clamp when not `bounded`: the ablation),
    objective = L_r − λ·L_f: descending it keeps the data and pushes the target's loss up to the
    bound.
    """
    loss_f = loss_f.clamp(max=loss_null) if bounded else loss_f
    L_r, L_f = loss_r.mean(-1), loss_f.mean(-1)
    return L_r, L_f, L_r - lamb * L_f


def unlearn_batched(
    den: Denoiser,
    net: torch.nn.Module,
    names: list,
    train_x: Source,
    train_y: Optional[torch.Tensor],
    x_hats: torch.Tensor,
    y_hats: Optional[torch.Tensor],
    *,
    cfg: MUCSConfig,
    loss_null: float,
    lr: float,
    retains: list,
    generators: list,
    progress: Optional[Callable] = None,
):
    """Unlearn K targets at once: K stacked copies of the trainable weights (`names`) of `net`,
    one vmapped forward/backward per step for all targets still running.

    Each target k has its own retain stream `retains[k]`, noise generator `generators[k]`, AdamW
    state and step clock, and stops on its own (stop rule, cap, NaN); stopped targets leave the
    stack, so the others run at the cost of the survivors only. With the same streams, target k
    follows the trajectory `unlearn` would give it alone (up to float rounding: vmapped matmuls).

    The trainable weights of all running targets live in one flat [K, P] buffer (per-parameter
    views feed the network), so the gradient arrives as one [K, P] tensor and one fused
    `masked_adamw_step` updates every weight of every target.

    Returns ({name: [K, ...] unlearned weights}, [UnlearnInfo] * K).
    """
    t0 = time.perf_counter()
    net.eval()
    K = x_hats.shape[0]
    B = cfg.B
    device = x_hats.device
    params = dict(net.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    stack = StackedNet(
        net,
        flat_views(torch.zeros(1, sum(params[n].numel() for n in names), device=device), shapes),
    )
    W = torch.cat([params[n].detach().reshape(1, -1) for n in names], 1).repeat(K, 1)  # [K, P]
    final = W.clone()
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    steps = torch.zeros(K, dtype=torch.int64)
    infos = [UnlearnInfo() for _ in range(K)]
    active = list(range(K))  # original index of each row of W, m, v
    x_f = y_f = None
    while active:
        A = len(active)
        if x_f is None or x_f.shape[0] != A:  # the forget batches change only when targets leave
            x_f = x_hats[active].unsqueeze(1).expand(A, B, *x_hats.shape[1:])
            y_f = (
                None
                if y_hats is None
                else y_hats[active].unsqueeze(1).expand(A, B, *y_hats.shape[1:])
            )
        x, eps, lev, y = _step_batch(
            den, train_x, train_y, x_f, y_f, active, retains, generators, cfg, device
        )
        W.requires_grad_(True)
        L = stack.loss(den, x, eps, lev, y, weights=flat_views(W, shapes))  # [A, 2B]
        loss_r, loss_f, objective = mirrored_objective(
            L[:, :B], L[:, B:], loss_null, cfg.lamb, cfg.bounded
        )
        vals = (
            torch.stack([loss_r, loss_f], 1).detach().cpu()
        )  # the one host sync per step (the stop rule)
        keep = _stop_or_keep(infos, active, vals, loss_null, cfg, t0, W, final)
        if keep:
            cont = torch.zeros(A, dtype=torch.bool)
            cont[keep] = True
            (grad,) = torch.autograd.grad(objective[cont.to(device, non_blocking=True)].sum(), [W])
            steps_a = steps[active] + cont.long()
            masked_adamw_step(
                [W.detach()],
                [grad],
                [m],
                [v],
                steps_a,
                cont,
                lr,
                cfg.betas[0],
                cfg.betas[1],
                cfg.adam_eps,
                cfg.weight_decay,
            )
            for i in keep:
                infos[active[i]].steps += 1
            steps[active] = steps_a
        W = W.detach()
        if len(keep) < A:  # compact: finished targets leave the stack
            sel = torch.tensor(keep, dtype=torch.long).to(device, non_blocking=True)
            W, m, v = W[sel], m[sel], v[sel]
            active = [active[i] for i in keep]
        if progress is not None:
            progress(infos, active)
    return flat_views(final, shapes), infos


def _step_batch(den, train_x: Source, train_y, x_f, y_f, active, retains, generators, cfg, device):
    """(x, ε, levels, y), each [A, 2B, ...]: every running target's retain batch (its own positions
    and training noise), then its forget batch (x̂ repeated B times, its own noise) — one forward
    per step for both."""
    idx = torch.stack([next(retains[k]) for k in active])  # [A, B] on the CPU, like a DataLoader's
    x_r = train_x.take(idx, device)
    y_r = None if train_y is None else train_y[idx.to(train_y.device)]
    noise_r, noise_f = [], []
    for k in active:
        noise_r.append(den.training_noise(x_r.shape[1:], generators[k], cfg.t_sched_train, device))
        noise_f.append(
            noise_r[-1]
            if cfg.use_same_noise_train
            else den.training_noise(x_r.shape[1:], generators[k], cfg.t_sched_train, device)
        )
    x = torch.cat([x_r, x_f], 1)
    eps = torch.cat([torch.stack([e for e, _ in noise_r]), torch.stack([e for e, _ in noise_f])], 1)
    lev = torch.cat([torch.stack([s for _, s in noise_r]), torch.stack([s for _, s in noise_f])], 1)
    y = None if train_y is None else torch.cat([y_r, y_f], 1)
    return x, eps, lev, y


def _stop_or_keep(infos, active, vals, loss_null, cfg, t0, W, final) -> list:
    """Rows of the running targets that step on; the others get their stop reason (rule, cap or
    NaN) and their weights kept in `final`. vals: [A, 2] (L_r, L_f) on the CPU."""
    keep = []
    for i, k in enumerate(active):
        info = infos[k]
        info.loss_r, info.loss_f = float(vals[i, 0]), float(vals[i, 1])
        info.trace.append((info.loss_r, info.loss_f))
        reason = (
            "nan"
            if not math.isfinite(info.loss_r)
            else stop_reason(info.steps, info.loss_f, loss_null, cfg)
        )
        if reason is None:
            keep.append(i)
        else:
            info.stop = reason
            info.seconds = time.perf_counter() - t0
            final[k] = W[i].detach()
    return keep
