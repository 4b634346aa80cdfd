"""`attribute`: MUCS attribution of K generated images over N training images.

Phases (spec/MUCS.md): resolve t_sched / L_null → draw the inference bank → original losses L_t
[N, M] → for every target: mirrored bounded unlearning of a fresh copy, then the streamed
noise-consistent skew against L_t → scores [K, N].

Randomness: every stream has its own generator with a seed derived from `config.seed` and a tag
(the bank, L_null, t_sched) or the target's content (its unlearning batches and noise), so a
target's scores do not depend on which other targets share the run, on their order, or on resuming.
All inputs are validated before any heavy compute.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Optional

import torch

from . import __version__
from ._io import derive_seed, key_digest, tensor_digest
from .cache import LossCache
from .config import MUCSConfig
from .denoisers import Denoiser
from .noise import NoiseBank, estimate_t_sched
from .params import set_trainable, trainable_names
from .result import Attribution
from .rundir import RunDir
from .score import inference_losses, score_batch_images, score_target, use_compile
from .unlearn import RetainStream, UnlearnInfo, unlearn

# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def check_images(name: str, x, chw: Optional[tuple] = None) -> torch.Tensor:
    """A float tensor [N, C, H, W] with N ≥ 1, finite, and (when given) matching C/H/W."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        hint = f"; for a single image use {name}[None]" if x.dim() == 3 else ""
        raise ValueError(f"{name}: expected a 4-D tensor [N, C, H, W], got shape {tuple(x.shape)}{hint}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected float images in the model's data range (e.g. [-1, 1]), "
                         f"got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty (0 images)")
    if chw is not None and tuple(x.shape[1:]) != tuple(chw):
        raise ValueError(f"{name}: images are C×H×W = {'×'.join(map(str, x.shape[1:]))}, but the "
                         f"training images are {'×'.join(map(str, chw))}")
    bad = ~torch.isfinite(x)
    if bad.any():
        i = int(bad.reshape(x.shape[0], -1).any(1).nonzero()[0])
        raise ValueError(f"{name}: image {i} contains NaN or Inf ({int(bad.sum())} values in all)")
    return x


def _check_ids(train_ids, N: int) -> torch.Tensor:
    if train_ids is None:
        return torch.arange(N, dtype=torch.int64)
    ids = torch.as_tensor(train_ids)
    if ids.shape != (N,) or torch.is_floating_point(ids):
        raise ValueError(f"train_ids: expected int64 [N={N}], got shape {tuple(ids.shape)} ({ids.dtype})")
    ids = ids.long().cpu()
    if torch.unique(ids).numel() != N:
        raise ValueError("train_ids: ids must be unique")
    return ids


def resolve_lr(cfg: MUCSConfig, den: Denoiser) -> float:
    if cfg.lr is not None:
        return float(cfg.lr)
    if den.train_lr is not None:
        return float(den.train_lr) / cfg.lr_factor
    raise ValueError("MUCSConfig.lr is None and the model's training learning rate is unknown: pass "
                     "MUCSConfig(lr=<training lr / 10>) (the reference uses 1e-5 for its CIFAR-10 DiT) "
                     "or the denoiser's train_lr=")


def _probe(den: Denoiser, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
    """One tiny forward: architecture/data mismatches fail here, with context, not mid-run."""
    eps, level = den.training_noise(x[:1].shape, torch.Generator(x.device).manual_seed(0), None, x.device)
    try:
        with torch.no_grad():
            loss = den.loss(x[:1], eps, level, None if y is None else y[:1])
    except Exception as e:  # re-raised with what was fed in
        raise ValueError(f"the model cannot process the data (one image of shape {tuple(x.shape[1:])}"
                         f"{'' if y is None else f', labels {tuple(y.shape[1:])}'}): "
                         f"{type(e).__name__}: {e}") from e
    if loss.shape != (1,):
        raise ValueError(f"the denoiser's loss must be one value per sample, got shape {tuple(loss.shape)}")


# --------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------
def _fork_rng(device: torch.device):
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@torch.no_grad()
def estimate_loss_null(den: Denoiser, x, y, cfg: MUCSConfig, device, progress=False) -> float:
    """L_null = mean loss of a freshly initialized model over up to `loss_null_batches` retain
    batches (one epoch at most, as the reference's loop over its DataLoader), training noise."""
    with _fork_rng(device):
        torch.manual_seed(derive_seed(cfg.seed, "loss_null", "init"))
        net0 = den.fresh_net()
    net0 = net0.to(device).eval()
    B = cfg.B
    retain = RetainStream(x.shape[0], B, torch.Generator().manual_seed(derive_seed(cfg.seed, "loss_null")))
    gen = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "loss_null", "noise"))
    n_batches = min(cfg.loss_null_batches, x.shape[0] // B)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in _bar(range(n_batches), "L_null", progress):
        idx = next(retain).to(device)
        eps, level = den.training_noise(x[idx].shape, gen, cfg.t_sched_train, device)
        total += den.loss(x[idx], eps, level, None if y is None else y[idx], net=net0).double().sum()
    return float(total) / (n_batches * B)


def make_bank(den: Denoiser, chw, cfg: MUCSConfig, t_sched) -> NoiseBank:
    """The inference bank, drawn on the CPU from its own seed (so it is the same on every device)."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "bank"))
    level = den.inference_levels(cfg.num_noises, t_sched, generator=g)
    eps = torch.randn((cfg.num_noises, *chw), generator=g)
    return NoiseBank(eps, level.to(den.level_dtype))


def _bar(it, desc, progress, total=None, unit="it"):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


def _pbar(total, desc, progress, unit="img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, dynamic_ncols=True,
                disable=not progress)


# --------------------------------------------------------------------------------------------
# attribute
# --------------------------------------------------------------------------------------------
def attribute(den: Denoiser, train: torch.Tensor, targets: torch.Tensor, config: Optional[MUCSConfig] = None,
              train_labels=None, target_labels=None, train_ids=None, device=None, progress: bool = True,
              run_dir=None, resume: bool = False, cache_dir="auto", top_k: int = 100,
              meta: Optional[dict] = None) -> Attribution:
    """Score every training image for every target with MUCS.

    den: an `EDMDenoiser` or `DiffusersDenoiser`; train [N, C, H, W] and targets [K, C, H, W]: float
    images in the model's data range; labels: class ids [N] / [K] or label vectors (conditional
    models); train_ids: int64 [N] (default 0..N−1); device: default CUDA when available;
    run_dir: persist per-target results there; resume: continue an interrupted run in run_dir;
    cache_dir: where the original model's losses are cached ("auto": $MUCS_FAST_CACHE or
    ~/.cache/mucs_fast; None: no cache); top_k, meta: with run_dir, the result written there keeps
    the top min(top_k, N) ids per target and `meta` merged into its metadata.
    Returns an `Attribution` (scores float32 [K, N], higher = more influential).
    """
    t_start = time.perf_counter()
    cfg = config if config is not None else MUCSConfig()
    if not isinstance(cfg, MUCSConfig):
        raise TypeError(f"config must be a MUCSConfig, got {type(cfg).__name__}")
    if not isinstance(den, Denoiser):
        raise TypeError(f"den must be an EDMDenoiser or DiffusersDenoiser, got {type(den).__name__}")
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    # -- validate everything before heavy compute --------------------------------------------
    train = check_images("train", train)
    targets = check_images("targets", targets, train.shape[1:])
    N, K, chw = train.shape[0], targets.shape[0], tuple(train.shape[1:])
    ids = _check_ids(train_ids, N)
    y_train = den.prepare_labels(train_labels, N, "train_labels")
    y_targets = den.prepare_labels(target_labels, K, "target_labels")
    if cfg.B > N:
        raise ValueError(f"batch size B={cfg.B} (MUCSConfig.batch_size, default num_noises) exceeds the "
                         f"training set size N={N}; pass MUCSConfig(batch_size=<= {N})")
    lr = resolve_lr(cfg, den)
    frozen = cfg.frozen if cfg.frozen is not None else den.default_frozen()
    names = trainable_names(den.net, frozen)
    if cfg.loss_null == "auto" and den.fresh_net_error() is not None:
        raise ValueError(den.fresh_net_error())
    net0 = den.net
    first = next(net0.parameters(), None)
    orig_device = None if first is None else first.device
    den.net = net0.to(device)
    try:
        train_d = train.to(device, torch.float32)
        targets_d = targets.to(device, torch.float32)
        y_train = None if y_train is None else y_train.to(device)
        y_targets = None if y_targets is None else y_targets.to(device)
        den.net.eval()
        _probe(den, train_d, y_train)

        fingerprints = {
            "model": den.fingerprint(),
            "train": tensor_digest({"x": train, "y": torch.as_tensor(y_train.cpu()) if y_train is not None
                                    else torch.tensor([]), "ids": ids}),
            "targets": [tensor_digest({"x": targets[k], "y": y_targets[k].cpu() if y_targets is not None
                                       else torch.tensor([])}) for k in range(K)],
        }
        run = None
        if run_dir is not None:
            key = {"config": cfg.score_fields(), "model": fingerprints["model"], "train": fingerprints["train"],
                   "targets": fingerprints["targets"], "lr": lr}
            run = RunDir(run_dir, key, resume)

        timings = {}
        # -- t_sched "auto" ----------------------------------------------------------------------
        t0 = time.perf_counter()
        t_sched_infer, t_sched_train = cfg.t_sched_infer, cfg.t_sched_train
        if "auto" in (t_sched_infer, t_sched_train):
            full = den.sigma_of(den.full_grid(cfg.num_noises).to(device))
            t_auto = estimate_t_sched(train_d, full, cfg.B,
                                      torch.Generator().manual_seed(derive_seed(cfg.seed, "t_sched")))
            t_auto = max(t_auto, 1.0 / cfg.num_noises)  # at least one grid level
            t_sched_infer = t_auto if t_sched_infer == "auto" else t_sched_infer
            t_sched_train = t_auto if t_sched_train == "auto" else t_sched_train
        run_cfg = copy.copy(cfg)
        run_cfg.t_sched_infer, run_cfg.t_sched_train = t_sched_infer, t_sched_train

        # -- L_null ---------------------------------------------------------------------------
        if cfg.loss_null == "auto":
            loss_null = estimate_loss_null(den, train_d, y_train, run_cfg, device, progress)
            if not (math.isfinite(loss_null) and loss_null > 0):
                raise ValueError(f"loss_null='auto' gave {loss_null}: the freshly initialized model "
                                 "produces non-finite losses; pass MUCSConfig(loss_null=<number>)")
        else:
            loss_null = float(cfg.loss_null)
        timings["setup"] = time.perf_counter() - t0

        # -- bank and original losses L_t -----------------------------------------------------
        bank = make_bank(den, chw, run_cfg, t_sched_infer).to(device)
        per_batch = score_batch_images(cfg.score_batch, bank.M, device)
        score_kw = dict(images_per_batch=per_batch, precision=cfg.precision)
        compile_on = use_compile(cfg.compile, N * bank.M)
        t0 = time.perf_counter()
        cache = LossCache(cache_dir)
        # L_t depends on the model, the data and the bank (and how it is evaluated), not on targets
        lt_key = key_digest(fingerprints["model"], fingerprints["train"], bank.fingerprint(),
                            cfg.use_same_noise_infer, cfg.precision, device.type, cfg.seed)
        loss_t = cache.get(lt_key)
        timings["loss_t_cached"] = loss_t is not None
        if loss_t is None:
            gen_t = None
            if not cfg.use_same_noise_infer:
                gen_t = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "infer", "original"))
            with _pbar(N, "L_t (original)", progress) as bar:
                loss_t = inference_losses(den, den.net, train_d, y_train, bank, generator=gen_t,
                                          compile=compile_on, progress=bar.update, **score_kw)
            cache.put(lt_key, loss_t)
        loss_t = loss_t.to(device)
        timings["loss_t"] = time.perf_counter() - t0

        # -- targets ------------------------------------------------------------------------------
        scores = torch.empty(K, N, dtype=torch.float32)
        infos: list[Optional[dict]] = [None] * K
        todo = []
        for k in range(K):
            done = run.load_target(k) if (run is not None and resume) else None
            if done is not None:
                scores[k], infos[k] = done
            else:
                todo.append(k)
        timings["unlearn"] = timings["score"] = 0.0
        Kb = cfg.targets_per_batch
        blocks = [todo[i:i + Kb] for i in range(0, len(todo), Kb)]
        outer = _bar(blocks, "targets", progress and len(blocks) > 1, unit="block")
        for block in outer:
            args = (den, names, train_d, y_train, targets_d[block],
                    None if y_targets is None else y_targets[block], [fingerprints["targets"][k] for k in block],
                    run_cfg, loss_null, lr, bank, loss_t, score_kw, device, progress)
            if len(block) == 1 and Kb == 1:
                rows, block_infos = _attribute_one(*args)
            else:
                rows, block_infos = _attribute_block(*args, compile=compile_on)
            for k, row, info in zip(block, rows, block_infos):
                timings["unlearn"] += info["unlearn_seconds"]
                timings["score"] += info["score_seconds"]
                scores[k], infos[k] = row.cpu(), info
                if run is not None:
                    run.save_target(k, scores[k], info)
        timings["total"] = time.perf_counter() - t_start
    finally:
        if orig_device is not None:
            den.net = net0.to(orig_device)

    from .ops import backends

    flagged = [k for k in range(K) if infos[k]["stop"] in ("nan", "cap")]
    meta_out = {
        "mucs_fast": __version__,
        "config": cfg.to_dict(),
        "resolved": {"t_sched_infer": t_sched_infer, "t_sched_train": t_sched_train, "loss_null": loss_null,
                     "lr": lr, "batch_size": cfg.B, "trainable": names,
                     "trainable_numel": sum(p.numel() for n, p in den.net.named_parameters() if n in set(names))},
        "fingerprints": {**fingerprints, "noise_bank": bank.fingerprint()},
        "targets": infos,
        "flagged": flagged,
        "timings": timings,
        "device": str(device),
        "compiled": compile_on,
        "backend": backends(),
        "torch": torch.__version__,
        "N": N, "K": K, "M": cfg.num_noises,
    }
    if meta is not None:
        meta_out.update(meta)
    res = Attribution(scores, ids, meta_out)
    if run is not None:
        res.save(run.path, top_k=min(top_k, N))
        run.close()
    return res


def _streams(cfg, target_fp, device):
    """Target-owned randomness: retain batches (CPU generator, like a DataLoader) and noise."""
    retain = torch.Generator().manual_seed(derive_seed(cfg.seed, "retain", target_fp))
    noise = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "noise", target_fp))
    infer = None
    if not cfg.use_same_noise_infer:
        infer = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "infer", target_fp))
    return retain, noise, infer


def _attribute_one(den, names, train_d, y_train, x_hat, y_hat, target_fps, cfg, loss_null, lr, bank, loss_t,
                   score_kw, device, progress):
    """One target, the plain way: unlearn a fresh deep copy with torch.optim.AdamW, then score it."""
    (target_fp,) = target_fps
    net = copy.deepcopy(den.net)
    params = set_trainable(net, names)
    g_retain, g_noise, g_infer = _streams(cfg, target_fp, device)
    retain = RetainStream(train_d.shape[0], cfg.B, g_retain)
    cap = cfg.max_steps if cfg.max_steps is not None else cfg.safety_steps
    with _pbar(cap, "unlearn", progress, unit="step") as bar:
        def show(info: UnlearnInfo):
            bar.n = info.steps
            bar.set_postfix(L_r=f"{info.loss_r:.3f}", L_f=f"{info.loss_f:.3f}",
                            goal=f"{(1 - cfg.tolerance) * loss_null:.3f}", refresh=False)
            bar.refresh()
        info = unlearn(den, net, params, train_d, y_train, x_hat[0], None if y_hat is None else y_hat[0],
                       cfg=cfg, loss_null=loss_null, lr=lr, retain=retain, generator=g_noise,
                       progress=show if progress else None)
    t0 = time.perf_counter()
    if info.stop == "nan":
        row = torch.full((train_d.shape[0],), math.nan)
    else:
        for p in params:
            p.requires_grad_(False)
        with _pbar(train_d.shape[0], "score", progress) as bar:
            row = score_target(den, net, train_d, y_train, bank, loss_t, eps=cfg.eps,
                               use_loss_ratio=cfg.use_loss_ratio, use_same_noise_infer=cfg.use_same_noise_infer,
                               generator=g_infer, progress=bar.update, **score_kw)
    d = info.to_dict()
    d["unlearn_seconds"] = d.pop("seconds")
    d["score_seconds"] = time.perf_counter() - t0
    d["target"] = target_fp
    return [row], [d]


def _attribute_block(den, names, train_d, y_train, x_hats, y_hats, target_fps, cfg, loss_null, lr, bank, loss_t,
                     score_kw, device, progress, compile=False):
    """K targets together: batched unlearning (torch.func), then one scoring pass for all K."""
    from .functional import StackedNet
    from .score import score_stacked
    from .unlearn import unlearn_batched

    K = len(target_fps)
    streams = [_streams(cfg, fp, device) for fp in target_fps]
    retains = [RetainStream(train_d.shape[0], cfg.B, r) for r, _, _ in streams]
    cap = cfg.max_steps if cfg.max_steps is not None else cfg.safety_steps
    t0 = time.perf_counter()
    with _pbar(cap, f"unlearn ×{K}", progress, unit="step") as bar:
        def show(infos, active):
            bar.n = max(i.steps for i in infos)
            bar.set_postfix(running=len(active), L_f=" ".join(f"{i.loss_f:.2f}" for i in infos), refresh=False)
            bar.refresh()
        weights, infos = unlearn_batched(den, den.net, names, train_d, y_train, x_hats, y_hats, cfg=cfg,
                                         loss_null=loss_null, lr=lr, retains=retains,
                                         generators=[g for _, g, _ in streams], progress=show if progress else None)
    unlearn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ok = [k for k in range(K) if infos[k].stop != "nan"]
    rows = [torch.full((train_d.shape[0],), math.nan) for _ in range(K)]
    if ok:
        stack = StackedNet(den.net, {n: w[ok] for n, w in weights.items()})
        gens = None if cfg.use_same_noise_infer else [streams[k][2] for k in ok]
        with _pbar(train_d.shape[0], f"score ×{len(ok)}", progress) as bar:
            S = score_stacked(den, stack, train_d, y_train, bank, loss_t, eps=cfg.eps,
                              use_loss_ratio=cfg.use_loss_ratio, use_same_noise_infer=cfg.use_same_noise_infer,
                              generators=gens, compile=compile, progress=bar.update, **score_kw)
        for i, k in enumerate(ok):
            rows[k] = S[i]
    score_s = time.perf_counter() - t0
    out = []
    for k, info in enumerate(infos):
        d = info.to_dict()
        d.pop("seconds")
        # the block's wall time, shared equally: per-target cost of the batched run
        d["unlearn_seconds"] = unlearn_s / K
        d["score_seconds"] = score_s / K
        d["target"] = target_fps[k]
        d["block"] = K
        out.append(d)
    return rows, out
