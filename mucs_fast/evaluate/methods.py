"""Attribution methods behind one interface, for the counterfactual evaluation.

A method is a callable `fn(ctx, targets, target_labels) -> scores float32 [K, N]` (higher = more
influential), looked up by name in `METHODS` or built by `get_method`:

| name | what it scores |
| --- | --- |
| mucs | MUCS with `ctx.settings["mucs"]` (mucs_fast.attribute) |
| mucs-diff | MUCS ablation: plain loss difference L_u − L_t instead of the normalized skew |
| mucs-indep | MUCS ablation: independent inference noise per model (no shared bank) |
| mucs-unbounded | MUCS ablation: forget loss not clamped at L_null (MUCSConfig.bounded=False) |
| random | uniform random scores (seeded) |
| pixel / pixel-l2 | pixel-space nearest neighbours: cosine / negative squared L2 distance |
| dtrak | TRAK-style scores on projected per-sample gradients of the diffusion loss (`dtrak.py`) |
| abu | a few unbounded gradient-ascent steps on the target, score = raw loss increase (`abu`) |
| ensemble:a+b[+c] | rank average of the named methods' scores (`stats.rank_average`) |
| center:m | method m's scores minus their mean over the K targets (the target-independent part
removed) |

`register_method(name)` adds a method. `method_key(name, settings)` is what the evaluation hashes
into a method's cache key: the name plus the settings group the method reads.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Optional

import torch

from .._io import derive_seed
from ..config import MUCSConfig
from ..coverage import nan_tensor
from ..data import TensorSource
from ..engine import attribute, make_bank
from ..functional import working_copy
from ..params import set_trainable, trainable_names
from ..score import LossPass, images_per_forward, original_losses, score_stacked
from .dtrak import dtrak
from .stats import rank_average

MethodFn = Callable[["MethodContext", torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclasses.dataclass
class MethodContext:
    """Everything a method may use besides the targets.

    den: the pre model (a Denoiser); train [N, C, H, W] in [-1, 1]; train_labels: class ids [N] or
    None; seed: the evaluation seed (methods derive their own streams from it); settings: per-family
    settings {"mucs": {...MUCSConfig fields}, "dtrak": {...}, "abu": {...}}; work_dir: a folder the
    method may use for resumable state (None: none); cache_dir: the engine's L_t cache;
    scores_of: name → [K, N] scores of another method on the same targets (ensembles); info: a dict
    the method may fill (saved with its scores).
    """

    den: object
    train: torch.Tensor
    train_labels: Optional[torch.Tensor] = None
    seed: int = 0
    device: Optional[torch.device] = None
    progress: bool = False
    settings: dict = dataclasses.field(default_factory=dict)
    work_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    scores_of: Optional[Callable[[str], torch.Tensor]] = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def N(self) -> int:
        return self.train.shape[0]


METHODS: dict[str, MethodFn] = {}
SETTINGS_GROUP: dict[str, Optional[str]] = {}


def register_method(name: str, settings_group: Optional[str] = None):
    """Decorator: register `fn(ctx, targets, target_labels) -> [K, N]` under `name`;
    `settings_group`: the key of ctx.settings it reads (part of its cache key)."""

    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        SETTINGS_GROUP[name] = settings_group
        return fn

    return deco


def _components(name: str) -> list[str]:
    if name.startswith("ensemble:"):
        parts = [p for p in name[len("ensemble:") :].split("+") if p]
        if len(parts) < 2:
            raise ValueError(
                f"{name!r}: an ensemble needs at least two methods, e.g. ensemble:mucs+dtrak"
            )
        return parts
    if name.startswith("center:"):
        return [name[len("center:") :]]
    return []


def check_method(name: str) -> None:
    """Raise ValueError (listing the known names) unless `name` is a method or a valid composite."""
    parts = _components(name)
    if parts:
        for p in parts:
            check_method(p)
        return
    if name not in METHODS:
        raise ValueError(
            f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}, "
            "ensemble:a+b[+c], center:m"
        )


def get_method(name: str) -> MethodFn:
    check_method(name)
    if name.startswith("ensemble:"):
        parts = _components(name)

        def ensemble(ctx, targets, target_labels):

            get = ctx.scores_of or (lambda m: get_method(m)(ctx, targets, target_labels))
            return rank_average([get(p) for p in parts])

        return ensemble
    if name.startswith("center:"):
        (inner,) = _components(name)

        def centered(ctx, targets, target_labels):
            get = ctx.scores_of or (lambda m: get_method(m)(ctx, targets, target_labels))
            s = get(inner).double()
            return (s - s.mean(0, keepdim=True)).float()

        return centered
    return METHODS[name]


def method_key(name: str, settings: dict) -> dict:
    """The part of the evaluation settings a method's scores depend on (for its cache key)."""
    parts = _components(name)
    if parts:
        return {"name": name, "parts": [method_key(p, settings) for p in parts]}
    group = SETTINGS_GROUP.get(name)
    return {"name": name, "settings": settings.get(group, {}) if group else {}}


def _labels(ctx: MethodContext, y, n: int, what: str):
    return ctx.den.prepare_labels(y, n, what)


def _device(ctx: MethodContext) -> torch.device:
    return torch.device(ctx.device) if ctx.device is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# MUCS and its ablations
# --------------------------------------------------------------------------------------------
MUCS_VARIANTS = {
    "mucs": {},
    "mucs-diff": {"use_loss_ratio": False},
    "mucs-indep": {"use_same_noise_infer": False},
    "mucs-unbounded": {"bounded": False},
}


def _mucs(overrides: dict) -> MethodFn:
    def fn(ctx: MethodContext, targets, target_labels):

        settings = {**ctx.settings.get("mucs", {}), **overrides}
        if not settings.get("use_same_noise_infer", True):
            settings.pop("adaptive_top_k", None)  # adaptive screening needs the shared bank: exact
        cfg = MUCSConfig(**settings)
        res = _attribute_resumable(attribute, ctx, targets, target_labels, cfg)
        m = res.meta
        ctx.info.update(
            {
                "steps": [t["steps"] for t in m["targets"]],
                "stop": [t["stop"] for t in m["targets"]],
                "flagged": m["flagged"],
                "loss_null": m["resolved"]["loss_null"],
                "lr": m["resolved"]["lr"],
                "timings": m["timings"],
                "config": m["config"],
                "pairs_evaluated": m.get("pairs_evaluated"),
                "adaptive": m.get("adaptive"),
            }
        )
        return res.scores

    return fn


def _attribute_resumable(attribute, ctx, targets, target_labels, cfg):
    kw = dict(
        train_labels=ctx.train_labels,
        target_labels=target_labels,
        device=ctx.device,
        progress=ctx.progress,
        cache_dir=ctx.cache_dir if ctx.cache_dir is not None else None,
    )
    if ctx.work_dir is None:
        return attribute(ctx.den, ctx.train, targets, cfg, **kw)
    try:
        return attribute(ctx.den, ctx.train, targets, cfg, run_dir=ctx.work_dir, resume=True, **kw)
    except ValueError as e:
        if "holds a different run" not in str(e) and "not a mucs_fast run directory" not in str(e):
            raise
        import shutil

        shutil.rmtree(ctx.work_dir)  # stale state of an older run under the same key: start afresh
        return attribute(ctx.den, ctx.train, targets, cfg, run_dir=ctx.work_dir, resume=True, **kw)


for _name, _over in MUCS_VARIANTS.items():
    register_method(_name, "mucs")(_mucs(_over))


# --------------------------------------------------------------------------------------------
# simple baselines
# --------------------------------------------------------------------------------------------
@register_method("random")
def random_scores(ctx: MethodContext, targets, target_labels=None):
    """Uniform random scores, one seeded stream per target index."""
    K = targets.shape[0]
    return torch.stack(
        [
            torch.rand(
                ctx.N, generator=torch.Generator().manual_seed(derive_seed(ctx.seed, "random", k))
            )
            for k in range(K)
        ]
    )


@register_method("pixel")
def pixel_cosine_scores(ctx: MethodContext, targets, target_labels=None):
    """Cosine similarity of the flattened images (values in [-1, 1])."""
    t = targets.flatten(1).double()
    x = ctx.train.flatten(1).double()
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (t @ x.T).float()


@register_method("pixel-l2")
def pixel_l2_scores(ctx: MethodContext, targets, target_labels=None):
    """Negative squared Euclidean distance of the flattened images."""
    return -torch.cdist(targets.flatten(1).double(), ctx.train.flatten(1).double()).pow(2).float()


# --------------------------------------------------------------------------------------------
# D-TRAK
# --------------------------------------------------------------------------------------------
@register_method("dtrak", "dtrak")
def dtrak_scores(ctx: MethodContext, targets, target_labels=None):

    return dtrak(
        ctx.den,
        ctx.train,
        targets,
        ctx.train_labels,
        target_labels,
        seed=ctx.seed,
        device=_device(ctx),
        progress=ctx.progress,
        info=ctx.info,
        **ctx.settings.get("dtrak", {}),
    )


# --------------------------------------------------------------------------------------------
# AbU-style unlearning
# --------------------------------------------------------------------------------------------
ABU_DEFAULTS = dict(steps=10, batch_size=32, lr_factor=10.0, num_noises=32, params="mucs")


@register_method("abu", "abu")
def abu_scores(ctx: MethodContext, targets, target_labels=None):
    """Unlearning by unbounded ascent (after Wang et al. 2024, "Data Attribution for Text-to-Image
    Models by Unlearning Synthesized Images", simplified): from a fresh copy of the model, `steps`
    Adam steps (lr = training lr / lr_factor) of gradient *ascent* on the target's diffusion loss
    (batch_size fresh training-noise draws per step, no bound, no retain term and no Fisher/EWC
    regularizer), then score[j] = mean_m L_u(x_j; ε_m, σ_m) − L_t(x_j; ε_m, σ_m) over a fixed bank
    of num_noises (ε, σ) shared by both models and every image: the raw loss increase.
    params: "mucs" (the parameters MUCS unlearns) or "all"."""

    opts = {**ABU_DEFAULTS, **ctx.settings.get("abu", {})}
    unknown = set(opts) - set(ABU_DEFAULTS)
    if unknown:
        raise ValueError(f"abu: unknown settings {sorted(unknown)}; known: {sorted(ABU_DEFAULTS)}")
    den, device = ctx.den, _device(ctx)
    K, N = targets.shape[0], ctx.N
    lr = (den.train_lr or 1e-3) / opts["lr_factor"]
    net0 = working_copy(den.net, device)
    x = TensorSource(ctx.train.to(device))
    y = _labels(ctx, ctx.train_labels, N, "train_labels")
    y = None if y is None else y.to(device)
    yt = _labels(ctx, target_labels, K, "target_labels")
    bank_cfg = MUCSConfig(num_noises=opts["num_noises"], seed=derive_seed(ctx.seed, "abu", "bank"))
    bank = make_bank(den, tuple(ctx.train.shape[1:]), bank_cfg, bank_cfg.t_sched_infer).to(device)
    names = (
        trainable_names(net0, den.default_frozen())
        if opts["params"] == "mucs"
        else [n for n, _ in net0.named_parameters()]
    )
    # the engine's loss pass and score: the raw loss increase is its plain-difference skew
    lp = LossPass(
        den, net0, names, bank, images_per_forward=images_per_forward(None, bank.M, device)
    )
    ids = torch.arange(N)
    loss_t = original_losses(lp, x, y, ids)
    from tqdm.auto import tqdm

    out = nan_tensor(K, N)  # every row is written below
    gains = []
    for k in tqdm(range(K), desc="abu", disable=not ctx.progress, leave=False):
        net = copy.deepcopy(net0)
        params = set_trainable(net, names)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator(device).manual_seed(derive_seed(ctx.seed, "abu", "ascent", k))
        B = opts["batch_size"]
        xk = targets[k : k + 1].to(device).expand(B, *targets.shape[1:])
        yk = None if yt is None else yt[k : k + 1].to(device).expand(B, *yt.shape[1:])
        first = last = math.nan
        for s in range(opts["steps"] + 1):
            eps, level = den.training_noise(xk.shape, gen, None, device)
            loss = den.loss(xk, eps, level, yk, net=net).mean()
            if s == 0:
                first = loss.item()
            if s == opts["steps"]:
                last = loss.item()
                break
            opt.zero_grad(set_to_none=True)
            (-loss).backward()
            opt.step()
        gains.append((first, last))
        trained = dict(net.named_parameters())
        weights = {n: trained[n].detach()[None] for n in names}
        out[k] = score_stacked(
            lp, weights, x, y, ids, loss_t, eps=0.0, use_loss_ratio=False, use_same_noise_infer=True
        )[0].cpu()
    ctx.info.update({"settings": opts, "lr": lr, "target_loss_before_after": gains})
    return out
