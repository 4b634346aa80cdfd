"""Samplers with per-image seeds: EDM Heun (Karras et al. 2022, Algorithm 1, S_churn = 0) for EDM
denoisers and DDIM (Song et al. 2021; η = 1 with all T steps is ancestral DDPM) for diffusers
models.

Image i's randomness comes only from its own torch.Generator seeded with seeds[i] (drawn on the
CPU), so an image does not depend on the batch it is generated in, nor on the device, up to
floating-point reduction order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from . import noise as _noise

Seeds = int | Sequence[int] | torch.Tensor


def _seeds(n_or_seeds: Seeds) -> list[int]:
    if isinstance(n_or_seeds, int):
        if n_or_seeds < 0:
            raise ValueError(f"number of images must be >= 0, got {n_or_seeds}")
        return list(range(n_or_seeds))
    return [int(s) for s in torch.as_tensor(n_or_seeds).reshape(-1).tolist()]


def _image_shape(den, shape) -> tuple[int, int, int]:
    if shape is not None:
        return tuple(int(v) for v in shape)
    net = den.net
    if getattr(net, "image_size", None) is not None:
        return tuple(int(v) for v in net.image_size)
    cfg = getattr(net, "config", None)
    if cfg is not None and getattr(cfg, "sample_size", None) is not None:
        hw = cfg.sample_size
        hw = (hw, hw) if isinstance(hw, int) else tuple(hw)
        return (int(cfg.in_channels), int(hw[0]), int(hw[1]))
    raise ValueError(f"cannot tell the image shape of {type(net).__name__}; pass shape=(C, H, W)")


def _noise_from(gens: list[torch.Generator], shape) -> torch.Tensor:
    """One N(0, I) draw of `shape` per generator, stacked: [len(gens), *shape] on the CPU."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def _resolve_device(den, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(den.net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _eval(net):
    class _Ctx:
        def __enter__(self):
            self.mode = net.training
            net.eval()

        def __exit__(self, *exc):
            net.train(self.mode)

    return _Ctx()


@torch.inference_mode()
def sample_edm(
    den,
    n_or_seeds: Seeds,
    labels: torch.Tensor | None = None,
    num_steps: int = 32,
    batch_size: int = 256,
    progress: bool = True,
    device=None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
    shape=None,
) -> torch.Tensor:
    """EDM Heun sampler (Algorithm 1 of Karras et al. 2022 with S_churn = 0, i.e. deterministic
    after the initial noise), as the reference samples (num_steps = 32).

    n_or_seeds: a number n (seeds 0..n−1) or the seeds themselves; image i starts from
    σ_max·ε_i with ε_i drawn from a generator seeded with seeds[i]. labels: class ids [n] or label
    vectors (required for conditional models). σ grid: Karras levels (σ_max^{1/ρ} + s·(σ_min^{1/ρ} −
    σ_max^{1/ρ}))^ρ over num_steps, then 0; σ_min/σ_max/ρ default to the denoiser's (0.002, 80, 7).
    Returns float32 images [n, C, H, W] on the CPU (not clipped).
    """
    seeds = _seeds(n_or_seeds)
    n = len(seeds)
    C, H, W = shape = _image_shape(den, shape)
    y_all = den.prepare_labels(labels, n, "labels")
    device = _resolve_device(den, device)
    sigma_min = den.sigma_min if sigma_min is None else sigma_min
    sigma_max = den.sigma_max if sigma_max is None else sigma_max
    rho = den.rho if rho is None else rho
    t_steps = torch.cat(
        [_noise.karras_sigmas(num_steps, sigma_min, sigma_max, rho), torch.zeros(1)]
    )
    t_steps = t_steps.to(device)
    net = den.net
    out = torch.empty(n, C, H, W)

    def D(x, t):
        s = t.expand(x.shape[0])
        return net(x, s, y=y) if y is not None else net(x, s)

    batches = range(0, n, batch_size)
    bar = tqdm(total=len(batches) * num_steps, desc="sample", disable=not progress, leave=False)
    with _eval(net):
        for start in batches:
            stop = min(start + batch_size, n)
            gens = [torch.Generator().manual_seed(s) for s in seeds[start:stop]]
            y = None if y_all is None else y_all[start:stop].to(device)
            x = t_steps[0] * _noise_from(gens, shape).to(device)
            for i in range(num_steps):
                t, t_next = t_steps[i], t_steps[i + 1]
                d = (x - D(x, t)) / t
                x_next = x + (t_next - t) * d
                if i < num_steps - 1:  # 2nd-order correction, except into σ = 0
                    d_prime = (x_next - D(x_next, t_next)) / t_next
                    x_next = x + (t_next - t) * (0.5 * d + 0.5 * d_prime)
                x = x_next
                bar.update(1)
            out[start:stop] = x.float().cpu()
    bar.close()
    return out


@torch.inference_mode()
def sample_vp(
    den,
    n_or_seeds: Seeds,
    labels: torch.Tensor | None = None,
    num_steps: int = 50,
    eta: float = 0.0,
    batch_size: int = 256,
    progress: bool = True,
    device=None,
    shape=None,
    clip: bool | None = None,
) -> torch.Tensor:
    """DDIM sampler for ε-prediction VP models (`DiffusersDenoiser`).

    Timesteps: num_steps values evenly spaced from T−1 down to 0 (rounded), then ᾱ = 1.
    Step t → s: x̂₀ = (x − √(1−ᾱ_t)·ε̂)/√ᾱ_t (clipped to the scheduler's clip range when its config
    says clip_sample, or per `clip`), σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s),
    x_s = √ᾱ_s·x̂₀ + √(1−ᾱ_s−σ²)·ε̂ + σ·z. η = 0: deterministic DDIM; η = 1 with num_steps = T:
    ancestral DDPM. The initial noise and every z of image i come from its own generator
    (seeded with seeds[i]). Returns float32 images [n, C, H, W] on the CPU.
    """
    seeds = _seeds(n_or_seeds)
    n = len(seeds)
    C, H, W = shape = _image_shape(den, shape)
    y_all = den.prepare_labels(labels, n, "labels")
    device = _resolve_device(den, device)
    T = den.T
    if not 1 <= num_steps <= T:
        raise ValueError(f"sample_vp: num_steps must lie in [1, {T}], got {num_steps}")
    cfg = getattr(den.scheduler, "config", None)
    if clip is None:
        clip = bool(getattr(cfg, "clip_sample", False))
    clip_range = float(getattr(cfg, "clip_sample_range", 1.0) or 1.0)
    acp = den.alphas_cumprod.double()
    ts = torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round().long()
    a_t = acp[ts]
    a_s = torch.cat([acp[ts[1:]], torch.ones(1, dtype=torch.float64)])
    net = den.net
    out = torch.empty(n, C, H, W)

    batches = range(0, n, batch_size)
    bar = tqdm(total=len(batches) * num_steps, desc="sample", disable=not progress, leave=False)
    with _eval(net):
        for start in batches:
            stop = min(start + batch_size, n)
            gens = [torch.Generator().manual_seed(s) for s in seeds[start:stop]]
            y = None if y_all is None else y_all[start:stop].to(device)
            x = _noise_from(gens, shape).to(device)
            for i in range(num_steps):
                t = ts[i].expand(stop - start).to(device)
                o = net(x, t, class_labels=y)
                eps = o.sample if hasattr(o, "sample") else (o[0] if isinstance(o, tuple) else o)
                at, as_ = float(a_t[i]), float(a_s[i])
                x0 = (x - (1 - at) ** 0.5 * eps) / at**0.5
                if clip:
                    x0 = x0.clamp(-clip_range, clip_range)
                sigma = eta * ((1 - as_) / (1 - at)) ** 0.5 * (1 - at / as_) ** 0.5
                x = as_**0.5 * x0 + max(1 - as_ - sigma**2, 0.0) ** 0.5 * eps
                if sigma > 0:
                    x = x + sigma * _noise_from(gens, shape).to(device)
                bar.update(1)
            out[start:stop] = x.float().cpu()
    bar.close()
    return out
