"""Image similarity metrics for the counterfactual evaluation (pre vs post images, one value per
pair).

Images come in the models' data range [-1, 1] and are clipped to it (generated images may
overshoot). Like the reference's `lib/image_metrics.py`, SSIM, MAE and the Euclidean distance are
computed on u = (x + 1)/2 ∈ [0, 1] and the pixel cosine on x itself. Every metric is a *similarity*
(higher = more alike): distances enter negated (`neg_mae`, `neg_euc`), and `Metric.distance` says
so, which the Ratio needs (see `stats.ratio`).

- ssim: SSIM (Wang et al. 2004) with a 7×7 Gaussian window, σ = 1.5, C1 = (0.01·L)², C2 = (0.03·L)²,
  L = 1, averaged over the windows that lie fully inside the image and over channels (the settings
and
  the valid region of the reference's torchmetrics SSIM). Computed in float64.
- cos: cosine of the flattened images.
- neg_mae: −mean |u − v|;  neg_euc: −‖u − v‖₂.
- correl: Pearson correlation of the pixel values, Σ x̃ỹ / √(Σ x̃² Σ ỹ² + 1e-12) with x̃ = x −
mean(x)
  (the reference divides by (std + 1e-4) with the unbiased std, which puts identical images at
  (n−1)/n; ours puts them at 1).
- feat: cosine of a small CNN classifier's penultimate features (`FeatureNet`, trained on the same
  training set: the offline stand-in for the paper's CLIP/DINO/SSCD cosines).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"expected two image batches [B, C, H, W] of one shape, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    return x.detach().float().cpu().clamp(-1, 1), y.detach().float().cpu().clamp(-1, 1)


def gaussian_window(size: int = 7, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    """Normalized 2-D Gaussian window [size, size] (outer product of the 1-D one)."""
    d = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-0.5 * (d / sigma) ** 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window: int = 7,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """SSIM [B] of image pairs x, y [B, C, H, W] with values in [0, data_range] (see module doc).

    Local statistics: μ = w∗x, σ² = w∗x² − μ², σ_xy = w∗(xy) − μ_x μ_y (valid convolution);
    SSIM map = (2μ_xμ_y + C1)(2σ_xy + C2) / ((μ_x² + μ_y² + C1)(σ_x² + σ_y² + C2)), then its mean.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim: expected two batches [B, C, H, W] of one shape, got {tuple(x.shape)}, "
            f"{tuple(y.shape)}"
        )
    B, C, H, W = x.shape
    if H < window or W < window:
        raise ValueError(f"ssim: images ({H}×{W}) are smaller than the {window}×{window} window")
    x, y = x.double(), y.double()
    w = gaussian_window(window, sigma).to(x.device).expand(C, 1, window, window)

    def blur(t):
        return F.conv2d(t, w, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return s.mean((1, 2, 3)).float()


def pixel_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = _check_pair(x, y)
    return F.cosine_similarity(
        x.flatten(1).double(), y.flatten(1).double(), dim=1, eps=1e-12
    ).float()


def neg_mae(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = _check_pair(x, y)
    return -((x - y).abs() / 2).flatten(1).mean(1)


def neg_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = _check_pair(x, y)
    return -((x - y) / 2).flatten(1).double().pow(2).sum(1).sqrt().float()


def correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = _check_pair(x, y)
    xc = x.flatten(1).double()
    yc = y.flatten(1).double()
    xc = xc - xc.mean(1, keepdim=True)
    yc = yc - yc.mean(1, keepdim=True)
    return ((xc * yc).sum(1) / ((xc * xc).sum(1) * (yc * yc).sum(1) + 1e-12).sqrt()).float()


def _ssim01(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = _check_pair(x, y)
    return ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0)


# --------------------------------------------------------------------------------------------
# feature cosine: a small CNN classifier trained on the evaluation's training set
# --------------------------------------------------------------------------------------------
class FeatureNet(nn.Module):
    """conv3×3(w) → conv3×3/2(2w) → conv3×3/2(4w) → flatten → linear(feat) = the features → linear
    classes (GELU after every hidden layer; w = width, 16 by default, feat = 128). The flatten keeps
    where strokes are, which a global pooling would discard. image_size: (C, H, W)."""

    def __init__(self, image_size=(1, 16, 16), classes: int = 10, width: int = 16, feat: int = 128):
        super().__init__()
        C, H, W = (int(v) for v in image_size)
        self.args = ((C, H, W), classes, width, feat)
        self.body = nn.Sequential(
            nn.Conv2d(C, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
        )
        h, w = (math.ceil(math.ceil(v / 2) / 2) for v in (H, W))  # after two stride-2 convolutions
        self.proj = nn.Sequential(nn.Linear(4 * width * h * w, feat), nn.GELU())
        self.head = nn.Linear(feat, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_feature_net(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 500,
    batch_size: int = 128,
    lr: float = 2e-3,
    width: int = 16,
    seed: int = 0,
    holdout: float = 0.1,
    progress: bool = False,
):
    """Train `FeatureNet` on (images [N, C, H, W] in [-1, 1], class ids [N]) with AdamW and a random
    ±1-pixel shift augmentation; a `holdout` fraction (seeded split) measures accuracy.
    Returns (net in eval mode, info {"holdout_accuracy", "train_accuracy", "steps", ...})."""
    from tqdm.auto import tqdm

    labels = torch.as_tensor(labels).long()
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"train_feature_net: expected class ids [N={images.shape[0]}], got "
            f"{tuple(labels.shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    N = images.shape[0]
    perm = torch.randperm(N, generator=g)
    n_hold = int(round(holdout * N)) if N >= 20 else 0
    hold, fit = perm[:n_hold], perm[n_hold:]
    classes = int(labels.max()) + 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = FeatureNet(tuple(images.shape[1:]), classes, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    x_fit, y_fit = images[fit].float(), labels[fit]
    B = min(batch_size, x_fit.shape[0])
    net.train()
    for step in tqdm(range(steps), desc="feature classifier", disable=not progress, leave=False):
        idx = torch.randint(0, x_fit.shape[0], (B,), generator=g)
        x = x_fit[idx]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        loss = F.cross_entropy(net(x), y_fit[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc_fit = (net(x_fit).argmax(1) == y_fit).float().mean().item()
        acc_hold = (
            (net(images[hold].float()).argmax(1) == labels[hold]).float().mean().item()
            if n_hold
            else math.nan
        )
    return net, {
        "holdout_accuracy": acc_hold,
        "train_accuracy": acc_fit,
        "steps": steps,
        "batch_size": B,
        "lr": lr,
        "width": width,
        "seed": seed,
        "holdout": n_hold,
    }


def feature_cosine(net: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    @torch.no_grad()
    def fn(x, y):
        x, y = _check_pair(x, y)
        fx, fy = net.features(x).double(), net.features(y).double()
        return F.cosine_similarity(fx, fy, dim=1, eps=1e-12).float()

    return fn


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    label: str  # column title in results.md
    fn: Optional[
        Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ]  # None: needs the feature net
    distance: bool = False  # a negated distance (0 for identical images); see stats.ratio


METRICS = {
    "ssim": Metric("ssim", "SSIM", _ssim01),
    "cos": Metric("cos", "Cosine", pixel_cosine),
    "neg_mae": Metric("neg_mae", "−MAE", neg_mae, distance=True),
    "neg_euc": Metric("neg_euc", "−Euclidean", neg_euclidean, distance=True),
    "correl": Metric("correl", "Correlation", correlation),
    "feat": Metric("feat", "Feature cos", None),
}
DEFAULT_METRICS = tuple(METRICS)


def compute_metrics(
    pre: torch.Tensor,
    post: torch.Tensor,
    names=DEFAULT_METRICS,
    feature_net: Optional[nn.Module] = None,
) -> dict[str, torch.Tensor]:
    """{metric: similarity [B]} of every pre/post pair."""
    out = {}
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        m = METRICS[name]
        fn = m.fn
        if fn is None:
            if feature_net is None:
                raise ValueError(f"metric {name!r} needs the feature classifier (feature_net=)")
            fn = feature_cosine(feature_net)
        out[name] = fn(pre, post)
    return out
