"""Train a diffusion model with its own per-sample loss (for the demo, tests and benches), and
save/load checkpoints of our DiT.

The loss is the denoiser's: `den.training_noise` draws (ε, level) as the reference does (log-normal
σ for EDM nets, uniform t for DDPM models) and `den.loss` returns L per sample; the objective is its
batch mean. Optimizer: AdamW; an EMA of the weights is what gets returned (the reference's recipe).
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .denoisers import EDMDenoiser
from .models.dit import DiT

CHECKPOINT_FORMAT = "mucs_fast.dit"
CHECKPOINT_VERSION = 1


def _resolve_device(den, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(den.net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _rewrap(den, net: torch.nn.Module, train_lr: float):
    """A denoiser of den's kind and settings around `net`, with `train_lr` recorded (a shallow
    copy: every denoiser's settings carry over, whatever its class)."""
    new = copy.copy(den)
    new.net, new.train_lr = net, train_lr
    return new


def train(
    den,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    ema_decay: float = 0.999,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    device=None,
    warmup: int = 100,
    ema_warmup: bool = True,
):
    """Train `den.net` in place; return (a new denoiser wrapping a deep copy of the EMA weights,
    info dict).

    images: [N, C, H, W] in the model's data range; labels: class ids [N] or label vectors,
    converted by `den.prepare_labels` (required for conditional models). Batches: shuffled epochs
    without replacement (the last incomplete batch of an epoch is dropped; B = min(batch_size, N)).
    lr: AdamW learning rate (betas 0.9/0.999, weight decay `weight_decay`), reached by a linear
    warm-up over `warmup` steps, then constant. The default 2e-3 suits the small demo DiT (3000
    steps at batch 128 on sklearn digits give recognizable class-conditional samples); the
    reference trains its 100 M-parameter DiT at 1e-4. The returned denoiser records
    `train_lr = lr` (unlearning uses it / lr_factor).
    EMA: ema ← d·ema + (1 − d)·θ after every step with d = ema_decay; with `ema_warmup`,
    d = min(ema_decay, (1 + t)/(10 + t)) so that short runs are not dominated by the initial weights
    (the reference uses the plain decay; pass ema_warmup=False for it).
    Determinism: batches and noise come from one torch.Generator seeded with `seed`; randomness
    inside the model (dropout, label dropout) runs under a forked, seeded global RNG, so the
    caller's global RNG state is neither used nor changed. Same seed, same device → same weights.
    info: steps, batch_size, lr, ema_decay, weight_decay, seed, loss (per-step batch means),
    time_s, num_params.
    """
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"train: steps must be an int >= 0, got {steps!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"train: lr must be a positive number, got {lr!r}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"train: ema_decay must lie in [0, 1), got {ema_decay!r}")
    images = torch.as_tensor(images)
    if images.ndim != 4 or not torch.is_floating_point(images):
        raise ValueError(
            f"train: images must be a float tensor [N, C, H, W], got "
            f"{images.dtype} of shape {tuple(images.shape)}"
        )
    N = images.shape[0]
    if N == 0:
        raise ValueError("train: no images")
    y_all = den.prepare_labels(labels, N, "labels")
    device = _resolve_device(den, device)
    net = den.net.to(device)
    x_all = images.to(device, torch.float32)
    y_all = None if y_all is None else y_all.to(device)
    B = min(int(batch_size), N)

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    ema_p, net_p = list(ema.parameters()), list(net.parameters())
    ema_b, net_b = list(ema.buffers()), list(net.buffers())
    gen = torch.Generator(device=device).manual_seed(seed)

    losses: list[float] = []
    was_training = net.training
    net.train()
    t0 = time.perf_counter()
    accel = device.type != "cpu"
    with torch.random.fork_rng(
        devices=[device] if accel else [], device_type=device.type if accel else None
    ):
        torch.manual_seed(seed)
        perm, pos = None, N
        bar = tqdm(range(steps), desc="train", disable=not progress, leave=False)
        for step in bar:
            if pos + B > N:
                perm, pos = torch.randperm(N, generator=gen, device=device), 0
            idx = perm[pos : pos + B]
            pos += B
            x = x_all[idx]
            y = None if y_all is None else y_all[idx]
            eps, level = den.training_noise(x.shape, generator=gen, device=device)
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr
            loss = den.loss(x, eps, level, y, net=net).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                d = min(ema_decay, (1 + step) / (10 + step)) if ema_warmup else ema_decay
                torch._foreach_lerp_(ema_p, net_p, 1 - d)
                for b_ema, b in zip(ema_b, net_b):
                    b_ema.copy_(b)
            losses.append(loss.item())
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        bar.close()
    net.train(was_training)
    info = {
        "steps": steps,
        "batch_size": B,
        "lr": lr,
        "ema_decay": ema_decay,
        "weight_decay": weight_decay,
        "seed": seed,
        "warmup": warmup,
        "ema_warmup": ema_warmup,
        "loss": losses,
        "time_s": time.perf_counter() - t0,
        "num_params": sum(p.numel() for p in net.parameters()),
    }
    return _rewrap(den, ema, lr), info


# -- checkpoints of our DiT -----------------------------------------------------------------------
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(
            f"{where}: only str/int/float/bool/None/tensors and dicts/lists of them can "
            f"be stored (torch.load(weights_only=True)), got {type(obj).__name__}"
        )


def save_checkpoint(path, den: EDMDenoiser, extra: dict | None = None) -> None:
    """Write our DiT (constructor args + state dict), its EDM settings and train_lr to one file,
    atomically (a temporary file in the same folder, then os.replace). `extra`: plain values only
    (str/int/float/bool/None/tensors, dicts and lists of them), returned by load_checkpoint."""

    if not isinstance(den, EDMDenoiser) or not isinstance(den.net, DiT):
        raise TypeError(
            f"save_checkpoint: expected an EDMDenoiser around mucs_fast.models.DiT, got "
            f"{type(den).__name__} around {type(getattr(den, 'net', None)).__name__}"
        )
    extra = {} if extra is None else extra
    _check_plain(extra, "save_checkpoint: extra")
    net = den.net
    args = [list(a) if isinstance(a, tuple) else a for a in net.args]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "args": args,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "train_lr": None if den.train_lr is None else float(den.train_lr),
        "edm": {
            "sigma_data": den.sigma_data,
            "P_mean": den.P_mean,
            "P_std": den.P_std,
            "sigma_min": den.sigma_min,
            "sigma_max": den.sigma_max,
            "rho": den.rho,
        },
        "extra": extra,
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, device=None, with_extra: bool = False):
    """Read a file written by save_checkpoint (torch.load with weights_only=True) → EDMDenoiser
    around a DiT in eval mode (or (den, extra) with `with_extra`)."""

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: expected a {CHECKPOINT_FORMAT} checkpoint (save_checkpoint), "
            f"found {type(ck).__name__} without that format tag"
        )
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {ck.get('version')!r}, this mucs_fast reads "
            f"version {CHECKPOINT_VERSION}"
        )
    net = DiT(*ck["args"])
    net.load_state_dict(ck["state_dict"])
    net.eval()
    if device is not None:
        net.to(device)
    edm = ck["edm"]
    den = EDMDenoiser(
        net,
        sigma_data=edm["sigma_data"],
        P_mean=edm["P_mean"],
        P_std=edm["P_std"],
        sigma_min=edm["sigma_min"],
        sigma_max=edm["sigma_max"],
        rho=edm["rho"],
        train_lr=ck["train_lr"],
    )
    return (den, ck["extra"]) if with_extra else den
