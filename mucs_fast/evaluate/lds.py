"""The linear datamodeling score (LDS: Park et al. 2023, TRAK; for diffusion: D-TRAK, DAS), the
field's other currency besides the counterfactual AUC (spec/EVALUATION.md, "LDS").

S subset models are trained from scratch on random subsets D_s of α·N training images (α = 0.5),
each with its own seed and the evaluation's model and recipe. For a target x̂ the model output is
f_s(x̂) = its diffusion loss under model s averaged over one fixed bank of (ε, σ) (σ log-normal as
in training; the same bank for every s and every target). A method's prediction for subset s is
g_s(x̂) = Σ_{j ∈ D_s} score(x̂, j), and LDS(x̂) = Spearman over s of (g_s(x̂), −f_s(x̂)): a method
whose scores say "j helps x̂" should predict a lower loss of x̂ for the subsets that contain j.

Training length: the subset models see the same number of *epochs* as the full model (steps =
round(α · train steps) by default, `steps` to override): TRAK's and D-TRAK's subset models keep the
full model's recipe per epoch, and it halves the cost of the S models, the evaluation's largest.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .._io import derive_seed
from ..config import MUCSConfig
from ..data import TensorSource
from ..engine import make_bank
from ..functional import working_copy
from ..score import LossPass, images_per_forward, original_losses

LDS_DEFAULTS = dict(subsets=32, alpha=0.5, steps=None, num_noises=256, seed=0)


def lds_options(opts: Optional[dict]) -> Optional[dict]:
    """The LDS settings with defaults filled in (None: LDS off); ValueError naming a bad field."""
    if opts is None:
        return None
    unknown = set(opts) - set(LDS_DEFAULTS)
    if unknown:
        raise ValueError(f"lds: unknown settings {sorted(unknown)}; known: {sorted(LDS_DEFAULTS)}")
    o = {**LDS_DEFAULTS, **opts}
    if int(o["subsets"]) < 3:
        raise ValueError(
            f"lds.subsets must be >= 3 (a Spearman correlation over subsets), got {o['subsets']}"
        )
    if not 0 < float(o["alpha"]) < 1:
        raise ValueError(f"lds.alpha must lie in (0, 1), got {o['alpha']}")
    if o["steps"] is not None and int(o["steps"]) < 1:
        raise ValueError(
            f"lds.steps must be >= 1 or None (same epochs as the full model), got {o['steps']}"
        )
    if int(o["num_noises"]) < 1:
        raise ValueError(f"lds.num_noises must be >= 1, got {o['num_noises']}")
    return {
        "subsets": int(o["subsets"]),
        "alpha": float(o["alpha"]),
        "steps": None if o["steps"] is None else int(o["steps"]),
        "num_noises": int(o["num_noises"]),
        "seed": int(o["seed"]),
    }


def subset_masks(N: int, subsets: int, alpha: float, seed: int) -> torch.Tensor:
    """Membership [S, N] bool: subset s holds round(α·N) images drawn without replacement from its
    own seeded stream (a subset does not change when S grows)."""
    size = max(1, min(N - 1, round(alpha * N)))
    masks = torch.zeros(subsets, N, dtype=torch.bool)
    for s in range(subsets):
        g = torch.Generator().manual_seed(derive_seed(seed, "lds-subset", s))
        masks[s, torch.randperm(N, generator=g)[:size]] = True
    return masks


def subset_seed(seed: int, s: int) -> int:
    """The training seed of subset model s (independent models, as TRAK's)."""
    return derive_seed(seed, "lds-model", s) % (1 << 62)


def subset_train(train: dict, opts: dict) -> dict:
    """The subset models' training recipe: the full model's, with `steps` giving the same epochs."""
    steps = (
        opts["steps"]
        if opts["steps"] is not None
        else max(1, round(opts["alpha"] * train["steps"]))
    )
    return {**train, "steps": steps}


def lds_bank(den, chw, num_noises: int, seed: int):
    """The one bank of (ε, σ) every subset model and target is scored under: σ log-normal (the
    training distribution), drawn on the CPU from `seed`."""

    return make_bank(den, tuple(chw), MUCSConfig(num_noises=num_noises, seed=seed), None)


@torch.inference_mode()
def model_outputs(
    den, images: torch.Tensor, labels: Optional[torch.Tensor], bank, device=None
) -> torch.Tensor:
    """f(x̂) [K] float64: each image's diffusion loss under `den` averaged over `bank` (lds_bank),
    by the engine's loss pass (so exactly the loss MUCS scores with)."""

    device = torch.device(device or "cpu")
    K = images.shape[0]
    y = den.prepare_labels(labels, K, "target_labels")
    lp = LossPass(
        den,
        working_copy(den.net, device),
        [],
        bank.to(device),
        images_per_forward=images_per_forward(None, bank.M, device),
    )
    losses = original_losses(
        lp, TensorSource(images.to(device)), None if y is None else y.to(device), torch.arange(K)
    )
    return losses.double().mean(1).cpu()


def spearman(a, b) -> float:
    """Spearman's ρ (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def lds_per_target(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor) -> list[float]:
    """LDS of each target: Spearman over subsets of g_s = Σ_{j∈D_s} score(x̂, j) (scores [K, N]; a
    NaN score counts 0) and −f_s (outputs [K, S]: each target's loss under each subset model)."""
    s = torch.nan_to_num(torch.as_tensor(scores).double(), nan=0.0)
    g = s @ masks.double().T  # [K, S]
    return [spearman(g[k].numpy(), (-outputs[k]).numpy()) for k in range(s.shape[0])]
