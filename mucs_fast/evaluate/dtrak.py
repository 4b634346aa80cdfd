"""D-TRAK-style attribution (Zheng et al. 2024, "Intriguing Properties of Data Attribution on
Diffusion Models", after TRAK, Park et al. 2023), simplified to one model checkpoint.

Model output function of an image x (label y): f(x) = (1/S) Σ_s L(x; ε_s, σ_s, y), the per-sample
diffusion loss (the denoiser's, λ-weighted for EDM nets) averaged over S fixed (σ_s, ε_s): σ_s on
the Karras grid from σ_max down to σ_min (D-TRAK: S timesteps spread over [0, T)), ε_s ~ N(0, I)
drawn once from a fixed seed and shared by every image.

Features: φ(x) = Pᵀ ∇_θ f(x) ∈ R^d (per-sample gradients through `torch.func.vmap`), with
P ∈ R^{|θ|×d} a random projection with i.i.d. Rademacher (±1/√d) or Gaussian (N(0, 1/d)) entries
from a fixed seed, applied block by block of rows.
Scores: score[k, j] = φ(x̂_k)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_j), Φ = [φ(x_1) … φ(x_N)]ᵀ, λ = lamb·tr(ΦᵀΦ)/d,
all in float64. Higher = training image j lowers the target's loss more (more influential).

Simplifications vs the paper: one checkpoint (no ensemble over independently trained models),
no TRAK "Q" re-weighting (D-TRAK drops it too), the loss as output function (D-TRAK reports that
other functions, e.g. the squared norm of the output, can work better), d far below theirs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._io import derive_seed
from ..functional import StackedNet, working_copy
from ..noise import karras_sigmas
from ..params import trainable_names

DTRAK_DEFAULTS = dict(
    num_levels=8,
    proj_dim=512,
    lamb=1e-3,
    batch_size=64,
    block=32768,
    projection="rademacher",
    params="all",
)


def _signs(seed: int, index: int, rows: int, d: int) -> torch.Tensor:
    """Block `index` of the Rademacher projection as int8 ±1 [rows, d]."""
    g = torch.Generator().manual_seed(derive_seed(seed, "dtrak", "projection", index))
    return torch.randint(0, 2, (rows, d), generator=g, dtype=torch.int8).mul_(2).sub_(1)


def _projection_block(
    seed: int, index: int, rows: int, d: int, kind: str, dtype=torch.float32
) -> torch.Tensor:
    """Block `index` (rows of P) of the projection [rows, d], entries ±1/√d or N(0, 1/d)."""
    if kind == "rademacher":
        return _signs(seed, index, rows, d).to(dtype) / math.sqrt(d)
    g = torch.Generator().manual_seed(derive_seed(seed, "dtrak", "projection", index))
    if kind == "gaussian":
        return torch.randn(rows, d, generator=g, dtype=dtype) / math.sqrt(d)
    raise ValueError(f"dtrak: projection must be 'rademacher' or 'gaussian', got {kind!r}")


class _Projection:
    """Pᵀ g in blocks of rows of P. Rademacher blocks are kept as int8 signs (|θ|·d bytes) after
    their first use; Gaussian blocks are regenerated from their seeds each time (float32 would take
    4× the memory)."""

    def __init__(self, seed: int, P: int, d: int, block: int, kind: str):
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"dtrak: projection must be 'rademacher' or 'gaussian', got {kind!r}")
        self.seed, self.d, self.kind = seed, d, kind
        self.bounds = list(range(0, P, block)) + [P]
        self.signs: dict[int, torch.Tensor] = {}

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        """G [b, P] float32 → [b, d] float64."""
        acc = torch.zeros(G.shape[0], self.d, dtype=torch.float64)
        for j, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            if self.kind == "rademacher":
                if j not in self.signs:
                    self.signs[j] = _signs(self.seed, j, hi - lo, self.d)
                Pj = self.signs[j].to(torch.float32).div_(math.sqrt(self.d))
            else:
                Pj = _projection_block(self.seed, j, hi - lo, self.d, self.kind)
            acc += (G[:, lo:hi] @ Pj).double()
        return acc


def dtrak_features(
    den,
    images: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    seed: int,
    num_levels: int,
    proj_dim: int,
    batch_size: int,
    block: int,
    projection: str,
    params: str,
    device=None,
    progress: bool = False,
    desc: str = "dtrak",
    projector: Optional[_Projection] = None,
) -> torch.Tensor:
    """Projected per-sample gradients φ [n, d] (float64) of the model output function f.

    Per-sample gradients the way the engine differentiates K unlearned copies: the weights are
    replicated once per image of a batch ([b, ...] stacked, `StackedNet`), each image's loss is
    evaluated with its own copy under `vmap`, and one backward of the summed losses gives every
    image's gradient in its copy's slot (the loss op has vmap and autograd rules, not functorch
    `grad` support)."""
    from tqdm.auto import tqdm

    device = torch.device(device or "cpu")
    net = working_copy(den.net, device)
    n = images.shape[0]
    y_all = den.prepare_labels(labels, n, "labels")
    chw = tuple(images.shape[1:])
    g = torch.Generator().manual_seed(derive_seed(seed, "dtrak", "noise"))
    if (
        getattr(den, "level_dtype", torch.float32) == torch.int64
    ):  # VP/DDPM: timesteps spread over [0, T)
        level = torch.linspace(den.T - 1, 0, num_levels).round().long()
    else:
        level = karras_sigmas(num_levels, den.sigma_min, den.sigma_max, den.rho)
    eps = torch.randn((num_levels, *chw), generator=g).to(device)
    level = level.to(device)
    S = num_levels

    all_params = dict(net.named_parameters())
    names = list(all_params) if params == "all" else trainable_names(net, den.default_frozen())
    P = sum(all_params[n_].numel() for n_ in names)
    project = (
        projector if projector is not None else _Projection(seed, P, proj_dim, block, projection)
    )
    phi = torch.zeros(n, proj_dim, dtype=torch.float64)
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        x = images[i : i + batch_size].to(device, torch.float32)
        b = x.shape[0]
        W = {
            n_: all_params[n_]
            .detach()
            .unsqueeze(0)
            .repeat(b, *([1] * all_params[n_].dim()))
            .requires_grad_(True)
            for n_ in names
        }
        stack = StackedNet(net, W)
        xs = x.unsqueeze(1).expand(b, S, *chw)
        ys = None
        if y_all is not None:
            y = y_all[i : i + b].to(device)
            ys = y.unsqueeze(1).expand(b, S, *y.shape[1:])
        L = stack.loss(den, xs, eps, level, ys, in_dims=(0, None, None, 0))  # [b, S]
        grads = torch.autograd.grad(L.mean(1).sum(), [W[n_] for n_ in names])
        G = torch.cat([gr.reshape(b, -1) for gr in grads], 1).cpu()  # [b, P]
        phi[i : i + b] = project(G)
    return phi


def dtrak(
    den,
    train: torch.Tensor,
    targets: torch.Tensor,
    train_labels=None,
    target_labels=None,
    *,
    seed: int = 0,
    device=None,
    progress: bool = False,
    info: Optional[dict] = None,
    **settings,
) -> torch.Tensor:
    """D-TRAK scores [K, N] (see module doc); settings override DTRAK_DEFAULTS."""
    opts = {**DTRAK_DEFAULTS, **settings}
    unknown = set(opts) - set(DTRAK_DEFAULTS)
    if unknown:
        raise ValueError(
            f"dtrak: unknown settings {sorted(unknown)}; known: {sorted(DTRAK_DEFAULTS)}"
        )
    lamb = opts.pop("lamb")
    P = sum(p.numel() for n, p in den.net.named_parameters()) if opts["params"] == "all" else None
    projector = (
        _Projection(seed, P, opts["proj_dim"], opts["block"], opts["projection"]) if P else None
    )
    kw = dict(seed=seed, device=device, progress=progress, projector=projector, **opts)
    phi = dtrak_features(den, train, train_labels, desc="dtrak train", **kw)
    phi_t = dtrak_features(den, targets, target_labels, desc="dtrak targets", **kw)
    d = phi.shape[1]
    kern = phi.T @ phi
    reg = lamb * float(torch.diagonal(kern).sum()) / d
    kern = kern + reg * torch.eye(d, dtype=kern.dtype)
    sol = torch.linalg.solve(kern, phi_t.T)  # [d, K]
    scores = (sol.T @ phi.T).float()
    if info is not None:
        info.update(
            {
                "settings": {**opts, "lamb": lamb},
                "ridge": reg,
                "feature_norm_mean": float(phi.norm(dim=1).mean()),
            }
        )
    return scores
