"""Denoisers: the per-sample diffusion loss L(x, ε, level, y) of a network, EDM or VP/DDPM.

A denoiser owns the model's noise parametrization (σ for EDM, integer timesteps for VP), its
training/inference noise levels, label handling and the per-sample loss; the engine (unlearn,
score) only sees `loss(x, eps, level, y, net=...)` returning one loss per sample.

`net=` lets the engine evaluate the same loss with other weights (a deep copy, or a
`torch.func.functional_call` over K stacked weight sets) without the denoiser knowing.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Callable, Optional

import torch

from . import noise as _noise
from ._io import tensor_digest
from .config import REFERENCE_FROZEN, FrozenSpec
from .data import ConcatSource, Source, TensorSource, check_labels
from .ops import edm_loss, noisy_inputs


class Denoiser:
    """Common interface. Subclasses set `net`, `level_dtype` and implement the hooks."""

    net: torch.nn.Module
    level_dtype: torch.dtype = torch.float32
    conditional: bool = False
    label_dim: Optional[int] = None
    train_lr: Optional[float] = None

    # -- noise levels -------------------------------------------------------------------------
    def inference_levels(
        self, M: int, t_sched, generator: Optional[torch.Generator] = None, device=None
    ) -> torch.Tensor:
        raise NotImplementedError

    def training_noise(
        self, shape, generator: Optional[torch.Generator] = None, t_sched=None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps [B, C, H, W], level [B]) drawn as the reference does: levels first, then ε."""
        raise NotImplementedError

    def sigma_of(self, level: torch.Tensor) -> torch.Tensor:
        """Equivalent EDM σ of each level (noise std relative to the signal)."""
        raise NotImplementedError

    def full_grid(self, M: int, device=None) -> torch.Tensor:
        """Levels of the whole inference grid with M levels (t_sched = 1): used by
        t_sched="auto"."""
        return self.inference_levels(M, 1.0, device=device)

    # -- loss -----------------------------------------------------------------------------------
    def loss(self, x, eps, level, y=None, net: Optional[Callable] = None) -> torch.Tensor:
        """Per-sample loss [B] (fp32 accumulation) of images x under noise (ε, level)."""
        raise NotImplementedError

    def grid_terms(self, eps: torch.Tensor, level: torch.Tensor, n: int) -> dict:
        """What `grid_loss` needs of the noise alone, for chunks of n images: the same for every
        chunk of a fixed bank, so a scoring pass builds it once (per-row preconditioning,
        levels)."""
        return {"level": level.repeat_interleave(n)}

    def grid_loss(
        self, x, eps, level, y=None, net: Optional[Callable] = None, terms: Optional[dict] = None
    ) -> torch.Tensor:
        """Loss [M, n] of every (noise m, image j) pair: the scoring pass's unit of work.

        x [n, C, H, W]; eps [M, C, H, W] (one noise per sample, shared by all images: the bank) or
        [M, n, C, H, W]; level [M]; y: labels of the n images; terms: `grid_terms(eps, level, n)`
        (computed here when not given). The batch is noise-major, (m n), as in the reference.
        Subclasses build it with the fused `noisy_inputs` op.
        """
        M, n = level.shape[0], x.shape[0]
        terms = self.grid_terms(eps, level, n) if terms is None else terms
        xx = _rows(x, M)
        ee = (
            _rows(eps, n, per_sample=True)
            if eps.dim() == x.dim()
            else eps.reshape(M * n, *x.shape[1:])
        )
        return self.loss(xx, ee, terms["level"], _label_rows(y, M), net=net).view(M, n)

    # -- model facts ----------------------------------------------------------------------------
    def fresh_net(self) -> torch.nn.Module:
        """A freshly initialized model of the same architecture (for loss_null="auto")."""
        raise NotImplementedError

    def fresh_net_error(self) -> Optional[str]:
        """Why `fresh_net` cannot work (None when it can): checked before any heavy compute."""
        return None

    def default_frozen(self) -> FrozenSpec:
        return REFERENCE_FROZEN

    def prepare_labels(
        self, y: Optional[torch.Tensor], n: int, what: str
    ) -> Optional[torch.Tensor]:
        """Validate labels for `n` images and convert them to what the net takes (None for an
        unconditional model). Raises ValueError naming `what` (e.g. "train_labels")."""
        if not self.conditional:
            if y is not None:  # silently dropping them would hide a wrong model or a wrong file
                raise ValueError(
                    f"{what}: labels were given, but the model is unconditional; "
                    "pass no labels (or a class-conditional model)"
                )
            return None
        if y is None:
            raise ValueError(
                f"{what}: the model is class-conditional (label_dim={self.label_dim}) but no "
                "labels "
                f"were given; pass {what}=<tensor [{n}] of class ids or [{n}, {self.label_dim}]>"
            )
        y = torch.as_tensor(y).detach()
        if y.ndim and y.shape[0] != n:
            raise ValueError(
                f"{what}: expected {n} labels (one per image), got shape {tuple(y.shape)}"
            )
        # class ids int64 [n] or finite label vectors float32 [n, D] (data.checks: one rule for
        # labels, whatever reads them); then what this model takes
        return self._convert_labels(check_labels(y, n, what), what)

    def _convert_labels(self, y: torch.Tensor, what: str) -> torch.Tensor:
        raise NotImplementedError

    def forward_labels(self, y: Optional[torch.Tensor], device=None) -> Optional[torch.Tensor]:
        """Labels as the forward takes them, made outside any vmap or compiled region (the engine
        calls this on each batch's labels before the batched forward): the labels themselves
        here; a text model reads its condition rows, which may live in files."""
        return y

    def label_values(self, y: torch.Tensor) -> torch.Tensor:
        """What converted labels y mean, as the run key digests them: the labels themselves here;
        a text model's condition ids select rows of its condition table, which it returns."""
        return y

    def fingerprint(self) -> str:
        """Digest of the architecture and weights (the cache key of the original model)."""

        sd = {k: v for k, v in self.net.state_dict().items()}
        h = hashlib.sha256(type(self).__name__.encode())
        h.update(type(self.net).__qualname__.encode())
        h.update(repr(self._fingerprint_extra()).encode())
        h.update(tensor_digest(sd).encode())
        return h.hexdigest()[:32]

    def _fingerprint_extra(self):
        return ()


def _rows(t: torch.Tensor, reps: int, per_sample: bool = False) -> torch.Tensor:
    """Noise-major rows: images x [n, ...] → [reps·n, ...] (x repeated per noise); per_sample:
    noises ε [M, ...] → [M·reps, ...] (each noise repeated for the reps images)."""
    if per_sample:
        return t.unsqueeze(1).expand(t.shape[0], reps, *t.shape[1:]).reshape(-1, *t.shape[1:])
    return t.unsqueeze(0).expand(reps, *t.shape).reshape(-1, *t.shape[1:])


def _label_rows(y: Optional[torch.Tensor], M: int) -> Optional[torch.Tensor]:
    return None if y is None else y.repeat(M, *([1] * (y.dim() - 1)))


def _is_class_ids(y: torch.Tensor) -> bool:
    return y.ndim == 1 and not torch.is_floating_point(y)


def _check_class_range(y: torch.Tensor, label_dim: int, what: str) -> None:
    if y.numel() and (y.min() < 0 or y.max() >= label_dim):
        raise ValueError(
            f"{what}: class ids must lie in [0, {label_dim}), "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)², the EDM loss weight, written as in the reference for bitwise
    agreement (the drop-in's replay weighs its losses with this too)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMDenoiser(Denoiser):
    """EDM-preconditioned networks (Karras et al. 2022), called like the reference:
    `net(x_noisy, sigma [B], y=[B, label_dim] or None)` returning the denoised D(x_noisy; σ).

    Loss: L = λ(σ)·mean_{C,H,W}(D − x)², λ(σ) = (σ² + σ_d²)/(σ·σ_d)².

    Attributes of reference models are read when present: `sigma_data`, `sigma_P_mean`,
    `sigma_P_std`, `unconditional`, `cond_dim`; explicit arguments win.

    null_factory: builds a fresh, untrained copy of the architecture (loss_null="auto"). Defaults:
    reference models (`net.args`) are rebuilt with `type(net)(*net.args)`; otherwise required.
    train_lr: the learning rate the model was trained with (unlearning uses train_lr / lr_factor).
    raw: evaluate the raw network F(c_in·x_noisy, c_noise, y) (`net.network`, as mucs_fast's DiT
    exposes) and let the loss op apply c_skip/c_out (one fused pass instead of the net's own
    elementwise preconditioning). None: when `net` has a `network` method. Same loss, to rounding.
    """

    level_dtype = torch.float32

    def __init__(
        self,
        net: torch.nn.Module,
        sigma_data: Optional[float] = None,
        P_mean: Optional[float] = None,
        P_std: Optional[float] = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        label_dim: Optional[int] = None,
        null_factory: Optional[Callable[[], torch.nn.Module]] = None,
        train_lr: Optional[float] = None,
        raw: Optional[bool] = None,
    ):
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"EDMDenoiser: net must be a torch.nn.Module, got {type(net).__name__}")
        self.raw = callable(getattr(net, "network", None)) if raw is None else bool(raw)
        self.net = net
        self.sigma_data = float(
            sigma_data if sigma_data is not None else getattr(net, "sigma_data", 0.5)
        )
        self.P_mean = float(P_mean if P_mean is not None else getattr(net, "sigma_P_mean", -1.2))
        self.P_std = float(P_std if P_std is not None else getattr(net, "sigma_P_std", 1.2))
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        if label_dim is None:
            label_dim = getattr(net, "cond_dim", getattr(net, "label_dim", None))
        self.label_dim = int(label_dim) if label_dim else None
        unconditional = getattr(net, "unconditional", None)
        self.conditional = bool(self.label_dim) and unconditional is not True
        self.null_factory = null_factory
        self.train_lr = train_lr if train_lr is not None else getattr(net, "train_lr", None)
        if not self.sigma_data > 0:
            raise ValueError(f"EDMDenoiser: sigma_data must be > 0, got {self.sigma_data}")

    # σ and λ(σ) --------------------------------------------------------------------------------
    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return edm_weight(sigma, self.sigma_data)

    def precond(self, sigma: torch.Tensor):
        """EDM preconditioning (c_skip, c_out, c_in, c_noise), each [B], as the reference's nets."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = (sigma + 1e-6).log() / 4
        return c_skip, c_out, c_in, c_noise

    def sigma_of(self, level):
        return level

    def inference_levels(self, M, t_sched, generator=None, device=None):
        if t_sched is None:  # log-normal, as in training
            s = torch.randn(M, generator=generator, device=device)
            return (self.P_std * s + self.P_mean).exp()
        num = _noise.grid_size(M, t_sched)
        return _noise.karras_sigmas(num, self.sigma_min, self.sigma_max, self.rho, device=device)[
            :M
        ]

    def training_noise(self, shape, generator=None, t_sched=None, device=None):
        B = shape[0]
        if t_sched is None:
            s = torch.randn(B, generator=generator, device=device)
            sigma = (self.P_std * s + self.P_mean).exp()
        else:
            num = _noise.grid_size(B, t_sched)
            s = torch.rand(num, generator=generator, device=device).sort().values
            sigma = _noise.karras_sigma(s, self.sigma_min, self.sigma_max, self.rho)[:B]
        eps = torch.randn(tuple(shape), generator=generator, device=device)
        return eps, sigma

    def noisy(self, x, eps, sigma):
        """x + σ·ε (σ·ε first, as the reference builds its noise tensor)."""
        return x + sigma.view(-1, *([1] * (x.ndim - 1))) * eps

    def loss(self, x, eps, level, y=None, net=None):
        net = self.net if net is None else net
        sigma = level
        x_noisy = self.noisy(x, eps, sigma)
        if self.raw:
            c_skip, c_out, c_in, c_noise = self.precond(sigma)
            F = net.network(c_in.view(-1, *([1] * (x.ndim - 1))) * x_noisy, c_noise, y)
            return edm_loss(F, x_noisy, x, c_skip, c_out, self.weight(sigma))
        D = net(x_noisy, sigma, y=y)
        # D-form: the net applies c_skip/c_out itself, so the op sees c_skip = 0, c_out = 1.
        return edm_loss(D, None, x, None, None, self.weight(sigma))

    def grid_terms(self, eps, level, n):
        sigma = level
        per_row = lambda v: v.repeat_interleave(n)  # noqa: E731 — [M] per-noise → [M·n] per-row
        terms = {
            "ones": torch.ones_like(sigma),
            "sigma": sigma,
            "weight": per_row(self.weight(sigma)),
        }
        if (
            self.raw
        ):  # x_in = c_in·(x + σε) in one pass; c_skip·x_noisy = (c_skip/c_in)·x_in in the loss
            c_skip, c_out, c_in, c_noise = self.precond(sigma)
            terms.update(
                c_in=c_in,
                c_noise=per_row(c_noise),
                c_skip_in=per_row(c_skip / c_in),
                c_out=per_row(c_out),
            )
        else:
            terms.update(sigma_rows=per_row(sigma))
        return terms

    def grid_loss(self, x, eps, level, y=None, net=None, terms=None):
        net = self.net if net is None else net
        M, n = level.shape[0], x.shape[0]
        t = self.grid_terms(eps, level, n) if terms is None else terms
        target = _rows(x, M)
        yy = _label_rows(y, M)
        if self.raw:
            x_in = noisy_inputs(x, eps, t["ones"], t["sigma"], t["c_in"])
            F = net.network(x_in, t["c_noise"], yy)
            L = edm_loss(F, x_in, target, t["c_skip_in"], t["c_out"], t["weight"])
        else:
            x_noisy = noisy_inputs(x, eps, t["ones"], t["sigma"], None)
            D = net(x_noisy, t["sigma_rows"], y=yy)
            L = edm_loss(D, None, target, None, None, t["weight"])
        return L.view(M, n)

    # labels / models ---------------------------------------------------------------------------
    def _convert_labels(self, y, what):
        if _is_class_ids(y):
            _check_class_range(y, self.label_dim, what)
            return torch.nn.functional.one_hot(y, self.label_dim).float()
        if y.shape[1] != self.label_dim:
            raise ValueError(
                f"{what}: expected class ids [N] or label vectors [N, {self.label_dim}], "
                f"got shape {tuple(y.shape)} ({y.dtype})"
            )
        return y

    def fresh_net_error(self):
        if self.null_factory is not None or isinstance(getattr(self.net, "args", None), tuple):
            return None
        return (
            'loss_null="auto" needs a freshly initialized copy of the model, but EDMDenoiser '
            "cannot "
            "build one for %s: pass EDMDenoiser(..., null_factory=<callable returning a new "
            "model>) "
            "or a number as MUCSConfig(loss_null=...)" % type(self.net).__name__
        )

    def fresh_net(self):
        if self.fresh_net_error() is not None:
            raise ValueError(self.fresh_net_error())
        if self.null_factory is not None:
            return self.null_factory()
        return type(self.net)(*copy.deepcopy(self.net.args))

    def _fingerprint_extra(self):
        return (
            self.sigma_data,
            self.P_mean,
            self.P_std,
            self.sigma_min,
            self.sigma_max,
            self.rho,
            self.raw,
        )


class DiffusersDenoiser(Denoiser):
    """diffusers models trained with a DDPM-style scheduler (ε-prediction): `UNet2DModel`,
    `DiTTransformer2DModel` (and anything called `model(x_t, t, class_labels=...)` with `.sample`).

    Loss: the model's own training loss L = mean_{C,H,W}(ε − ε_θ(√ᾱ_t·x + √(1−ᾱ_t)·ε, t, y))², i.e.
    λ = 1/σ_t² in the D-form with σ_t = √((1−ᾱ_t)/ᾱ_t). Training levels: t uniform over the
    scheduler's timesteps. Inference grid: int(M / t_sched) timesteps evenly spaced from T−1 down to
    0, the first (noisiest) M kept — the analogue of the EDM grid.
    """

    level_dtype = torch.int64

    def __init__(
        self,
        model: torch.nn.Module,
        scheduler,
        train_lr: Optional[float] = None,
        num_classes: Optional[int] = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"DiffusersDenoiser: model must be a torch.nn.Module, got {type(model).__name__}"
            )
        pred = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(
                f"DiffusersDenoiser supports ε-prediction schedulers only, got "
                f"prediction_type={pred!r}"
            )
        self._init_schedule(model, scheduler, train_lr)
        cfg = getattr(model, "config", {})
        get = (lambda k: getattr(cfg, k, None)) if not isinstance(cfg, dict) else cfg.get
        n_cls = num_classes
        if n_cls is None:
            n_cls = get("num_class_embeds")  # UNet2DModel
        if n_cls is None and get("norm_type") == "ada_norm_zero":
            n_cls = get("num_embeds_ada_norm")  # DiTTransformer2DModel
        self.label_dim = int(n_cls) if n_cls else None
        self.conditional = self.label_dim is not None

    def _init_schedule(self, model, scheduler, train_lr) -> None:
        """The net, the scheduler's ᾱ_t (fp32, CPU; per-device copies made on use) and T."""
        self.net, self.scheduler, self.train_lr = model, scheduler, train_lr
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32).cpu()
        self.T = int(self.alphas_cumprod.numel())
        self._acp = {}

    def _alphas(self, device):
        key = str(device)
        if key not in self._acp:
            self._acp[key] = self.alphas_cumprod.to(device)
        return self._acp[key]

    def sigma_of(self, level):
        acp = self._alphas(level.device)[level]
        return ((1 - acp) / acp).sqrt()

    def inference_levels(self, M, t_sched, generator=None, device=None):
        if t_sched is None:
            return torch.randint(0, self.T, (M,), generator=generator, device=device)
        num = _noise.grid_size(M, t_sched)
        s = torch.linspace(0, 1, num, dtype=torch.float64)
        t = torch.round((self.T - 1) * (1 - s)).long()[:M]
        return t.to(device)

    def training_noise(self, shape, generator=None, t_sched=None, device=None):
        B = shape[0]
        if t_sched is None:
            t = torch.randint(0, self.T, (B,), generator=generator, device=device)
        else:
            num = _noise.grid_size(B, t_sched)
            s = torch.rand(num, generator=generator, device=device).sort().values
            t = torch.round((self.T - 1) * (1 - s)).long()[:B]
        eps = torch.randn(tuple(shape), generator=generator, device=device)
        return eps, t

    def noisy(self, x, eps, t):
        acp = self._alphas(x.device)[t].view(-1, *([1] * (x.ndim - 1)))
        return acp.sqrt() * x + (1 - acp).sqrt() * eps

    def loss(self, x, eps, level, y=None, net=None):
        net = self.net if net is None else net
        x_t = self.noisy(x, eps, level)
        out = net(x_t, level, class_labels=y)
        return edm_loss(
            _sample(out), None, eps, None, None, torch.ones(x.shape[0], device=x.device)
        )

    def grid_terms(self, eps, level, n):
        M = level.shape[0]
        acp = self._alphas(level.device)[level]
        terms = {
            "a": acp.sqrt(),
            "b": (1 - acp).sqrt(),
            "level": level.repeat_interleave(n),
            "weight": torch.ones(M * n, device=level.device),
        }
        if eps.dim() == 4:  # the shared bank: the regression target ε is the same for every chunk
            terms["target"] = _rows(eps, n, per_sample=True)
        return terms

    def grid_loss(self, x, eps, level, y=None, net=None, terms=None):
        net = self.net if net is None else net
        M, n = level.shape[0], x.shape[0]
        t = self.grid_terms(eps, level, n) if terms is None else terms
        x_t = noisy_inputs(x, eps, t["a"], t["b"], None)
        out = net(x_t, t["level"], class_labels=_label_rows(y, M))
        target = t["target"] if eps.dim() == x.dim() else eps.reshape(M * n, *x.shape[1:])
        return edm_loss(_sample(out), None, target, None, None, t["weight"]).view(M, n)

    def _convert_labels(self, y, what):
        if not _is_class_ids(y):
            if y.shape[1] == self.label_dim:
                return y.argmax(1)  # one-hot → class ids
            raise ValueError(
                f"{what}: expected class ids [N] (int) or one-hot [N, {self.label_dim}], "
                f"got shape {tuple(y.shape)} ({y.dtype})"
            )
        _check_class_range(y, self.label_dim, what)
        return y

    def fresh_net(self):
        return type(self.net).from_config(self.net.config)

    def default_frozen(self):
        is_dit = any(n.startswith("transformer_blocks.") for n, _ in self.net.named_parameters())
        return diffusers_dit_frozen if is_dit else diffusers_unet_frozen

    def _fingerprint_extra(self):
        return (self.T, float(self.alphas_cumprod.sum()))


def _sample(out):
    """diffusers models return an output object (`.sample`) or a tuple; plain nets a tensor."""
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


def diffusers_dit_frozen(name: str, p: torch.nn.Parameter) -> bool:
    """Default trainable set of diffusers transformers (DiTTransformer2DModel), the analogue of the
    reference's DiT choice: the feed-forward weight matrices and the class embedding; everything
    else (patch embedding, attention, adaLN, output projections) and every bias stays frozen."""
    return name.endswith(".bias") or not (".ff." in name or "class_embedder." in name)


def diffusers_unet_frozen(name: str, p: torch.nn.Parameter) -> bool:
    """Default trainable set of diffusers UNets: every non-bias weight except normalization
    layers' affine parameters (the reference UNet's default leaves every non-bias weight)."""
    if name.endswith(".bias"):
        return True
    parts = name.split(".")
    return len(parts) >= 2 and "norm" in parts[-2]


class LatentTextDenoiser(DiffusersDenoiser):
    """Latent text-to-image models as diffusers' text-to-image scripts train them (Stable
    Diffusion 1.x/2.x: a UNet2DConditionModel over VAE latents, conditioned on the text encoder's
    hidden states). Images x are latents; levels are DDPM timesteps (as DiffusersDenoiser).

    Loss, per sample, the scripts' training loss:
        L = w(t)·mean_{C,H,W}(ε_θ(√ᾱ_t·x + √(1−ᾱ_t)·ε, t, c) − target)²,
    target = ε (prediction_type "epsilon") or v = √ᾱ_t·ε − √(1−ᾱ_t)·x ("v_prediction");
    w(t) = 1, or with snr_gamma γ (the scripts' --snr_gamma, Min-SNR weighting)
    min(SNR_t, γ)/SNR_t for ε and min(SNR_t, γ)/(SNR_t + 1) for v, SNR_t = ᾱ_t/(1 − ᾱ_t).

    Labels are condition ids: rows of `conditions`, a Source of hidden states [U, 1, L, D], each
    distinct caption once (a packed folder streams it; per-image conditions are larger than the
    latents). `with_prompts` appends the targets' prompts. A transformer denoiser (PixArt, SD3)
    plugs in by overriding `predict`.

    Trainable set (default_frozen): with a LoRA attached, the LoRA weights only; without, every
    non-bias weight of the UNet except normalization layers' (as DiffusersDenoiser's UNets).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        scheduler,
        conditions: Source,
        snr_gamma: Optional[float] = None,
        train_lr: Optional[float] = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"LatentTextDenoiser: model must be a torch.nn.Module, got {type(model).__name__}"
            )
        if not isinstance(conditions, Source) or conditions.chw[0] != 1:
            raise ValueError(
                "LatentTextDenoiser: conditions must be a Source of hidden states [U, 1, L, D]"
            )
        self.prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                "LatentTextDenoiser: the scheduler's prediction_type must be 'epsilon' or "
                f"'v_prediction', got {self.prediction_type!r}"
            )
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"LatentTextDenoiser: snr_gamma must be > 0, got {snr_gamma}")
        self._init_schedule(model, scheduler, train_lr)
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        self.train_conditions = conditions  # the training captions' rows (the model's key)
        self.conditions = conditions  # and the targets' prompts after them (`with_prompts`)
        self.label_dim = conditions.N
        self.conditional = True

    def with_prompts(self, rows: torch.Tensor) -> tuple["LatentTextDenoiser", torch.Tensor]:
        """(a denoiser whose condition table also holds `rows` [K, L, D], their ids [K])."""
        rows = torch.as_tensor(rows).detach().float().cpu()
        if rows.ndim != 3 or rows.shape[1:] != self.train_conditions.chw[1:]:
            raise ValueError(
                f"with_prompts: expected hidden states [K, {self.train_conditions.chw[1]}, "
                f"{self.train_conditions.chw[2]}], got {tuple(rows.shape)}"
            )
        new = copy.copy(self)
        U = self.train_conditions.N
        new.conditions = ConcatSource(self.train_conditions, TensorSource(rows.unsqueeze(1)))
        new.label_dim = new.conditions.N
        new._acp = {}
        return new, torch.arange(U, U + rows.shape[0])

    # -- the scripts' loss ------------------------------------------------------------------------
    def predict(self, net, x_t, t, cond):
        """The model's output at (x_t, t) under hidden states cond [B, L, D]."""
        return _sample(net(x_t, t, encoder_hidden_states=cond))

    def condition_rows(self, y: torch.Tensor, device) -> torch.Tensor:
        """Hidden states [*y.shape, L, D] of condition ids y, on device; rows already read
        (float [..., L, D], `forward_labels`) are returned as they are."""
        if y.is_floating_point():
            return y.to(device)
        rows = self.conditions.take(y.reshape(-1).cpu(), device)[:, 0]
        return rows.view(*y.shape, *rows.shape[1:])

    def forward_labels(self, y, device=None):
        if y is None or y.is_floating_point():
            return y
        return self.condition_rows(y, y.device if device is None else device)

    def label_values(self, y):
        return self.condition_rows(y, "cpu")

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) [B] (class docstring)."""
        if self.snr_gamma is None:
            return torch.ones(t.shape[0], device=t.device)
        acp = self._alphas(t.device)[t]
        snr = acp / (1 - acp)
        w = torch.clamp(snr, max=self.snr_gamma)
        return w / (snr if self.prediction_type == "epsilon" else snr + 1)

    def target(self, x, eps, t):
        if self.prediction_type == "epsilon":
            return eps
        acp = self._alphas(x.device)[t].view(-1, *([1] * (x.ndim - 1)))
        return acp.sqrt() * eps - (1 - acp).sqrt() * x

    def loss(self, x, eps, level, y=None, net=None):
        net = self.net if net is None else net
        x_t = self.noisy(x, eps, level)
        pred = self.predict(net, x_t, level, self.condition_rows(y, x.device))
        return edm_loss(pred, None, self.target(x, eps, level), None, None, self.weight(level))

    def grid_terms(self, eps, level, n):
        terms = super().grid_terms(eps, level, n)
        terms["weight"] = self.weight(level).repeat_interleave(n)
        if self.prediction_type != "epsilon":
            terms.pop("target", None)  # v depends on the image
        return terms

    def grid_loss(self, x, eps, level, y=None, net=None, terms=None):
        net = self.net if net is None else net
        M, n = level.shape[0], x.shape[0]
        t = self.grid_terms(eps, level, n) if terms is None else terms
        x_t = noisy_inputs(x, eps, t["a"], t["b"], None)
        cond = self.condition_rows(y, x.device)  # the n images' rows, read once for M noises
        pred = self.predict(net, x_t, t["level"], _label_rows(cond, M))
        if "target" in t:
            target = t["target"]
        else:
            ee = _rows(eps, n, per_sample=True) if eps.dim() == x.dim() else eps.flatten(0, 1)
            target = self.target(_rows(x, M), ee, t["level"])
        return edm_loss(pred, None, target, None, None, t["weight"]).view(M, n)

    def _convert_labels(self, y, what):
        if not _is_class_ids(y):  # rows come only from forward_labels, after this check
            raise ValueError(
                f"{what}: a text-to-image model takes condition ids [N] (rows of its caption "
                f"table), got shape {tuple(y.shape)} ({y.dtype})"
            )
        _check_class_range(y, self.label_dim, what)
        return y

    def fresh_net(self):
        return type(self.net).from_config(self.net.config)

    def default_frozen(self):
        if any(is_lora(n) for n, _ in self.net.named_parameters()):
            return lora_frozen
        # not Attribute-by-Unlearning's cross-attention k/v alone: on the demo pipeline that set
        # does not find planted copies of a target, the UNet's weights do (BENCHMARKS.md)
        return diffusers_unet_frozen

    def _fingerprint_extra(self):
        # the training captions' table, not the targets' rows: L_t reads only training rows, so
        # new targets reuse its cache (the run key digests target rows: `label_values`)
        return (
            self.T,
            float(self.alphas_cumprod.sum()),
            self.prediction_type,
            self.snr_gamma,
            self.train_conditions.fingerprint(),
        )


def is_lora(name: str) -> bool:
    """A LoRA weight as peft names it (`….lora_A.<adapter>.weight`, `lora_B`, `lora_embedding`)."""
    return ".lora_" in name


def lora_frozen(name: str, p: torch.nn.Parameter) -> bool:
    """With a LoRA: unlearning trains the LoRA weights only; every base weight stays frozen."""
    return not is_lora(name)


# Attribute-by-Unlearning's trainable set for Stable Diffusion (`--trainable` patterns): the
# cross-attention key and value projections; far fewer weights per copy than the default
CROSS_ATTENTION_KV = ("*attn2.to_k.weight", "*attn2.to_v.weight")
