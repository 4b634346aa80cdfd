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

import contextlib
import copy
import dataclasses
import math
import os
import time
from typing import Optional

import torch

from ._io import derive_seed, key_digest, tensor_digest
from ._version import __version__
from .adaptive import LazyLossT, adaptive_scores, screen_noises
from .cache import LossCache
from .config import MUCSConfig
from .coverage import Writes, nan_tensor
from .data import Source, TensorSource, check_ids, open_source, source_digest
from .denoisers import Denoiser
from .functional import flat_views
from .noise import NoiseBank, estimate_t_sched
from .ops import backends
from .parallel import Group, Plan, join
from .params import trainable_names
from .result import Attribution
from .rundir import RunDir, load_loss_t_shard, save_loss_t_shard
from .score import (
    LossPass,
    images_per_forward,
    original_losses,
    resolve_precision,
    score_stacked,
    use_compile,
)
from .unlearn import RetainStream, check_loss_null, unlearn_batched


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
        raise ValueError(
            f"{name}: expected a 4-D tensor [N, C, H, W], got shape {tuple(x.shape)}{hint}"
        )
    if not torch.is_floating_point(x):
        raise ValueError(
            f"{name}: expected float images in the model's data range (e.g. [-1, 1]), "
            f"got dtype {x.dtype}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty (0 images)")
    if chw is not None and tuple(x.shape[1:]) != tuple(chw):
        raise ValueError(
            f"{name}: images are C×H×W = {'×'.join(map(str, x.shape[1:]))}, but the "
            f"training images are {'×'.join(map(str, chw))}"
        )
    bad = ~torch.isfinite(x)
    if bad.any():
        i = int(bad.reshape(x.shape[0], -1).any(1).nonzero()[0])
        raise ValueError(f"{name}: image {i} contains NaN or Inf ({int(bad.sum())} values in all)")
    # float32 is what the engine computes with, so fingerprints and seeds come from these values
    return x.float()


def _check_train(train) -> Source:
    """The training set as a Source — the one place a tensor becomes one: a float tensor is
    validated and wrapped (resident); a streamed source (a path to a .npy / .safetensors file or a
    packed folder, or a Source) gets its files checked and its values scanned for NaN/Inf (one
    streaming pass, shared with its fingerprint) before any compute."""
    if isinstance(train, TensorSource):
        return TensorSource(check_images("train", train.x), train.labels, train.ids)
    if isinstance(train, torch.Tensor):
        return TensorSource(check_images("train", train))
    if isinstance(train, (str, os.PathLike, Source)):
        src = open_source(train)
        src.check()
        src.check_finite("train")
        return src
    raise TypeError(
        f"train: expected a float tensor [N, C, H, W] or a streamed source (a .npy / .safetensors "
        f"file, a packed folder, a mucs_fast.data.Source), got {type(train).__name__}"
    )


def resolve_lr(cfg: MUCSConfig, den: Denoiser) -> float:
    if cfg.lr is not None:
        return float(cfg.lr)
    if den.train_lr is not None:
        return float(den.train_lr) / cfg.lr_factor
    raise ValueError(
        "MUCSConfig.lr is None and the model's training learning rate is unknown: pass "
        "MUCSConfig(lr=<training lr / 10>) (the reference uses 1e-5 for its CIFAR-10 DiT) "
        "or the denoiser's train_lr="
    )


def _probe(den: Denoiser, x: Source, y: Optional[torch.Tensor]) -> None:
    """One tiny forward: architecture/data mismatches fail here, with context, not mid-run."""
    device = next(den.net.parameters()).device
    x1 = x.take(torch.zeros(1, dtype=torch.int64), device)
    eps, level = den.training_noise(x1.shape, torch.Generator(device).manual_seed(0), None, device)
    try:
        with torch.no_grad():
            loss = den.loss(x1, eps, level, None if y is None else y[:1])
    except Exception as e:  # re-raised with what was fed in
        raise ValueError(
            f"the model cannot process the data (one image of shape {tuple(x.chw)}"
            f"{'' if y is None else f', labels {tuple(y.shape[1:])}'}): "
            f"{type(e).__name__}: {e}"
        ) from e
    if loss.shape != (1,):
        raise ValueError(
            f"the denoiser's loss must be one value per sample, got shape {tuple(loss.shape)}"
        )


# --------------------------------------------------------------------------------------------
# small functions of (denoiser, data, seed)
# --------------------------------------------------------------------------------------------
def _fork_rng(device: torch.device):
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def forward_rng(cfg: MUCSConfig, device: torch.device, *tags):
    """The global RNG seeded from (seed, tags) for one phase, the caller's state restored after.
    A model that draws random numbers in forward (the reference's conditional DiT draws a
    label-dropout mask even in eval mode) takes them from the global RNG: seeded per block of
    targets, a target's draws do not depend on the targets before it, nor on the caller's RNG."""
    with _fork_rng(device):
        torch.manual_seed(derive_seed(cfg.seed, "forward", *tags))
        yield


@torch.no_grad()
def estimate_loss_null(
    den: Denoiser, x: Source, y, cfg: MUCSConfig, device, progress=False
) -> float:
    """L_null = mean loss of a freshly initialized model over up to `loss_null_batches` retain
    batches (one epoch at most, as the reference's loop over its DataLoader), training noise."""
    with _fork_rng(device):
        torch.manual_seed(derive_seed(cfg.seed, "loss_null", "init"))
        net0 = den.fresh_net()
    net0 = net0.to(device).eval()
    B = cfg.B
    retain = RetainStream(
        len(x), B, torch.Generator().manual_seed(derive_seed(cfg.seed, "loss_null"))
    )
    gen = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "loss_null", "noise"))
    n_batches = min(cfg.loss_null_batches, len(x) // B)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in _bar(range(n_batches), "L_null", progress):
        idx = next(retain)  # CPU positions: a streamed source gathers them on the host
        xb = x.take(idx, device)
        eps, level = den.training_noise(xb.shape, gen, cfg.t_sched_train, device)
        total += (
            den.loss(xb, eps, level, None if y is None else y[idx.to(y.device)], net=net0)
            .double()
            .sum()
        )
    return float(total) / (n_batches * B)


def make_bank(den: Denoiser, chw, cfg: MUCSConfig, t_sched) -> NoiseBank:
    """The inference bank, drawn on the CPU from its own seed (so it is the same on every
    device)."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "bank"))
    level = den.inference_levels(cfg.num_noises, t_sched, generator=g)
    eps = torch.randn((cfg.num_noises, *chw), generator=g)
    return NoiseBank(eps, level.to(den.level_dtype))


def target_streams(cfg: MUCSConfig, target_fp: str, N: int, device):
    """Target-owned randomness: retain batches (CPU generator, like a DataLoader), training noise
    (on the device), and the seed of its independent inference noise
    (use_same_noise_infer=False)."""
    retain = RetainStream(
        N, cfg.B, torch.Generator().manual_seed(derive_seed(cfg.seed, "retain", target_fp))
    )
    noise = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "noise", target_fp))
    return retain, noise, derive_seed(cfg.seed, "infer", target_fp)


def _bar(it, desc, progress, total=None, unit="it"):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


class JobBar:
    """One progress bar for the whole job (rank 0): image·noise pairs of this rank's share of the
    L_t pass and of every block's scoring pass, with the phase and the unlearning losses beside
    it."""

    def __init__(self, total: int, enabled: bool, world: int):
        from tqdm.auto import tqdm

        desc = "mucs" if world == 1 else f"mucs (rank 0 of {world})"
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="pair",
            unit_scale=True,
            dynamic_ncols=True,
            disable=not enabled,
            leave=False,
        )

    def phase(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=True)

    def pairs(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------
# the run context
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """What the phases share. `den` is the engine's own view of the caller's denoiser (its net on
    the run's device); `cfg` has t_sched resolved; `x` is the training set (a Source: resident
    ones on the device, streamed ones read in chunks); `y`, `x_hat`, `y_hat` live on the device."""

    den: Denoiser
    cfg: MUCSConfig
    device: torch.device
    progress: bool
    x: Source
    y: Optional[torch.Tensor]
    ids: torch.Tensor
    x_hat: torch.Tensor
    y_hat: Optional[torch.Tensor]
    fingerprints: dict
    names: list
    lr: float
    group: Group = dataclasses.field(default_factory=Group)
    run_path: Optional[str] = (
        None  # the run directory (every rank knows it; rank 0 holds `run_dir`)
    )
    run_dir: Optional[RunDir] = None
    bar: Optional[JobBar] = None
    loss_null: Optional[float] = None
    bank: Optional[NoiseBank] = None
    loss_pass: Optional[LossPass] = None
    loss_t: Optional[torch.Tensor] = None
    compiled: bool = False
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def N(self) -> int:
        return len(self.x)

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
def prepare(
    den, train, targets, cfg, train_labels, target_labels, train_ids, device, progress
) -> Run:
    """Validate every input before any heavy compute; join the process group (torchrun); the
    device copies of the data."""
    if not isinstance(cfg, MUCSConfig):
        raise TypeError(f"config must be a MUCSConfig, got {type(cfg).__name__}")
    if not isinstance(den, Denoiser):
        raise TypeError(
            f"den must be an EDMDenoiser or DiffusersDenoiser, got {type(den).__name__}"
        )
    group, device = join(device)
    progress = progress and group.rank == 0  # one set of bars and logs per job
    train = _check_train(train)
    targets = check_images("targets", targets, train.chw)
    N, K = len(train), targets.shape[0]
    # a source may carry its own ids and labels (a packed folder)
    train_ids = train.ids if train_ids is None else train_ids
    if train_labels is None and den.conditional:
        train_labels = train.labels
    ids = (
        torch.arange(N, dtype=torch.int64)
        if train_ids is None
        else check_ids(train_ids, N, "train_ids")
    )
    y_train = den.prepare_labels(train_labels, N, "train_labels")
    y_targets = den.prepare_labels(target_labels, K, "target_labels")
    if cfg.adaptive_top_k is not None and cfg.adaptive_top_k > N:
        raise ValueError(f"adaptive_top_k={cfg.adaptive_top_k} exceeds the training set size N={N}")
    if cfg.B > N:
        raise ValueError(
            f"batch size B={cfg.B} (MUCSConfig.batch_size, default num_noises) exceeds the "
            f"training set size N={N}; pass MUCSConfig(batch_size=<= {N})"
        )
    lr = resolve_lr(cfg, den)
    names = trainable_names(den.net, cfg.frozen if cfg.frozen is not None else den.default_frozen())
    if cfg.loss_null == "auto" and den.fresh_net_error() is not None:
        raise ValueError(den.fresh_net_error())
    fingerprints = {
        "model": den.fingerprint(),
        # streamed or resident, the same digest of the same float32 values (run and cache keys)
        "train": source_digest(
            {
                "x": train,
                "y": y_train.cpu() if y_train is not None else torch.tensor([]),
                "ids": ids,
            }
        ),
        "targets": [
            tensor_digest(
                {
                    "x": targets[k],
                    "y": (
                        den.label_values(y_targets[k]).cpu()
                        if y_targets is not None
                        else torch.tensor([])
                    ),
                }
            )
            for k in range(K)
        ],
    }
    view = copy.copy(den)
    view.net = _engine_net(den.net, device)
    # resident: on the device once; streamed: read in chunks, never whole
    x = TensorSource(train.x.to(device)) if isinstance(train, TensorSource) else train
    run = Run(
        den=view,
        cfg=copy.copy(cfg),
        device=device,
        progress=progress,
        x=x,
        y=None if y_train is None else y_train.to(device),
        ids=ids,
        x_hat=targets.to(device),
        y_hat=None if y_targets is None else y_targets.to(device),
        fingerprints=fingerprints,
        names=names,
        lr=lr,
        group=group,
    )
    view.net.eval()
    with forward_rng(cfg, device, "probe"):
        _probe(view, run.x, run.y)
    return run


def resolve(run: Run, need_loss_null: bool) -> None:
    """t_sched "auto", L_null (when there is unlearning left to do), the bank and the loss pass."""
    cfg, den, device = run.cfg, run.den, run.device
    t0 = time.perf_counter()
    if "auto" in (cfg.t_sched_infer, cfg.t_sched_train):
        full = den.sigma_of(den.full_grid(cfg.num_noises).to(device))
        t_auto = estimate_t_sched(
            run.x, full, cfg.B, torch.Generator().manual_seed(derive_seed(cfg.seed, "t_sched"))
        )
        cfg.t_sched_infer = t_auto if cfg.t_sched_infer == "auto" else cfg.t_sched_infer
        cfg.t_sched_train = t_auto if cfg.t_sched_train == "auto" else cfg.t_sched_train
    if cfg.loss_null != "auto":
        run.loss_null = float(cfg.loss_null)
    elif need_loss_null:  # rank 0's value on every rank: identical stopping everywhere
        value = (
            estimate_loss_null(den, run.x, run.y, cfg, device, run.progress)
            if run.group.rank == 0
            else None
        )
        run.loss_null = check_loss_null(run.group.broadcast_object(value, 0))
    run.bank = make_bank(den, run.x.chw, cfg, cfg.t_sched_infer).to(device)
    run.compiled = use_compile(cfg.compile, run.N * run.bank.M)
    run.loss_pass = LossPass(
        den,
        den.net,
        run.names,
        run.bank,
        precision=cfg.precision,
        compile=run.compiled,
        images_per_forward=images_per_forward(cfg.score_batch, run.bank.M, device),
        N=run.N,
    )
    run.timings["setup"] = time.perf_counter() - t0


def compute_loss_t(run: Run, plan: Plan, cache_dir) -> None:
    """L_t [N, M] through the run's loss pass (the callable that scores the unlearned copies):
    from the cache when an entry for exactly this evaluation exists, else each rank its shards
    (persisted per shard in the run directory, so an interrupted pass resumes), combined."""

    cfg, lp, g = run.cfg, run.loss_pass, run.group
    t0 = time.perf_counter()
    cache = LossCache(cache_dir if g.rank == 0 else None)
    key = key_digest(
        run.fingerprints["model"],
        run.fingerprints["train"],
        run.bank.fingerprint(),
        cfg.use_same_noise_infer,
        cfg.precision,
        run.device.type,
        cfg.seed,
        run.names,
        {
            "compiled": run.compiled,
            "mode": lp.mode,
            "per": lp.images_per_forward,
            "backend": backends(),
            "mucs_fast": __version__,
            "torch": torch.__version__,
        },
    )
    loss_t = cache.get(key) if g.rank == 0 else None
    cached = g.broadcast_object(loss_t is not None, 0)
    run.timings["loss_t_cached"] = cached
    if cached:
        loss_t = g.broadcast(loss_t if g.rank == 0 else torch.empty(run.N, run.bank.M), 0)
        run.bar.pairs(
            sum(plan.shards[i][1] - plan.shards[i][0] for i in plan.my_shards()) * run.bank.M
        )
    else:
        seed = None if cfg.use_same_noise_infer else derive_seed(cfg.seed, "infer", "original")
        # zeros outside this rank's shards (the sum over ranks fills them); the writes prove it
        loss_t = torch.zeros(run.N, run.bank.M, dtype=torch.float32, device=run.device)
        writes = Writes(run.N, "L_t")
        run.bar.phase("L_t (original model)")
        for i in plan.my_shards():
            s0, s1 = plan.shards[i]
            part = (
                None
                if run.run_path is None
                else load_loss_t_shard(run.run_path, i, key, (s1 - s0, run.bank.M))
            )
            if part is None:
                with forward_rng(cfg, run.device, "loss_t", i):  # per shard: any world size
                    part = original_losses(
                        lp, run.x, run.y, run.ids, infer_seed=seed, start=s0, stop=s1
                    )
                if run.run_path is not None:
                    save_loss_t_shard(run.run_path, i, key, part)
            loss_t[s0:s1] = part.to(run.device)
            writes.mark(s0, s1)
            run.bar.pairs((s1 - s0) * run.bank.M)
        g.sum_(loss_t)
        g.sum_(writes.count)
        writes.require_full()
        if g.rank == 0:
            cache.put(key, loss_t)
    run.loss_t = loss_t.to(run.device)
    run.timings["loss_t"] = time.perf_counter() - t0


def unlearn_block(run: Run, block: list) -> tuple[torch.Tensor, list]:
    """Targets `block` (indices into the run's targets): K copies unlearned together (one vmapped
    step for all still running). Returns (trainable weights of the K copies, flat [K, P]; infos)."""
    cfg, den, K = run.cfg, run.den, len(block)
    fps = [run.fingerprints["targets"][k] for k in block]
    streams = [target_streams(cfg, fp, run.N, run.device) for fp in fps]
    cap = cfg.max_steps if cfg.max_steps is not None else cfg.safety_steps
    t0 = time.perf_counter()
    goal = (1 - cfg.tolerance) * run.loss_null

    def show(infos, active):
        run.bar.phase(
            f"unlearn ×{K}: step {max(i.steps for i in infos)}/{cap}, {len(active)} running, "
            f"L_f {' '.join(f'{i.loss_f:.3f}' for i in infos)} → {goal:.3f}"
        )

    with forward_rng(cfg, run.device, "unlearn", *fps):
        weights, infos = unlearn_batched(
            den,
            den.net,
            run.names,
            run.x,
            run.y,
            run.x_hat[block],
            None if run.y_hat is None else run.y_hat[block],
            cfg=cfg,
            loss_null=run.loss_null,
            lr=run.lr,
            retains=[r for r, _, _ in streams],
            generators=[g for _, g, _ in streams],
            progress=show if run.progress else None,
        )
    seconds = time.perf_counter() - t0
    out = []
    for i, info in enumerate(infos):
        d = info.to_dict()
        d.pop("seconds")
        # the block's wall time, shared equally: per-target cost of the batched run
        d.update(
            unlearn_seconds=seconds / K,
            target=fps[i],
            block=K,
            loss_null=run.loss_null,
            infer_seed=streams[i][2],
        )
        out.append(d)
    return torch.cat([w.reshape(K, -1) for w in weights.values()], 1), out


def score_block(run: Run, plan: Plan, W: torch.Tensor, infos: list) -> tuple[list, list]:
    """(score rows [N], exact rows [N] bool) (CPU) of the copies with trainable weights W [K, P]:
    this rank scores its shards, the ranks' rows are combined; a copy whose unlearning diverged
    gets NaN (and no exact score). Exact scoring: every score is exact; adaptive: see
    adaptive.py."""
    cfg, N = run.cfg, run.N
    t0 = time.perf_counter()
    ok = [i for i, info in enumerate(infos) if info["stop"] != "nan"]
    S = torch.zeros(len(ok), N, dtype=torch.float32, device=run.device)  # summed over ranks
    E = torch.ones(len(ok), N, dtype=torch.bool)
    writes = Writes(N, f"scores of targets {[infos[i]['target'][:8] for i in ok]}")
    if ok:
        params = dict(run.den.net.named_parameters())
        weights = flat_views(W[ok], {n: tuple(params[n].shape) for n in run.names})
    if ok and cfg.adaptive_top_k is not None:
        run.bar.phase(f"score ×{len(ok)} (adaptive, top {cfg.adaptive_top_k})")
        S, E, ainfos = adaptive_scores(
            run.loss_pass,
            run.loss_t,
            weights,
            run.x,
            run.y,
            N=N,
            cfg=cfg,
            target_fps=[infos[i]["target"] for i in ok],
            group=run.group,
            progress=run.bar.pairs,
        )
        for j, i in enumerate(ok):
            infos[i]["adaptive"] = ainfos[j]
    elif ok:
        seeds = None if cfg.use_same_noise_infer else [infos[i]["infer_seed"] for i in ok]
        run.bar.phase(f"score ×{len(ok)}")
        for i in plan.my_shards():
            s0, s1 = plan.shards[i]
            with forward_rng(cfg, run.device, "score", i, *(infos[j]["target"] for j in ok)):
                S[:, s0:s1] = score_stacked(
                    run.loss_pass,
                    weights,
                    run.x,
                    run.y,
                    run.ids,
                    run.loss_t,
                    eps=cfg.eps,
                    use_loss_ratio=cfg.use_loss_ratio,
                    use_same_noise_infer=cfg.use_same_noise_infer,
                    infer_seeds=seeds,
                    start=s0,
                    stop=s1,
                )
            writes.mark(s0, s1)
            run.bar.pairs((s1 - s0) * run.bank.M * len(ok))
        run.group.sum_(S)
        run.group.sum_(writes.count)
        writes.require_full()
    rows = [torch.full((N,), math.nan) for _ in infos]
    exact = [torch.zeros(N, dtype=torch.bool) for _ in infos]
    for j, i in enumerate(ok):
        rows[i], exact[i] = S[j].cpu(), E[j].cpu()
    seconds = time.perf_counter() - t0
    for i, info in enumerate(infos):
        info["score_seconds"] = seconds / len(infos)
        info["pairs_evaluated"] = (
            0
            if i not in ok
            else info["adaptive"]["pairs_evaluated"]
            if cfg.adaptive_top_k is not None
            else N * cfg.num_noises
        )
    return rows, exact


def run_blocks(run: Run, plan: Plan, on_done) -> None:
    """Every block of the plan, in rounds of one block per rank: rank r unlearns the round's r-th
    block, each block's weights go from its owner to every rank, every rank scores its shards.
    `on_done(block, (rows, exact), infos)` is called on every rank as each block completes."""
    g = run.group
    P = sum(p.numel() for n, p in run.den.net.named_parameters() if n in set(run.names))
    for rnd in plan.rounds():
        owned = {b: unlearn_block(run, plan.blocks[b]) for b, owner in rnd if owner == g.rank}
        for b, owner in rnd:
            W, infos = owned.get(b, (None, None))
            if g.distributed:
                if W is None:
                    W = torch.empty(len(plan.blocks[b]), P, device=run.device)
                W = g.broadcast(W.contiguous(), owner)
                infos = g.broadcast_object(infos, owner)
            on_done(plan.blocks[b], score_block(run, plan, W, infos), infos)


def result(
    run: Run, scores: torch.Tensor, exact: torch.Tensor, infos: list, t_start: float
) -> Attribution:

    cfg, names = run.cfg, set(run.names)
    run.timings["total"] = time.perf_counter() - t_start
    meta = {
        "mucs_fast": __version__,
        "config": cfg.to_dict(),
        "resolved": {
            "t_sched_infer": cfg.t_sched_infer,
            "t_sched_train": cfg.t_sched_train,
            "loss_null": run.loss_null,
            "lr": run.lr,
            "batch_size": cfg.B,
            "trainable": run.names,
            "trainable_numel": sum(
                p.numel() for n, p in run.den.net.named_parameters() if n in names
            ),
        },
        "fingerprints": {**run.fingerprints, "noise_bank": run.bank.fingerprint()},
        "targets": infos,
        "flagged": [k for k in range(run.K) if infos[k]["stop"] in ("nan", "cap")],
        "timings": run.timings,
        "device": str(run.device),
        "compiled": run.compiled,
        "backend": backends(),
        "torch": torch.__version__,
        "N": run.N,
        "K": run.K,
        "M": cfg.num_noises,
        "world_size": run.group.world,
        # image·noise forwards: of each target's unlearned model, and of the original model (this
        # run's: 0 when L_t came from the cache or every target was resumed)
        "pairs_evaluated": [
            i.get("pairs_evaluated", 0 if i["stop"] == "nan" else run.N * cfg.num_noises)
            for i in infos
        ],
        "pairs_evaluated_original": (
            getattr(run.loss_t, "pairs", 0)
            if cfg.adaptive_top_k is not None
            else 0
            if run.timings.get("loss_t_cached", True)
            else run.N * cfg.num_noises
        ),
    }
    if cfg.adaptive_top_k is not None:
        meta["adaptive"] = {
            "top_k": cfg.adaptive_top_k,
            "margin": cfg.adaptive_margin,
            "audit": cfg.adaptive_audit,
            "screen_noises": screen_noises(cfg.num_noises, cfg.adaptive_screen_noises),
            "targets": [i.get("adaptive") for i in infos],
        }
    return Attribution(scores, run.ids, meta, exact=exact)


# --------------------------------------------------------------------------------------------
# attribute
# --------------------------------------------------------------------------------------------
def attribute(
    den: Denoiser,
    train: torch.Tensor,
    targets: torch.Tensor,
    config: Optional[MUCSConfig] = None,
    train_labels=None,
    target_labels=None,
    train_ids=None,
    device=None,
    progress: bool = True,
    run_dir=None,
    resume: bool = False,
    cache_dir="auto",
    top_k: int = 100,
    meta: Optional[dict] = None,
) -> Attribution:
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
        run = prepare(
            den, train, targets, cfg, train_labels, target_labels, train_ids, device, progress
        )
        run.run_path = None if run_dir is None else os.fspath(run_dir)
        scores = nan_tensor(run.K, run.N)
        exact = torch.ones(run.K, run.N, dtype=torch.bool)
        infos: list = [None] * run.K
        target_rows = Writes(
            run.K, "targets"
        )  # a target's row: resumed, scored, or NaN when it diverged
        done = {}
        if (
            run.group.rank == 0 and run_dir is not None
        ):  # one writer per job: rank 0 holds the folder
            # what the rows of a run depend on: a resume with any of it changed would mix rows
            key = {
                "config": cfg.score_fields(),
                "model": run.fingerprints["model"],
                "train": run.fingerprints["train"],
                "targets": run.fingerprints["targets"],
                "lr": run.lr,
                "mucs_fast": __version__,
                "backend": backends(),
                "device": run.device.type,
                "precision": resolve_precision(run.device, cfg.precision),
            }
            run.run_dir = RunDir(run_dir, key, resume)
            for k in range(run.K) if resume else ():
                hit = run.run_dir.load_target(k)
                if hit is not None:
                    done[k] = hit
        done = run.group.broadcast_object(done, 0)  # also the barrier after the folder is set up
        for k, (row, info, row_exact) in done.items():
            scores[k], infos[k], exact[k] = row, info, row_exact
            target_rows.mark(k, k + 1)
        todo = [k for k in range(run.K) if k not in done]
        resolve(run, need_loss_null=bool(todo))
        if not todo and run.loss_null is None:  # everything was resumed: report the L_null used
            run.loss_null = infos[0].get("loss_null")
        run.timings["unlearn"] = run.timings["score"] = 0.0
        plan = Plan.make(
            run.N, run.loss_pass.images_per_forward, todo, cfg.targets_per_batch, run.group
        )
        my_pairs = sum(plan.shards[i][1] - plan.shards[i][0] for i in plan.my_shards()) * run.bank.M
        run.bar = JobBar(my_pairs * (len(todo) + 1) if todo else 0, run.progress, run.group.world)
        if todo and cfg.adaptive_top_k is not None:  # L_t on demand, pair by pair (adaptive.py)
            run.loss_t = LazyLossT(
                run.N,
                math.ceil(run.bank.M / screen_noises(run.bank.M, cfg.adaptive_screen_noises)),
                run.bank.M,
                run.device,
            )
        elif todo:
            compute_loss_t(run, plan, cache_dir)

        def on_done(block, rows, block_infos):
            for k, row, row_exact, info in zip(block, *rows, block_infos):
                run.timings["unlearn"] += info["unlearn_seconds"]
                run.timings["score"] += info["score_seconds"]
                scores[k], exact[k], infos[k] = row, row_exact, info
                target_rows.mark(k, k + 1)
                if run.run_dir is not None:
                    run.run_dir.save_target(k, row, info, row_exact)

        run_blocks(run, plan, on_done)
        target_rows.require_full()
        res = result(run, scores, exact, infos, t_start)
        res.meta.update(meta or {})
        if run.run_dir is not None:  # rank 0 only
            res.save(run.run_dir.path, top_k=min(top_k, run.N))
        return res
    finally:
        if run is not None and run.bar is not None:
            run.bar.close()
        if run is not None and run.run_dir is not None:
            run.run_dir.close()
        for m, training in modes:
            m.train(training)
