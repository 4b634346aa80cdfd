"""What the drop-in reads from the reference's configuration object `conf`: the optimizer of
`conf.training.optim` with the semantics of the reference's `get_optimizer`, and the sampler's
σ range `conf.model.sampler`."""

from __future__ import annotations

import torch


def optimizer_spec(optim_conf) -> tuple[tuple[float, float], float]:
    """(betas, weight decay) of the reference's `get_optimizer(conf.training.optim)` for the
    Adam family ("adamw", "adamw_<b1>_<b2>", "adam", "adam_<b1>_<b2>"; Adam = AdamW with wd 0).
    Raises NotImplementedError for others (e.g. "sgd": only `fast=False` runs it)."""
    name = str(getattr(optim_conf, "name", "adamw")).lower()
    fam, *b = name.split("_")
    if fam not in ("adam", "adamw") or len(b) not in (0, 2):
        raise NotImplementedError(f"optimizer {name!r}")
    betas = (float(b[0]), float(b[1])) if b else (0.9, 0.999)
    wd = float(getattr(optim_conf, "wd", 0.0)) if fam == "adamw" else 0.0
    return betas, wd


def reference_optimizer(optim_conf, params) -> torch.optim.Optimizer:
    """The reference's `get_optimizer(conf.training.optim, model)` over `params`: SGD, Adam or
    AdamW with the config's lr (already divided by lr_factor) and weight decay."""
    name = str(optim_conf.name).lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=optim_conf.lr, weight_decay=optim_conf.wd)
    betas, wd = optimizer_spec(optim_conf)
    if name.startswith("adamw"):
        return torch.optim.AdamW(params, lr=optim_conf.lr, betas=betas, weight_decay=wd)
    return torch.optim.Adam(params, lr=optim_conf.lr, betas=betas)


def sampler_range(conf) -> tuple[float, float, float]:
    """(σ_min, σ_max, ρ) of `conf.model.sampler`; EDM's (0.002, 80, 7) when the config has none."""
    sm = getattr(getattr(conf, "model", None), "sampler", None)
    if getattr(sm, "sigma_min", None) is None:
        return 0.002, 80.0, 7.0
    return float(sm.sigma_min), float(sm.sigma_max), float(sm.rho)
