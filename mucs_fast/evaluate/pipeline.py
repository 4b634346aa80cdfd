"""The counterfactual evaluation (spec/EVALUATION.md), end to end, cached and resumable.

Per seed s:
 1. pre: a class-conditional EDM DiT trained on the full training set (seed s);
 2. generate num_targets + num_controls images with fixed per-image seeds and labels (EDM Heun);
    the first num_targets are the targets, the rest the controls;
 3. every method scores the targets → top-k per target (k = top_k, default round(2 % of N)) → the
    union over targets is removed;
 4. post: retrained from scratch on the rest, same seed and hyper-parameters;
 5. regenerated with the identical seeds, labels and sampler noise;
 6. pre vs post similarities per image (metrics.py).
Then, pooled over seeds, every method against `random`: AUC, Ratio, p-values (stats.py), top-k
overlaps and union sizes → results.json, results.md, densities.png, pre_post_{targets,controls}.png.
With cfg.lds (lds.py), first the S subset models (shared by every seed), then per seed after the
attribution each method's linear datamodeling score on the targets → results.json "lds".

Artifacts live under OUT/artifacts/, each named by a digest of everything it depends on and
written atomically: pre/post checkpoints, generations, every method's scores (MUCS also keeps its
per-target run directory), the feature classifier. A rerun (after a crash or with more methods or
seeds) loads what exists and computes only what is missing; two methods whose removal sets agree
share one post model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Optional

import torch

from .._io import atomic_write, atomic_write_json, derive_seed, tensor_digest
from .._version import __version__
from ..denoisers import EDMDenoiser
from ..models import DiT
from ..sample import sample_edm
from ..train import load_checkpoint, save_checkpoint, train
from . import stats
from .datasets import load_dataset
from .lds import (
    lds_bank,
    lds_options,
    lds_per_target,
    model_outputs,
    subset_masks,
    subset_seed,
    subset_train,
)
from .methods import MethodContext, check_method, get_method, method_key
from .metrics import DEFAULT_METRICS, METRICS, FeatureNet, compute_metrics, train_feature_net
from .report import write_outputs

FORMAT = 1
PHASES = ("lds-models", "pre", "generate", "attribute", "post", "regenerate")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalConfig:
    """Everything that determines the evaluation's numbers (the cache keys are derived from it).

    model: DiT constructor arguments (class-conditional when the data has labels);
    train: steps / batch_size / lr / ema_decay of both pre and post; sample_steps: EDM Heun steps;
    mucs / dtrak / abu: settings of those methods (MUCSConfig fields; DTRAK_DEFAULTS;
    ABU_DEFAULTS); top_k: None → max(1, round(top_k_frac·N)); classifier: FeatureNet training.
    lds: None (off) or the linear datamodeling score's settings (lds.LDS_DEFAULTS: subsets S,
    alpha, steps, num_noises, seed; missing fields take the defaults).
    adaptive: MUCS and its ablations score adaptively (mucs_fast.adaptive) for the evaluation's
    top-k: exact scores for each target's top-k candidates, screening estimates for the rest
    (mucs-indep stays exact: adaptive scoring needs the shared bank). The top-k, hence the
    counterfactual, is what it keeps; the LDS then sums estimates for most images.
    target_classes: class ids cycled over the targets (None: every class in turn); controls always
    cycle over every class.
    """

    data: str = "digits"
    image_size: int = 16
    n_train: Optional[int] = None
    seeds: tuple = (0, 1, 2)
    methods: tuple = (
        "mucs",
        "mucs-diff",
        "mucs-indep",
        "random",
        "pixel",
        "dtrak",
        "abu",
        "ensemble:mucs+dtrak",
    )
    num_targets: int = 20
    num_controls: int = 20
    target_classes: Optional[tuple] = None
    top_k: Optional[int] = None
    top_k_frac: float = 0.02
    model: dict = dataclasses.field(
        default_factory=lambda: dict(
            patch_size=4, width=64, depth=4, heads=4, mlp_ratio=4, cond_width=64, extra_tokens=0
        )
    )
    train: dict = dataclasses.field(
        default_factory=lambda: dict(steps=3000, batch_size=128, lr=2e-3, ema_decay=0.999)
    )
    sample_steps: int = 32
    mucs: dict = dataclasses.field(
        default_factory=lambda: dict(num_noises=50, safety_steps=300, targets_per_batch=1)
    )
    dtrak: dict = dataclasses.field(default_factory=dict)
    abu: dict = dataclasses.field(default_factory=dict)
    classifier: dict = dataclasses.field(
        default_factory=lambda: dict(steps=500, batch_size=128, lr=2e-3, width=16)
    )
    metrics: tuple = DEFAULT_METRICS
    lds: Optional[dict] = None
    adaptive: bool = False

    def __post_init__(self):
        self.lds = lds_options(self.lds)
        self.seeds = tuple(int(s) for s in self.seeds)
        if self.target_classes is not None:
            self.target_classes = tuple(int(c) for c in self.target_classes)
            if not self.target_classes:
                raise ValueError("target_classes: give at least one class id (or None)")
        self.methods = tuple(self.methods)
        self.metrics = tuple(self.metrics)
        for m in self.methods:
            check_method(m)
        for m in self.metrics:
            if m not in METRICS:
                raise ValueError(f"unknown metric {m!r}; known: {', '.join(METRICS)}")
        if "random" not in self.methods:
            self.methods = self.methods + ("random",)  # the reference every method is compared with
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.num_targets < 1 or self.num_controls < 0:
            raise ValueError(
                f"num_targets must be >= 1 and num_controls >= 0, got "
                f"{self.num_targets}, {self.num_controls}"
            )
        if not 0 < self.top_k_frac < 1:
            raise ValueError(f"top_k_frac must lie in (0, 1), got {self.top_k_frac}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def settings(self) -> dict:
        return {"mucs": dict(self.mucs), "dtrak": dict(self.dtrak), "abu": dict(self.abu)}


# The --quick preset: one seed, 6 targets + 6 controls, mucs / pixel / random, shorter training;
# QUICK_LDS: its LDS (with --lds) on 8 subset models. Numbers from it are a smoke test, not a
# result.
QUICK = dict(
    seeds=(0,),
    methods=("mucs", "pixel", "random"),
    num_targets=6,
    num_controls=6,
    train=dict(steps=1500, batch_size=128, lr=2e-3, ema_decay=0.999),
    mucs=dict(num_noises=32, safety_steps=200, targets_per_batch=1),
    classifier=dict(steps=300, batch_size=128, lr=2e-3, width=16),
)
QUICK_LDS = dict(subsets=8)


def quick_config(**overrides) -> EvalConfig:
    return EvalConfig(**{**QUICK, **overrides})


class StopEvaluation(Exception):
    """Raised by `evaluate(stop_after=phase)` once that phase is done (tests of resumability)."""


def _digest(obj) -> str:
    return tensor_digest(
        {"k": torch.tensor(0), "json": json.dumps(obj, sort_keys=True, default=repr)}
    )[:20]


def _log(msg: str) -> None:
    print(f"[mucs-fast evaluate] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------
class Store:
    """OUT/artifacts: files named by content keys; records what was computed vs reused."""

    def __init__(self, out: str):
        self.root = os.path.join(out, "artifacts")
        os.makedirs(self.root, exist_ok=True)
        self.computed: list[str] = []
        self.reused: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def note(self, name: str, computed: bool) -> None:
        (self.computed if computed else self.reused).append(name)

    # tensors + json metadata in one safetensors file
    def load_tensors(self, name: str):
        from safetensors import safe_open

        p = self.path(name)
        if not os.path.isfile(p):
            return None
        try:
            with safe_open(p, "pt") as f:
                meta = json.loads((f.metadata() or {}).get("info", "{}"))
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception:  # unreadable: recompute
            return None

    def save_tensors(self, name: str, tensors: dict, meta: dict) -> None:
        from safetensors.torch import save_file

        t = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(
            self.path(name),
            lambda tmp: save_file(t, tmp, metadata={"info": json.dumps(meta, default=repr)}),
        )


# --------------------------------------------------------------------------------------------
# the phases
# --------------------------------------------------------------------------------------------
def _model_phase(
    store: Store,
    cfg: EvalConfig,
    x,
    y,
    seed: int,
    removed: torch.Tensor,
    data_key: str,
    device,
    progress: bool,
    recipe: Optional[dict] = None,
):
    """Train (or load) the model on x without the rows `removed` (training recipe `recipe`, default
    cfg.train); returns (den, key, info)."""

    train_cfg = cfg.train if recipe is None else recipe
    removed = torch.unique(torch.as_tensor(removed, dtype=torch.int64))
    key = _digest(
        {
            "data": data_key,
            "model": cfg.model,
            "train": train_cfg,
            "seed": seed,
            "removed": tensor_digest(removed) if removed.numel() else "none",
            "format": FORMAT,
            "conditional": y is not None,
        }
    )
    name = f"model-{key}.pt"
    path = store.path(name)
    if os.path.isfile(path):
        try:
            den, extra = load_checkpoint(path, with_extra=True)
            store.note(name, False)
            return den, key, json.loads(extra.get("info", "{}"))
        except (ValueError, FileNotFoundError):
            pass  # unreadable: retrain
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[removed] = False
    label_dim = 0 if y is None else int(y.max()) + 1
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(seed, "model-init"))
        net = DiT(tuple(x.shape[1:]), label_dim=label_dim, **cfg.model)
    t0 = time.perf_counter()
    den, info = train(
        EDMDenoiser(net),
        x[keep],
        None if y is None else y[keep],
        seed=seed,
        device=device,
        progress=progress,
        **train_cfg,
    )
    summary = {
        "n_train": int(keep.sum()),
        "removed": int(removed.numel()),
        "seconds": time.perf_counter() - t0,
        "final_loss": float(sum(info["loss"][-100:]) / max(1, len(info["loss"][-100:]))),
        "num_params": info["num_params"],
    }
    save_checkpoint(path, den, {"info": json.dumps(summary)})
    store.note(name, True)
    return den, key, summary


def _generate_phase(
    store: Store,
    cfg: EvalConfig,
    den,
    model_key: str,
    seeds: torch.Tensor,
    labels: Optional[torch.Tensor],
    device,
    progress: bool,
):

    key = _digest(
        {
            "model": model_key,
            "seeds": seeds.tolist(),
            "labels": None if labels is None else labels.tolist(),
            "steps": cfg.sample_steps,
            "format": FORMAT,
        }
    )
    name = f"gen-{key}.safetensors"
    got = store.load_tensors(name)
    if got is not None:
        store.note(name, False)
        return got[0]["images"], key
    t0 = time.perf_counter()
    imgs = sample_edm(
        den, seeds, labels, num_steps=cfg.sample_steps, device=device, progress=progress
    )
    imgs = imgs.clamp(-1, 1)
    store.save_tensors(
        name, {"images": imgs, "seeds": seeds}, {"seconds": time.perf_counter() - t0}
    )
    store.note(name, True)
    return imgs, key


def _scores_phase(
    store: Store,
    cfg: EvalConfig,
    method: str,
    ctx_base: dict,
    targets,
    target_labels,
    base_key: dict,
    memo: dict,
):
    """Scores [K, N] of `method` (loaded, or computed and saved), memoized per seed."""
    if method in memo:
        return memo[method]
    key = _digest({**base_key, "method": method_key(method, cfg.settings()), "format": FORMAT})
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in method)
    name = f"scores-{slug}-{key}.safetensors"
    got = store.load_tensors(name)
    if got is not None:
        store.note(name, False)
        memo[method] = (got[0]["scores"], got[1])
        return memo[method]
    ctx = MethodContext(
        **ctx_base,
        work_dir=store.path(f"run-{slug}-{key}"),
        scores_of=lambda m: _scores_phase(
            store, cfg, m, ctx_base, targets, target_labels, base_key, memo
        )[0],
    )
    t0 = time.perf_counter()
    scores = get_method(method)(ctx, targets, target_labels)
    scores = torch.as_tensor(scores).float()
    if scores.shape != (targets.shape[0], ctx.N):
        raise ValueError(
            f"method {method!r} returned scores of shape {tuple(scores.shape)}, expected "
            f"[K={targets.shape[0]}, N={ctx.N}]"
        )
    info = {**ctx.info, "seconds": time.perf_counter() - t0}
    store.save_tensors(name, {"scores": scores}, info)
    store.note(name, True)
    memo[method] = (scores, info)
    return memo[method]


def topk_of(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Training positions [K, k] by descending score (NaN ranks last; ties: lower position
    first)."""
    s = torch.nan_to_num(scores.float(), nan=-math.inf)
    return torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]


def _lds_models(store: Store, cfg: EvalConfig, x, y, data_key: str, device, progress: bool) -> dict:
    """The LDS subset models (trained or loaded): {"masks" [S, N], "models", "keys", "info"}."""
    o = cfg.lds
    masks = subset_masks(x.shape[0], o["subsets"], o["alpha"], o["seed"])
    train = subset_train(cfg.train, o)
    models, keys, infos = [], [], []
    for s in range(o["subsets"]):
        _log(
            f"LDS: subset model {s + 1}/{o['subsets']} ({int(masks[s].sum())} images, "
            f"{train['steps']} steps)"
        )
        den, key, info = _model_phase(
            store,
            cfg,
            x,
            y,
            subset_seed(o["seed"], s),
            (~masks[s]).nonzero()[:, 0],
            data_key,
            device,
            progress,
            recipe=train,
        )
        models.append(den)
        keys.append(key)
        infos.append(info)
    return {
        "masks": masks,
        "models": models,
        "keys": keys,
        "info": {
            **o,
            "train_steps": train["steps"],
            "subset_size": int(masks[0].sum()),
            "models": infos,
        },
    }


def _lds_phase(
    store: Store,
    cfg: EvalConfig,
    lds: dict,
    targets,
    target_labels,
    gen_key: str,
    scores: dict,
    device,
) -> dict:
    """One seed's LDS: the targets' outputs under every subset model (an artifact), then each
    method's LDS per target."""
    o = cfg.lds
    bank_seed = derive_seed(o["seed"], "lds-bank")
    key = _digest(
        {
            "gen": gen_key,
            "T": targets.shape[0],
            "models": lds["keys"],
            "num_noises": o["num_noises"],
            "bank_seed": bank_seed,
            "format": FORMAT,
        }
    )
    name = f"lds-outputs-{key}.safetensors"
    got = store.load_tensors(name)
    if got is not None:
        outputs = got[0]["outputs"].double()
        store.note(name, False)
    else:
        t0 = time.perf_counter()
        bank = lds_bank(lds["models"][0], targets.shape[1:], o["num_noises"], bank_seed)
        outputs = torch.stack(
            [model_outputs(den, targets, target_labels, bank, device) for den in lds["models"]],
            dim=1,
        )  # [T, S]
        store.save_tensors(name, {"outputs": outputs}, {"seconds": time.perf_counter() - t0})
        store.note(name, True)
    return {
        "outputs": outputs,
        "per_target": {m: lds_per_target(sc, lds["masks"], outputs) for m, sc in scores.items()},
    }


def _classifier(store: Store, cfg: EvalConfig, x, y, data_key: str, progress: bool):

    if y is None or "feat" not in cfg.metrics:
        return None, None
    key = _digest(
        {"data": data_key, "classifier": cfg.classifier, "format": FORMAT, "feature_net": 2}
    )
    name = f"classifier-{key}.pt"
    path = store.path(name)
    if os.path.isfile(path):
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            net = FeatureNet(tuple(ck["args"][0]), *ck["args"][1:])
            net.load_state_dict(ck["state_dict"])
            store.note(name, False)
            return net.eval(), json.loads(ck["info"])
        except Exception:
            pass
    net, info = train_feature_net(x, y, progress=progress, **cfg.classifier)
    payload = {
        "args": [list(net.args[0]), *net.args[1:]],
        "state_dict": net.state_dict(),
        "info": json.dumps(info),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    store.note(name, True)
    return net, info


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
def evaluate(
    out: str,
    config: Optional[EvalConfig] = None,
    *,
    device=None,
    progress: bool = True,
    stop_after: Optional[str] = None,
    data: Optional[tuple] = None,
) -> dict:
    """Run (or resume) the counterfactual evaluation into folder `out`; returns results.json's dict.

    config: an EvalConfig (default: the full digits protocol); device: default CPU;
    stop_after: a phase name (PHASES) after which the run stops with StopEvaluation, leaving its
    artifacts for a later call to reuse; data: (images [N, C, H, W], class ids [N] or None) to use
    instead of loading config.data (tests).
    """

    cfg = config if config is not None else EvalConfig()
    if stop_after is not None and stop_after not in PHASES:
        raise ValueError(f"stop_after must be one of {PHASES}, got {stop_after!r}")
    device = torch.device(device or "cpu")
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    if data is None:
        x, y, desc = load_dataset(cfg.data, cfg.image_size, cfg.n_train)
    else:
        x, y = data
        desc = f"in-memory data, {x.shape[0]} images {tuple(x.shape[1:])}"
    x = x.float().contiguous()
    N = x.shape[0]
    k = cfg.top_k if cfg.top_k is not None else max(1, round(cfg.top_k_frac * N))
    if not 1 <= k <= N:
        raise ValueError(f"top_k must lie in [1, N={N}], got {k}")
    if cfg.adaptive and "adaptive_top_k" not in cfg.mucs:  # resolved here: k depends on N
        cfg = dataclasses.replace(cfg, mucs={**cfg.mucs, "adaptive_top_k": k})
    data_key = tensor_digest({"x": x, "y": y if y is not None else torch.tensor([])})
    store = Store(out)
    atomic_write_json(
        os.path.join(out, "eval_config.json"),
        {"config": cfg.to_dict(), "data": desc, "N": N, "top_k": k, "mucs_fast": __version__},
    )
    _log(f"data: {desc}; N={N}, top-k={k}; seeds {list(cfg.seeds)}; methods {list(cfg.methods)}")
    classifier, clf_info = _classifier(store, cfg, x, y, data_key, progress)
    lds = _lds_models(store, cfg, x, y, data_key, device, progress) if cfg.lds else None
    if stop_after == "lds-models":
        raise StopEvaluation("lds-models")
    run = _Run(
        store,
        cfg,
        x,
        y,
        data_key,
        k,
        device,
        progress,
        stop_after,
        classifier,
        lds,
        os.path.join(out, "cache"),
    )
    per_seed = {seed: _seed_phase(run, seed) for seed in cfg.seeds}
    results = summarize(
        cfg,
        per_seed,
        N=N,
        k=k,
        data_desc=desc,
        classifier_info=clf_info,
        lds_info=None if lds is None else lds["info"],
    )
    results["artifacts"] = {"computed": store.computed, "reused": store.reused}
    results["timings"] = {"total_seconds": time.perf_counter() - t_start}
    results["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    write_outputs(out, cfg, results, per_seed)
    return results


@dataclasses.dataclass
class _Run:
    """What every seed of an evaluation shares."""

    store: "Store"
    cfg: EvalConfig
    x: torch.Tensor
    y: Optional[torch.Tensor]
    data_key: str
    k: int
    device: torch.device
    progress: bool
    stop_after: Optional[str]
    classifier: object
    lds: Optional[dict]
    cache_dir: str


def _generation_labels(cfg: EvalConfig, y, T: int, G: int) -> Optional[torch.Tensor]:
    """Class ids of the T targets (cfg.target_classes in turn) and G − T controls (every class)."""
    if y is None:
        return None
    classes = int(y.max()) + 1
    tc = (
        torch.tensor(cfg.target_classes)
        if cfg.target_classes is not None
        else torch.arange(classes)
    )
    if int(tc.min()) < 0 or int(tc.max()) >= classes:
        raise ValueError(f"target_classes must lie in [0, {classes}), got {cfg.target_classes}")
    return torch.cat([tc[torch.arange(T) % tc.numel()], torch.arange(G - T) % classes])


def _seed_phase(run: _Run, seed: int) -> dict:
    """One seed of the protocol: pre model → targets and controls → every method's attribution
    (and LDS) → a post model per method without its top-k → regenerated images and their metrics."""
    store, cfg, x, y, N, k = run.store, run.cfg, run.x, run.y, run.x.shape[0], run.k
    device, progress, stop_after = run.device, run.progress, run.stop_after
    G, T = cfg.num_targets + cfg.num_controls, cfg.num_targets
    _log(f"seed {seed}: pre model ({cfg.train['steps']} steps)")
    pre, pre_key, pre_info = _model_phase(
        store, cfg, x, y, seed, torch.empty(0, dtype=torch.int64), run.data_key, device, progress
    )
    if stop_after == "pre":
        raise StopEvaluation("pre")
    gen_seeds = torch.tensor(
        [derive_seed(seed, "generate", i) % (1 << 62) for i in range(G)], dtype=torch.int64
    )
    gen_labels = _generation_labels(cfg, y, T, G)
    _log(f"seed {seed}: generating {T} targets + {G - T} controls")
    gen_pre, gen_key = _generate_phase(
        store, cfg, pre, pre_key, gen_seeds, gen_labels, device, progress
    )
    if stop_after == "generate":
        raise StopEvaluation("generate")
    targets = gen_pre[:T]
    t_labels = None if gen_labels is None else gen_labels[:T]
    ctx_base = dict(
        den=pre,
        train=x,
        train_labels=y,
        seed=seed,
        device=device,
        progress=progress,
        settings=cfg.settings(),
        cache_dir=run.cache_dir,
    )
    base_key = {"pre": pre_key, "gen": gen_key, "T": T, "seed": seed}
    memo: dict = {}
    scores, infos, topk = {}, {}, {}
    for m in cfg.methods:
        _log(f"seed {seed}: attribution with {m}")
        scores[m], infos[m] = _scores_phase(
            store, cfg, m, ctx_base, targets, t_labels, base_key, memo
        )
        topk[m] = topk_of(scores[m], k)
    lds_seed = None
    if run.lds is not None:
        _log(f"seed {seed}: LDS of the targets under {len(run.lds['models'])} subset models")
        lds_seed = _lds_phase(store, cfg, run.lds, targets, t_labels, gen_key, scores, device)
    if stop_after == "attribute":
        raise StopEvaluation("attribute")
    posts = {}
    for m in cfg.methods:
        removed = stats.union(topk[m])
        _log(f"seed {seed}: post model for {m} ({removed.numel()} of {N} images removed)")
        posts[m] = _model_phase(store, cfg, x, y, seed, removed, run.data_key, device, progress)
    if stop_after == "post":
        raise StopEvaluation("post")
    sims, gens = {}, {}
    for m in cfg.methods:
        den_post, post_key, _ = posts[m]
        gens[m], _ = _generate_phase(
            store, cfg, den_post, post_key, gen_seeds, gen_labels, device, progress
        )
        sims[m] = {
            grp: compute_metrics(gen_pre[sl], gens[m][sl], cfg.metrics, run.classifier)
            for grp, sl in (("targets", slice(0, T)), ("controls", slice(T, G)))
        }
    if stop_after == "regenerate":
        raise StopEvaluation("regenerate")
    return {
        "pre": pre_info,
        "post": {m: posts[m][2] for m in cfg.methods},
        "sims": sims,
        "topk": topk,
        "union": {m: int(stats.union(topk[m]).numel()) for m in cfg.methods},
        "method_info": infos,
        "gen_pre": gen_pre,
        "gen_post": gens,
        "targets_labels": t_labels,
        "lds": lds_seed,
    }


def summarize(
    cfg: EvalConfig,
    per_seed: dict,
    *,
    N: int,
    k: int,
    data_desc: str = "",
    classifier_info: Optional[dict] = None,
    lds_info: Optional[dict] = None,
) -> dict:
    """Pool per-image similarities over seeds and compute every statistic (results.json's dict);
    with LDS (per_seed[s]["lds"]), its per-target values pooled over seeds → "lds"."""
    seeds = list(per_seed)
    methods = list(cfg.methods)

    def pooled(m, grp, metric):
        return torch.cat([per_seed[s]["sims"][m][grp][metric] for s in seeds])

    res_methods = {}
    for m in methods:
        entry = {}
        for grp in ("targets", "controls"):
            entry[grp] = {}
            for metric in cfg.metrics:
                sim_m, sim_r = pooled(m, grp, metric), pooled("random", grp, metric)
                entry[grp][metric] = stats.group_stats(sim_m, sim_r, METRICS[metric].distance, grp)
            vals = list(entry[grp].values())
            entry.setdefault("mean", {})[grp] = {
                "auc": _nanmean([v["auc"] for v in vals]),
                "ratio": _nanmean([v["ratio"] for v in vals]),
            }
        res_methods[m] = entry
    pvalues = {
        grp: {
            metric: {
                m1: {
                    m2: stats.mannwhitney_p(
                        pooled(m1, grp, metric),
                        pooled(m2, grp, metric),
                        "less" if grp == "targets" else "two-sided",
                    )
                    for m2 in methods
                    if m2 != m1
                }
                for m1 in methods
            }
            for metric in cfg.metrics
        }
        for grp in ("targets", "controls")
    }
    within = {}
    for m in methods:
        vals = [v for s in seeds for v in stats.within_overlaps(per_seed[s]["topk"][m])]
        mu, ci = stats.mean_ci(vals)
        within[m] = {"mean": mu, "ci": ci}
    cross = {
        m1: {
            m2: stats.mean_ci(
                [
                    v
                    for s in seeds
                    for v in stats.cross_overlaps(per_seed[s]["topk"][m1], per_seed[s]["topk"][m2])
                ]
            )[0]
            for m2 in methods
            if m2 != m1
        }
        for m1 in methods
    }
    union_per_seed = {m: [per_seed[s]["union"][m] for s in seeds] for m in methods}
    per_seed_auc = {
        str(s): {
            m: {
                metric: stats.auc(
                    per_seed[s]["sims"][m]["targets"][metric],
                    per_seed[s]["sims"]["random"]["targets"][metric],
                )
                for metric in cfg.metrics
            }
            for m in methods
        }
        for s in seeds
    }
    results = {
        "format": FORMAT,
        "mucs_fast": __version__,
        "config": {**cfg.to_dict(), "N": N, "top_k": k, "data_description": data_desc},
        "union_sizes": {m: int(round(sum(v) / len(v))) for m, v in union_per_seed.items()},
        "union_sizes_per_seed": union_per_seed,
        "methods": res_methods,
        "pvalues": pvalues,
        "overlap": {"within": within, "cross": cross},
        "per_seed_auc": per_seed_auc,
        "per_image": {
            m: {
                grp: {metric: pooled(m, grp, metric).tolist() for metric in cfg.metrics}
                for grp in ("targets", "controls")
            }
            for m in methods
        },
        "models": {str(s): {"pre": per_seed[s]["pre"], "post": per_seed[s]["post"]} for s in seeds},
        "method_info": {m: {str(s): per_seed[s]["method_info"][m] for s in seeds} for m in methods},
        "classifier": classifier_info,
    }
    if lds_info is not None:
        lds = {}
        for m in methods:
            vals = [v for s in seeds for v in per_seed[s]["lds"]["per_target"][m]]
            mu, ci = stats.mean_ci(vals)
            lds[m] = {"mean": mu, "ci": ci, "per_target": vals}
        results["lds"] = lds
        results["lds_models"] = lds_info
    return results


def _nanmean(vals: Sequence[float]) -> float:
    v = [x for x in vals if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan
