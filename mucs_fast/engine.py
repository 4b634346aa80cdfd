"""`attribute`: MUCS attribution of K generated images over N training images.

The run, as a short sequence of phases over one run context (`Run`):

    prepare     validate every input (nothing heavy before this passes), move to the device
    resolve     lr, trainable set, t_sched "auto", L_null, the inference bank, the loss pass
    loss_t      the original model's losses L_t [N, M] (cached on disk; skipped when a resumed run
                has nothing left to do)
    blocks      for each block of ≤ targets_per_batch targets: unlearn the K copies together, then
                score them in one pass over the training set, and persist the block's rows
    result      the Attribution (written to run_dir once)

Randomness: every stream has its own generator with a seed derived from `config.seed` and a tag
(the bank, L_null, t_sched) or the target's content (its unlearning batches and noise), so a
target's scores do not depend on which other targets share the run, on their order, on the block
size or on resuming. The engine never changes the caller's objects: the model's device, train/eval
mode and `requires_grad` flags come back as they were.
"""

from __future__ import annotations

import copy
import dataclasses
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
from .params import trainable_names
from .result import Attribution
from .rundir import RunDir
from .score import LossPass, original_losses, score_batch_images, score_stacked, use_compile
from .unlearn import RetainStream, unlearn_batched


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def check_images(name: str, x, chw: Optional[tuple] = None) -> torch.Tensor:
    """A float tensor [N, C, H, W] with N ≥ 1, finite, and (when given) matching C/H/W; returned
    detached (inputs that require grad would make every pass record a graph) and as float32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor [N, C, H, W], got {type(x).__name__}")
    x = x.detach()
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
    # float32 is what the engine computes with, so fingerprints and seeds come from these values
    return x.float()


def _check_ids(train_ids, N: int) -> torch.Tensor:
    if train_ids is None:
        return torch.arange(N, dtype=torch.int64)
    ids = torch.as_tensor(train_ids).detach()
    if ids.shape != (N,) or torch.is_floating_point(ids):
        raise ValueError(f"train_ids: expected int64 [N={N}], got shape {tuple(ids.shape)} ({ids.dtype})")
    ids = ids.long().cpu()
    if torch.unique(ids).numel() != N:
        raise ValueError("train_ids: ids must be unique")
    return ids


def _check_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: unknown device {device!r} ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} is not available (torch sees no CUDA device)")
    return dev


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
# small functions of (denoiser, data, seed)
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


def target_streams(cfg: MUCSConfig, target_fp: str, N: int, device):
    """Target-owned randomness: retain batches (CPU generator, like a DataLoader), training noise
    (on the device), and the seed of its independent inference noise (use_same_noise_infer=False)."""
    retain = RetainStream(N, cfg.B, torch.Generator().manual_seed(derive_seed(cfg.seed, "retain", target_fp)))
    noise = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "noise", target_fp))
    return retain, noise, derive_seed(cfg.seed, "infer", target_fp)


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
# the run context
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """What the phases share. `den` is the engine's own view of the caller's denoiser (its net on
    the run's device); `cfg` has t_sched resolved; `x`, `y`, `x_hat`, `y_hat` live on the device."""

    den: Denoiser
    cfg: MUCSConfig
    device: torch.device
    progress: bool
    x: torch.Tensor
    y: Optional[torch.Tensor]
    ids: torch.Tensor
    x_hat: torch.Tensor
    y_hat: Optional[torch.Tensor]
    fingerprints: dict
    names: list
    lr: float
    run_dir: Optional[RunDir] = None
    loss_null: Optional[float] = None
    bank: Optional[NoiseBank] = None
    loss_pass: Optional[LossPass] = None
    loss_t: Optional[torch.Tensor] = None
    compiled: bool = False
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def N(self) -> int:
        return self.x.shape[0]

    @property
    def K(self) -> int:
        return self.x_hat.shape[0]


def _engine_net(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The caller's module when it already lives on `device` (the engine only reads its weights),
    else a copy there: moving the caller's module would change the caller's object."""
    tensors = list(net.parameters()) + list(net.buffers())
    if all(t.device == device for t in tensors):
        return net
    return copy.deepcopy(net).to(device)


# --------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------
def prepare(den, train, targets, cfg, train_labels, target_labels, train_ids, device, progress) -> Run:
    """Validate every input before any heavy compute; the device copies of the data."""
    if not isinstance(cfg, MUCSConfig):
        raise TypeError(f"config must be a MUCSConfig, got {type(cfg).__name__}")
    if not isinstance(den, Denoiser):
        raise TypeError(f"den must be an EDMDenoiser or DiffusersDenoiser, got {type(den).__name__}")
    device = _check_device(device)
    train = check_images("train", train)
    targets = check_images("targets", targets, train.shape[1:])
    N, K = train.shape[0], targets.shape[0]
    ids = _check_ids(train_ids, N)
    y_train = den.prepare_labels(train_labels, N, "train_labels")
    y_targets = den.prepare_labels(target_labels, K, "target_labels")
    if cfg.B > N:
        raise ValueError(f"batch size B={cfg.B} (MUCSConfig.batch_size, default num_noises) exceeds the "
                         f"training set size N={N}; pass MUCSConfig(batch_size=<= {N})")
    lr = resolve_lr(cfg, den)
    names = trainable_names(den.net, cfg.frozen if cfg.frozen is not None else den.default_frozen())
    if cfg.loss_null == "auto" and den.fresh_net_error() is not None:
        raise ValueError(den.fresh_net_error())
    fingerprints = {
        "model": den.fingerprint(),
        "train": tensor_digest({"x": train, "y": y_train.cpu() if y_train is not None else torch.tensor([]),
                                "ids": ids}),
        "targets": [tensor_digest({"x": targets[k], "y": y_targets[k].cpu() if y_targets is not None
                                   else torch.tensor([])}) for k in range(K)],
    }
    view = copy.copy(den)
    view.net = _engine_net(den.net, device)
    run = Run(den=view, cfg=copy.copy(cfg), device=device, progress=progress, x=train.to(device),
              y=None if y_train is None else y_train.to(device), ids=ids, x_hat=targets.to(device),
              y_hat=None if y_targets is None else y_targets.to(device), fingerprints=fingerprints,
              names=names, lr=lr)
    view.net.eval()
    _probe(view, run.x, run.y)
    return run


def resolve(run: Run, need_loss_null: bool) -> None:
    """t_sched "auto", L_null (when there is unlearning left to do), the bank and the loss pass."""
    cfg, den, device = run.cfg, run.den, run.device
    t0 = time.perf_counter()
    if "auto" in (cfg.t_sched_infer, cfg.t_sched_train):
        full = den.sigma_of(den.full_grid(cfg.num_noises).to(device))
        t_auto = estimate_t_sched(run.x, full, cfg.B, torch.Generator().manual_seed(derive_seed(cfg.seed, "t_sched")))
        t_auto = max(t_auto, 1.0 / cfg.num_noises)  # at least one grid level
        cfg.t_sched_infer = t_auto if cfg.t_sched_infer == "auto" else cfg.t_sched_infer
        cfg.t_sched_train = t_auto if cfg.t_sched_train == "auto" else cfg.t_sched_train
    if cfg.loss_null != "auto":
        run.loss_null = float(cfg.loss_null)
    elif need_loss_null:
        run.loss_null = estimate_loss_null(den, run.x, run.y, cfg, device, run.progress)
        if not (math.isfinite(run.loss_null) and run.loss_null > 0):
            raise ValueError(f"loss_null='auto' gave {run.loss_null}: the freshly initialized model "
                             "produces non-finite losses; pass MUCSConfig(loss_null=<number>)")
    run.bank = make_bank(den, tuple(run.x.shape[1:]), cfg, cfg.t_sched_infer).to(device)
    run.compiled = use_compile(cfg.compile, run.N * run.bank.M)
    run.loss_pass = LossPass(den, den.net, run.names, run.bank, precision=cfg.precision, compile=run.compiled,
                             images_per_batch=score_batch_images(cfg.score_batch, run.bank.M, device))
    run.timings["setup"] = time.perf_counter() - t0


def compute_loss_t(run: Run, cache_dir) -> None:
    """L_t [N, M] through the run's loss pass (the callable that scores the unlearned copies),
    from the cache when an entry for exactly this evaluation exists."""
    from .ops import backends

    cfg, lp = run.cfg, run.loss_pass
    t0 = time.perf_counter()
    cache = LossCache(cache_dir)
    key = key_digest(run.fingerprints["model"], run.fingerprints["train"], run.bank.fingerprint(),
                     cfg.use_same_noise_infer, cfg.precision, run.device.type, cfg.seed, run.names,
                     {"compiled": run.compiled, "mode": lp.mode, "per": lp.per, "backend": backends(),
                      "mucs_fast": __version__, "torch": torch.__version__})
    loss_t = cache.get(key)
    run.timings["loss_t_cached"] = loss_t is not None
    if loss_t is None:
        seed = None if cfg.use_same_noise_infer else derive_seed(cfg.seed, "infer", "original")
        with _pbar(run.N, "L_t (original)", run.progress) as bar:
            loss_t = original_losses(lp, run.x, run.y, run.ids, infer_seed=seed, progress=bar.update)
        cache.put(key, loss_t)
    run.loss_t = loss_t.to(run.device)
    run.timings["loss_t"] = time.perf_counter() - t0


def run_block(run: Run, block: list) -> tuple[list, list]:
    """Targets `block` (indices into the run's targets): K copies unlearned together (one vmapped
    step for all still running), then scored in one pass. Returns (rows [N] each, infos)."""
    cfg, den, K, N = run.cfg, run.den, len(block), run.N
    fps = [run.fingerprints["targets"][k] for k in block]
    streams = [target_streams(cfg, fp, N, run.device) for fp in fps]
    cap = cfg.max_steps if cfg.max_steps is not None else cfg.safety_steps
    t0 = time.perf_counter()
    with _pbar(cap, f"unlearn ×{K}", run.progress, unit="step") as bar:
        def show(infos, active):
            bar.n = max(i.steps for i in infos)
            bar.set_postfix(running=len(active), L_f=" ".join(f"{i.loss_f:.3f}" for i in infos),
                            goal=f"{(1 - cfg.tolerance) * run.loss_null:.3f}", refresh=False)
            bar.refresh()
        weights, infos = unlearn_batched(
            den, den.net, run.names, run.x, run.y, run.x_hat[block], None if run.y_hat is None else run.y_hat[block],
            cfg=cfg, loss_null=run.loss_null, lr=run.lr, retains=[r for r, _, _ in streams],
            generators=[g for _, g, _ in streams], progress=show if run.progress else None)
    unlearn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ok = [i for i in range(K) if infos[i].stop != "nan"]
    rows = [torch.full((N,), math.nan) for _ in range(K)]
    if ok:
        seeds = None if cfg.use_same_noise_infer else [streams[i][2] for i in ok]
        with _pbar(N, f"score ×{len(ok)}", run.progress) as bar:
            S = score_stacked(run.loss_pass, {n: w[ok] for n, w in weights.items()}, run.x, run.y, run.ids,
                              run.loss_t, eps=cfg.eps, use_loss_ratio=cfg.use_loss_ratio,
                              use_same_noise_infer=cfg.use_same_noise_infer, infer_seeds=seeds, progress=bar.update)
        for j, i in enumerate(ok):
            rows[i] = S[j].cpu()
    score_s = time.perf_counter() - t0
    out = []
    for i, info in enumerate(infos):
        d = info.to_dict()
        d.pop("seconds")
        # the block's wall time, shared equally: per-target cost of the batched run
        d.update(unlearn_seconds=unlearn_s / K, score_seconds=score_s / K, target=fps[i], block=K,
                 loss_null=run.loss_null)
        out.append(d)
    return rows, out


def result(run: Run, scores: torch.Tensor, infos: list, t_start: float) -> Attribution:
    from .ops import backends

    cfg, names = run.cfg, set(run.names)
    run.timings["total"] = time.perf_counter() - t_start
    meta = {
        "mucs_fast": __version__,
        "config": cfg.to_dict(),
        "resolved": {"t_sched_infer": cfg.t_sched_infer, "t_sched_train": cfg.t_sched_train,
                     "loss_null": run.loss_null, "lr": run.lr, "batch_size": cfg.B, "trainable": run.names,
                     "trainable_numel": sum(p.numel() for n, p in run.den.net.named_parameters() if n in names)},
        "fingerprints": {**run.fingerprints, "noise_bank": run.bank.fingerprint()},
        "targets": infos,
        "flagged": [k for k in range(run.K) if infos[k]["stop"] in ("nan", "cap")],
        "timings": run.timings,
        "device": str(run.device),
        "compiled": run.compiled,
        "backend": backends(),
        "torch": torch.__version__,
        "N": run.N, "K": run.K, "M": cfg.num_noises,
    }
    return Attribution(scores, run.ids, meta)


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
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir")
    net = getattr(den, "net", None)
    modes = [(m, m.training) for m in net.modules()] if isinstance(net, torch.nn.Module) else []
    run = None
    try:
        run = prepare(den, train, targets, cfg, train_labels, target_labels, train_ids, device, progress)
        if run_dir is not None:
            key = {"config": cfg.score_fields(), "model": run.fingerprints["model"],
                   "train": run.fingerprints["train"], "targets": run.fingerprints["targets"], "lr": run.lr}
            run.run_dir = RunDir(run_dir, key, resume)
        scores = torch.empty(run.K, run.N, dtype=torch.float32)
        infos: list = [None] * run.K
        todo = []
        for k in range(run.K):
            done = run.run_dir.load_target(k) if (run.run_dir is not None and resume) else None
            if done is not None:
                scores[k], infos[k] = done
            else:
                todo.append(k)
        resolve(run, need_loss_null=bool(todo))
        if not todo and run.loss_null is None:  # everything was resumed: report the L_null used
            run.loss_null = infos[0].get("loss_null")
        run.timings["unlearn"] = run.timings["score"] = 0.0
        if todo:
            compute_loss_t(run, cache_dir)
        Kb = cfg.targets_per_batch
        blocks = [todo[i:i + Kb] for i in range(0, len(todo), Kb)]
        for block in _bar(blocks, "targets", progress and len(blocks) > 1, unit="block"):
            rows, block_infos = run_block(run, block)
            for k, row, info in zip(block, rows, block_infos):
                run.timings["unlearn"] += info["unlearn_seconds"]
                run.timings["score"] += info["score_seconds"]
                scores[k], infos[k] = row, info
                if run.run_dir is not None:
                    run.run_dir.save_target(k, row, info)
        res = result(run, scores, infos, t_start)
        res.meta.update(meta or {})
        if run.run_dir is not None:
            res.save(run.run_dir.path, top_k=min(top_k, run.N))
        return res
    finally:
        if run is not None and run.run_dir is not None:
            run.run_dir.close()
        for m, training in modes:
            m.train(training)
