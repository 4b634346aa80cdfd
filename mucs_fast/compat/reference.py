"""Drop-in replacement for the reference implementation's `attribution/mucs.py::Attributor`.

In a checkout of the reference (github sony/mucs), a file `attribution/mucs_fast.py` holding

    from mucs_fast.compat.reference import Attributor

makes `python attrib.py --method=mucs_fast ...` and `python pipeline.py ... --attrib=mucs_fast` use
mucs_fast. Constructor, side effects and public methods are the reference's; `run()` executes on
the mucs_fast engine (`mucs_fast.attribute`): training data loaded once and kept on the device, K
targets unlearned together (torch.func) and scored in one pass over the data, no DataLoader workers.

Results follow the reference's semantics (σ grids, trainable set, AdamW from the training config
with lr / lr_factor, the bound and stop rule, bf16 autocast scoring on CUDA, the score formula).
What differs is where the randomness comes from. The reference draws everything from one global
stream seeded by `fabric.seed_everything(seed)`: DataLoader shuffles, the null model's
initialization, the null-loss noise, the inference bank and every unlearning step's noise, in
program order. The engine (default, `fast=True`) gives each its own generator, derived from `seed`:
- inference bank: one CPU generator (ε [M, C, H, W]; the σ grid itself is deterministic);
- L_null: the fresh model's initialization, its retain batches and its noise, one stream each;
- each target: its retain-batch order (CPU) and its training noise (on the device), seeded by
  `seed` and the target's content — a target's scores do not depend on the other targets, their
  order, the batching (K) or the number of processes;
- t_sched="auto": the shuffle of the distance estimate;
- use_same_noise_infer=False: each model's own ε per image (the σ levels of the bank).
So end-to-end scores differ from the reference's as a run with another seed does; the inference
losses for a given noise bank are the same numbers. `fast=False` runs the reference's own
algorithm on the resident data, drawing from the global stream in the reference's order (each
DataLoader iterator's seed draws included), for bit-for-bit comparisons with it.

Fixed reference defects (defaults otherwise unchanged): t_sched_*="auto" works; max_steps=None
stops at `safety_steps` (warned, reported) instead of possibly looping forever; with several
processes (torch.distributed initialized, world size > 1) targets are split across ranks and every
rank returns the full result (the reference scores only each rank's shard); omegaconf objects in
checkpoints load with weights_only=True (`load_checkpoint`, `omegaconf_safe_globals`).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from ..config import REFERENCE_FROZEN, MUCSConfig
from ..score import autocast_for, score_batch_images, skew_scores
from ..unlearn import stop_reason
from .reference_files import (  # noqa: F401  (re-exported: the drop-in's file helpers)
    ReferenceData,
    Samples,
    attrib_ids_all_path,
    center_crop,
    install_omegaconf_safe_globals,
    load_attrib_ids,
    load_checkpoint,
    load_dataset,
    load_files,
    load_metadata,
    load_samples,
    omegaconf_globals,
    omegaconf_safe_globals,
    save_attrib_ids,
    save_dataset,
    save_samples,
    to_model_range,
)

_FROZEN_DEFAULT = list(REFERENCE_FROZEN)  # the reference's default list (never mutated)
DEFAULT_TARGETS_PER_BATCH = 8


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def raw_module(model) -> torch.nn.Module:
    """The plain nn.Module behind a Lightning-Fabric (or DDP) wrapper; the module itself otherwise."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def distributed() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed group, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


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


class ResidentLoader:
    """Batches (idx, x, y) of in-memory tensors, standing in for the reference's DataLoaders.

    It consumes the global RNG exactly as `torch.utils.data.DataLoader(shuffle=..., generator=None)`
    does: one int64 draw per iterator (the workers' base seed) and, when shuffling, one more that
    seeds the sampler's private generator for the permutation. Only `.dataset` of the original
    loader is kept (the reference's null model reads `dl.dataset.meta`)."""

    def __init__(
        self, dataset, ids, x, y, batch_size: int, shuffle: bool, drop_last: bool, device=None
    ):
        self.dataset = dataset
        self.ids, self.x, self.y = ids, x, y
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.device = device

    def __len__(self) -> int:
        N = self.x.shape[0]
        return N // self.batch_size if self.drop_last else -(-N // self.batch_size)

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_()  # DataLoader iterator: workers' base seed
        return self._batches()

    def _batches(self):
        N = self.x.shape[0]
        if self.shuffle:  # RandomSampler without a generator: seeded from the global RNG
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        else:
            order = None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, min(N, (b + 1) * self.batch_size))
            p = order[sl] if order is not None else sl
            batch = (self.ids[p], self.x[p], self.y[p])
            yield tuple(t.to(self.device) for t in batch) if self.device is not None else batch


def dataset_tensors(ds, threads: int = 8) -> ReferenceData:
    """All items of a map-style dataset as tensors (ids, x, y), read once.

    The reference's own dataset class (files listed in `.filenames`, `.meta`, no augmentation,
    no z-normalization) is read straight from its files with a thread pool; any other dataset is
    indexed item by item (threads too: `threads=1` for datasets that are not thread-safe)."""
    fns = getattr(ds, "filenames", None)
    if (
        isinstance(fns, list)
        and isinstance(getattr(ds, "meta", None), dict)
        and not getattr(ds, "znorm", False)
        and not getattr(ds, "augment", False)
        and fns
        and all(isinstance(f, str) for f in fns[:1])
        and os.path.isfile(fns[0])
    ):
        return load_files(fns, threads)
    n = len(ds)
    if n == 0:
        raise ValueError("the training dataset is empty")

    def get(i):
        item = ds[i]
        return item[0], item[1], item[2]

    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            items = list(pool.map(get, range(n), chunksize=64))
    else:
        items = [get(i) for i in range(n)]
    ids = torch.as_tensor([int(i) for i, _, _ in items], dtype=torch.int64)
    x = torch.stack([torch.as_tensor(x) for _, x, _ in items]).float()
    y = torch.stack([torch.as_tensor(y) for _, _, y in items])
    return ReferenceData(ids, x, y.float() if torch.is_floating_point(y) else y)


def get_topk(topk: int, all_idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Dataset ids [Ng, k] by descending score (ties: dataset order)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :topk]
    return all_idx.to(order.device)[order]


def _probe_batched(den, names, x, y) -> str | None:
    """None when the engine's batched (vmapped) unlearning runs on this model, else the error.

    A forward and backward for two stacked copies of two images (expanded views: no weight copy).
    Models whose forward calls a random function (e.g. the reference's conditional embedders draw
    a dropout mask even when its probability is 0) cannot be vmapped."""
    from ..functional import StackedNet

    params = dict(den.net.named_parameters())
    w = {n: params[n].detach().unsqueeze(0).expand(2, *params[n].shape) for n in names}
    w[names[0]] = w[names[0]].clone().requires_grad_(True)
    n = min(2, x.shape[0])
    xb = x[:n].unsqueeze(0).expand(2, *x[:n].shape)
    g = torch.Generator().manual_seed(0)
    eps, sigma = den.training_noise(x[:n].shape, g)
    yb = None if y is None else y[:n].unsqueeze(0).expand(2, *y[:n].shape)
    try:
        stack = StackedNet(den.net, w)
        L = stack.loss(den, xb, eps.expand(2, *eps.shape), sigma.expand(2, n), yb)
        torch.autograd.grad(L.sum(), [w[names[0]]])
    except Exception as e:  # noqa: BLE001  (any failure: run the targets one at a time)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def load_reference_model(checkpoint, code_dir=None, metadata=None, which: str = "ema"):
    """An EDMDenoiser for one of the reference's checkpoints: `configuration.yaml` beside it names
    `models.<conf.model.name>.Model(conf.model, metadata)`, imported from the reference checkout
    `code_dir` (default: already importable); weights `which` ("ema", else "model") of the
    checkpoint, read with `load_checkpoint` (omegaconf-safe, weights_only=True). The denoiser knows
    the sampler's σ range, the training lr (unlearning lr = lr / 10) and how to build a fresh model."""
    import sys

    from ..denoisers import EDMDenoiser

    fn = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "configuration.yaml")
    if not os.path.isfile(fn):
        raise FileNotFoundError(
            f"{checkpoint}: no configuration.yaml beside it (a reference run folder has one)"
        )
    try:
        from omegaconf import OmegaConf
    except ImportError as e:
        raise ImportError(
            "reading a reference checkpoint needs omegaconf (the reference's dependency): "
            "pip install omegaconf"
        ) from e
    conf = OmegaConf.load(fn)
    if code_dir is not None and os.path.abspath(code_dir) not in sys.path:
        sys.path.insert(0, os.path.abspath(code_dir))
    if metadata is None:
        raise ValueError(
            "load_reference_model: the dataset metadata (metadata.pt) is needed to build the model"
        )
    Model = importlib.import_module("models." + conf.model.name).Model
    net = Model(conf.model, metadata)
    state = load_checkpoint(checkpoint)
    sd = state.get(which) if isinstance(state, dict) else None
    if sd is None:
        sd = state["model"]
    sd = {k.removeprefix("_forward_module.").removeprefix("module."): v for k, v in sd.items()}
    net.load_state_dict(sd)
    net.eval()
    sm = conf.model.sampler
    return EDMDenoiser(
        net,
        sigma_min=float(sm.sigma_min),
        sigma_max=float(sm.sigma_max),
        rho=float(sm.rho),
        train_lr=float(conf.training.optim.lr),
        null_factory=lambda: Model(conf.model, metadata),
    )


# --------------------------------------------------------------------------------------------
# Attributor
# --------------------------------------------------------------------------------------------
class Attributor:
    """The reference's MUCS Attributor, run by mucs_fast.

    Reference arguments (same names, defaults and order) come first. Acceleration options,
    keyword-only:
      fast=True             run() on the mucs_fast engine; False: the reference's algorithm and
                            global RNG stream on resident data (also used for use_aug,
                            use_instance_weights and non-Adam optimizers, which the engine lacks)
      targets_per_batch=8   K targets unlearned and scored together (1 = one at a time; models
                            that cannot be vmapped fall back to 1, with a warning)
      score_batch=None      image·noise pairs per scoring forward (None: engine default)
      safety_steps=1000     cap on unlearning steps when max_steps=None (warned when hit)
      cache_dir=None        cache of the original model's losses (e.g. "auto"); rank 0 only
      run_dir=None, resume=False   persist per-target results / continue an interrupted run
      precision="auto"      scoring precision ("auto": bf16 autocast on CUDA, fp32 elsewhere)
      compile="auto"        torch.compile the scoring passes (MUCSConfig.compile)
      load_threads=8        threads that read the training set once
      progress=None         progress bars (None: on global rank zero)
    """

    def __init__(
        self,
        conf,
        fabric,
        model,
        method_path,
        device="cpu",
        seed=45,
        batch_size=None,
        num_noises=100,
        lr_factor=10,
        lamb=0.2,
        loss_null="auto",
        tolerance=0.05,
        max_steps=None,
        frozen_params=_FROZEN_DEFAULT,
        use_aug=False,
        use_same_noise_train=False,
        use_same_noise_infer=True,
        use_instance_weights=False,
        t_sched_train=None,
        t_sched_infer=0.7,
        use_loss_ratio=True,
        eps=1e-3,
        *,
        fast=True,
        targets_per_batch=DEFAULT_TARGETS_PER_BATCH,
        score_batch=None,
        safety_steps=1000,
        cache_dir=None,
        run_dir=None,
        resume=False,
        precision="auto",
        compile="auto",
        load_threads=8,
        progress=None,
    ):
        self.conf = conf
        self.fabric = fabric
        self.model = model.cpu()
        self.method_path = method_path
        self.device = device

        self.batch_size = num_noises if batch_size is None else batch_size
        self.num_noises = num_noises
        self.conf.training.optim.lr /= lr_factor
        self.lamb = lamb
        self.loss_null = loss_null
        self.tol = tolerance
        self.max_steps = max_steps
        self.frozen_params = list(frozen_params)
        self.use_aug = use_aug
        self.use_same_noise_train = use_same_noise_train
        self.use_same_noise_infer = use_same_noise_infer
        self.use_instance_weights = use_instance_weights
        self.t_sched_train = t_sched_train
        self.t_sched_infer = t_sched_infer
        self.use_loss_ratio = use_loss_ratio
        self.eps = eps
        self.seed = seed

        self.fast = fast
        self.targets_per_batch = int(targets_per_batch)
        self.score_batch = score_batch
        self.safety_steps = int(safety_steps)
        self.cache_dir = cache_dir
        self.run_dir = run_dir
        self.resume = resume
        self.precision = precision
        self.compile = compile
        self.load_threads = int(load_threads)
        self.progress = (
            bool(getattr(fabric, "is_global_zero", True)) if progress is None else bool(progress)
        )
        self.last_result = None  # the engine's Attribution of the last run() (meta: steps, timings)
        self._data = None

        assert self.device == self.fabric.device
        if self.use_aug:
            self.augment = importlib.import_module("lib.augment").Augmentations(
                self.conf.augmentation
            )
        if self.use_instance_weights:
            metrics = importlib.import_module("lib.image_metrics").ImageMetrics(
                which="dino", device=self.device
            )
            self.image_sim_calc = lambda x1, x2: metrics.calc("dino", x1, x2)
        self.fabric.seed_everything(seed, workers=True)

    # ----------------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return raw_module(self.model)

    @property
    def _dev(self) -> torch.device:
        return torch.device(self.device)

    def _sampler_conf(self):
        s = getattr(getattr(getattr(self.conf, "model", None), "sampler", None), "sigma_min", None)
        if s is None:
            return 0.002, 80.0, 7.0
        sm = self.conf.model.sampler
        return float(sm.sigma_min), float(sm.sigma_max), float(sm.rho)

    def _train_data(self, dataset) -> ReferenceData:
        """The training set as tensors, read once per dataset object."""
        if self._data is None or self._data[0] is not dataset or self._data[1] != len(dataset):
            self._data = (dataset, len(dataset), dataset_tensors(dataset, self.load_threads))
        return self._data[2]

    # -- the fresh model for loss_null="auto" --------------------------------------------------
    def _null_config_path(self) -> str:
        path = "--".join(str(self.method_path).split("--")[:-1] + ["pre"])
        return os.path.join(path, "configuration.yaml")

    def _null_model_error(self) -> str | None:
        if os.path.isfile(self._null_config_path()) or isinstance(
            getattr(self.module, "args", None), tuple
        ):
            return None
        return (
            f'loss_null="auto" needs a freshly initialized model: no {self._null_config_path()} (the '
            f"reference's '<method_path with its last --part replaced by pre>/configuration.yaml') and "
            f"{type(self.module).__name__} has no `args` tuple to rebuild it from; pass loss_null=<number>"
        )

    def build_null_model(self, dataset=None) -> torch.nn.Module:
        """A freshly initialized model of the same architecture, as the reference builds it:
        `models.<conf.model.name>.Model(conf.model, dataset.meta)` with the configuration.yaml of the
        '...--pre' run folder, imported from the user's checkout; without that file,
        `type(module)(*module.args)` (the reference's models keep `args = (conf, metadata)`)."""
        fn = self._null_config_path()
        if os.path.isfile(fn):
            try:
                from omegaconf import OmegaConf
            except ImportError as e:
                raise ImportError(
                    f"loss_null='auto' reads {fn}, which needs omegaconf (the reference's "
                    "dependency): pip install omegaconf"
                ) from e
            conf = OmegaConf.load(fn)
            meta = getattr(dataset, "meta", None)
            if meta is None:
                raise ValueError(
                    f"loss_null='auto': the training dataset has no `meta` (needed by "
                    f"models.{conf.model.name}.Model); pass loss_null=<number>"
                )
            return importlib.import_module("models." + conf.model.name).Model(conf.model, meta)
        args = getattr(self.module, "args", None)
        if isinstance(args, tuple):
            return type(self.module)(*copy.deepcopy(args))
        raise ValueError(self._null_model_error())

    # -- engine pieces ---------------------------------------------------------------------------
    def denoiser(self, dataset=None):
        """The engine's view of the model: an EDMDenoiser with the sampler's σ range."""
        from ..denoisers import EDMDenoiser

        sigma_min, sigma_max, rho = self._sampler_conf()
        return EDMDenoiser(
            self.module,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            null_factory=lambda: self.build_null_model(dataset),
        )

    def config(self, targets_per_batch: int | None = None, loss_null=None) -> MUCSConfig:
        """The MUCSConfig equivalent of this Attributor (raises NotImplementedError for the
        options only the reference algorithm path runs)."""
        if self.use_aug or self.use_instance_weights:
            raise NotImplementedError("use_aug / use_instance_weights")
        betas, wd = optimizer_spec(self.conf.training.optim)
        return MUCSConfig(
            num_noises=self.num_noises,
            t_sched_infer=self.t_sched_infer,
            t_sched_train=self.t_sched_train,
            lamb=self.lamb,
            tolerance=self.tol,
            lr=float(self.conf.training.optim.lr),
            weight_decay=wd,
            betas=betas,
            loss_null=self.loss_null if loss_null is None else loss_null,
            max_steps=self.max_steps,
            safety_steps=self.safety_steps,
            batch_size=self.batch_size,
            use_loss_ratio=self.use_loss_ratio,
            use_same_noise_infer=self.use_same_noise_infer,
            use_same_noise_train=self.use_same_noise_train,
            eps=self.eps,
            frozen=tuple(self.frozen_params),
            seed=self.seed,
            precision=self.precision,
            compile=self.compile,
            targets_per_batch=self.targets_per_batch
            if targets_per_batch is None
            else targets_per_batch,
            score_batch=self.score_batch,
        )

    ###########################################################################

    def run(self, dl_train, xgen, ygen, extra, top_k_attrib):
        """(top ids [Ng, k], all ids [Nt] in dataset order, scores [Ng, Nt]) on self.device."""
        dataset = dl_train.dataset
        if self.loss_null == "auto" and self._null_model_error() is not None:
            raise ValueError(self._null_model_error())
        try:
            cfg = self.config()
        except NotImplementedError as e:
            if self.fast:
                warnings.warn(
                    f"mucs_fast: {e} is not supported by the engine; running the reference "
                    "algorithm (fast=False)",
                    stacklevel=2,
                )
            cfg = None
        data = self._train_data(dataset)
        if cfg is None or not self.fast:
            return self._run_reference(dataset, data, xgen, ygen, top_k_attrib)
        return self._run_engine(dataset, data, cfg, xgen, ygen, top_k_attrib)

    def _run_engine(self, dataset, data, cfg, xgen, ygen, top_k):
        from ..engine import attribute, estimate_loss_null
        from ..params import trainable_names

        den = self.denoiser(dataset)
        ids, x, y = data
        xgen = xgen.detach().float().cpu()
        ygen = None if ygen is None else ygen.detach().cpu()
        y_train = den.prepare_labels(y, x.shape[0], "dataset labels")
        if cfg.targets_per_batch > 1 and xgen.shape[0] > 1:
            err = _probe_batched(den, trainable_names(den.net, cfg.frozen), x, y_train)
            if err is not None:
                warnings.warn(
                    f"mucs_fast: this model cannot be unlearned K targets at a time ({err}); "
                    "running targets one at a time (targets_per_batch=1)",
                    stacklevel=3,
                )
                cfg = copy.copy(cfg)
                cfg.targets_per_batch = 1
        rank, world = distributed()
        K = xgen.shape[0]
        if world > 1 and cfg.loss_null == "auto" and cfg.t_sched_train != "auto":
            # one L_null for every rank (rank 0's, broadcast): identical stopping everywhere
            val = torch.zeros(1, dtype=torch.float64, device=self._collective_device())
            if rank == 0:
                net0 = den.net
                den.net = net0.to(self._dev)
                try:
                    yd = None if y_train is None else y_train.to(self._dev)
                    val[0] = estimate_loss_null(
                        den, x.to(self._dev), yd, cfg, self._dev, self.progress
                    )
                finally:
                    den.net = net0.cpu()
            torch.distributed.broadcast(val, 0)
            cfg = copy.copy(cfg)
            cfg.loss_null = float(val[0])
        mine = torch.tensor_split(torch.arange(K), world)[rank] if world > 1 else torch.arange(K)
        run_dir = self.run_dir
        if run_dir is not None and world > 1:
            run_dir = os.path.join(run_dir, f"rank{rank}-of-{world}")
        scores = torch.empty(0, x.shape[0])
        res = None
        if mine.numel():
            res = attribute(
                den,
                x,
                xgen[mine],
                cfg,
                train_labels=y,
                target_labels=None if ygen is None else ygen[mine],
                train_ids=ids,
                device=self._dev,
                progress=self.progress,
                run_dir=run_dir,
                resume=self.resume,
                cache_dir=self.cache_dir if rank == 0 else None,
            )
            scores = res.scores
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(
                parts, (scores.cpu(), None if res is None else res.meta)
            )
            scores = torch.cat([p[0] for p in parts])
            metas = [p[1] for p in parts if p[1] is not None]
            meta = dict(metas[0])
            meta["targets"] = [t for m in metas for t in m["targets"]]
            meta["flagged"] = [
                i for i, t in enumerate(meta["targets"]) if t["stop"] in ("nan", "cap")
            ]
            meta["world_size"] = world
        else:
            meta = res.meta
        from ..result import Attribution

        self.last_result = Attribution(scores, ids, meta)
        resolved = meta["resolved"]
        self.loss_null = resolved["loss_null"]
        self.t_sched_infer, self.t_sched_train = (
            resolved["t_sched_infer"],
            resolved["t_sched_train"],
        )
        self._warn_flagged(meta["flagged"], [t["stop"] for t in meta["targets"]])
        scores = scores.to(self._dev)
        all_idx = ids.to(self._dev)
        return get_topk(top_k, all_idx, scores), all_idx, scores

    def _collective_device(self) -> torch.device:
        backend = torch.distributed.get_backend()
        return self._dev if backend == "nccl" else torch.device("cpu")

    def _warn_flagged(self, flagged, stops) -> None:
        if not flagged:
            return
        cap = [k for k in flagged if stops[k] == "cap"]
        nan = [k for k in flagged if stops[k] == "nan"]
        if cap:
            warnings.warn(
                f"mucs_fast: targets {cap} reached the safety cap of {self.safety_steps} unlearning "
                "steps before the stop rule (max_steps=None; the reference would keep going); "
                "raise safety_steps= or pass max_steps=",
                stacklevel=3,
            )
        if nan:
            warnings.warn(
                f"mucs_fast: unlearning diverged (NaN) for targets {nan}; their scores are NaN",
                stacklevel=3,
            )

    def _run_reference(self, dataset, data, xgen, ygen, top_k_attrib):
        """The reference's run() on resident data, same global RNG draws in the same order."""
        ids, x, y = data
        dl_inference = ResidentLoader(
            dataset, ids, x, y, self._infer_images(), False, False, self._dev
        )
        dl_unlearn = ResidentLoader(dataset, ids, x, y, self.batch_size, True, True, self._dev)
        if self.t_sched_train == "auto" or self.t_sched_infer == "auto":
            tmp = self.estimate_t_sched(dl_unlearn)
            if self.t_sched_train == "auto":
                self.t_sched_train = tmp
            if self.t_sched_infer == "auto":
                self.t_sched_infer = tmp
        if self.loss_null == "auto":
            self.loss_null = self.estimate_null_loss(dl_unlearn)
        model = copy.deepcopy(self.module).to(self._dev)
        all_idx, loss_t, noiseinfo = self.compute_inference_losses(model, dl_inference)
        loss_t = loss_t.unsqueeze(0)
        loss_u = []
        self._stops = []
        for i in range(len(xgen)):
            model = copy.deepcopy(self.module).to(self._dev)
            model = self.compute_unlearning(
                model, dl_unlearn, xgen[i].to(self._dev), ygen[i].to(self._dev)
            )
            _, losses, _ = self.compute_inference_losses(model, dl_inference, noiseinfo=noiseinfo)
            loss_u.append(losses)
        loss_u = torch.stack(loss_u, dim=0)
        scores = self.compute_scores(loss_t, loss_u)
        self._warn_flagged(
            [k for k, s in enumerate(self._stops) if s in ("cap", "nan")], self._stops
        )
        return get_topk(top_k_attrib, all_idx, scores), all_idx, scores

    def _infer_images(self) -> int:
        return score_batch_images(self.score_batch, self.num_noises, self._dev)

    ###########################################################################

    def compute_inference_losses(self, model, dl, noiseinfo=None, force_y=None):
        """(idxs [Nt], losses [Nt, M] fp32, noiseinfo (noise σ·ε [M, C, H, W], σ [M])) of `model`
        on every batch of `dl`, batch layout "(n b)" (noise-major) as the reference."""
        with torch.inference_mode(), autocast_for(self._dev, self.precision):
            if noiseinfo is None:
                for batch in dl:
                    x = batch[1]
                    break
                noiseinfo = self.get_noise_info([self.num_noises] + list(x.size()[1:]))
            model.eval()
            noise, sigma = noiseinfo
            M = len(noise)
            idxs, losses = [], []
            for batch in dl:
                idx, x, y = batch[:3]
                x, y = x.to(self._dev), y.to(self._dev)
                bsz = len(x)
                xx = x.repeat(M, *([1] * (x.dim() - 1)))
                yy = y.repeat(M, *([1] * (y.dim() - 1)))
                if force_y is not None:
                    yy = force_y.to(self._dev).unsqueeze(0).expand(len(yy), *force_y.shape)
                if self.use_same_noise_infer:
                    n = noise.repeat_interleave(bsz, 0)
                    s = sigma.repeat_interleave(bsz)
                else:
                    n, s = self.get_noise_info(xx.size())
                xhat = self.get_model_pred(model, xx, n, s, yy)
                loss = self.get_model_loss(xx, xhat, s).float()
                idxs.append(torch.as_tensor(idx))
                losses.append(loss.view(M, bsz).t())
            return torch.cat(idxs, dim=0), torch.cat(losses, dim=0), noiseinfo

    def compute_unlearning(self, model, dl, xgen_i, ygen_i):
        """Mirrored bounded unlearning of one target on `model` (in place; returned), batches from
        `dl`, noise from the global RNG — the reference's loop, with a safety cap when
        max_steps=None (`self.safety_steps`, warned)."""
        if not isinstance(self.loss_null, (int, float)):
            raise ValueError(  # noqa: TRY004  ("auto" is a valid value, just not here)
                f"compute_unlearning needs a numeric loss_null (got {self.loss_null!r}): "
                "call estimate_null_loss(dl) first or pass loss_null=<number>"
            )
        model.eval()
        optim = self._optimizer(model)
        if hasattr(self.fabric, "setup_optimizers"):
            optim = self.fabric.setup_optimizers(optim)
        for name, pars in model.named_parameters():
            pars.requires_grad = not self.is_frozen_param(name)
        cfg = MUCSConfig(
            tolerance=self.tol, max_steps=self.max_steps, safety_steps=self.safety_steps
        )
        step = 0
        while True:
            for batch in dl:
                xr, yr = batch[1].to(self._dev), batch[2].to(self._dev)
                ar = af = None
                xf = xgen_i.unsqueeze(0).expand(len(xr), *xgen_i.shape)
                yf = ygen_i.unsqueeze(0).expand(len(xr), *ygen_i.shape)
                if self.use_aug:
                    xr, ar = self.get_augmentations(xr)
                    xf, af = self.get_augmentations(xf)
                wr = (
                    self.get_instance_weight(dl.dataset, xr, yr, xf, yf).clone()
                    if self.use_instance_weights
                    else 1
                )
                nr, sr = self.get_noise_info(xr.size(), training=True)
                if self.use_same_noise_train:
                    nf, sf = nr, sr
                else:
                    nf, sf = self.get_noise_info(xf.size(), training=True)
                xrhat = self.get_model_pred(model, xr, nr, sr, yr, a=ar)
                xfhat = self.get_model_pred(model, xf, nf, sf, yf, a=af)
                lr = (wr * self.get_model_loss(xr, xrhat, sr)).mean()
                lf = self.get_model_loss(xf, xfhat, sf).clamp(max=self.loss_null).mean()
                loss = lr - self.lamb * lf
                reason = stop_reason(step, float(lf.detach()), self.loss_null, cfg)
                if reason is not None:
                    self._stops = getattr(self, "_stops", []) + [reason]
                    return model
                optim.zero_grad(set_to_none=True)
                if hasattr(self.fabric, "backward"):
                    self.fabric.backward(loss)
                else:
                    loss.backward()
                optim.step()
                step += 1

    def _optimizer(self, model):
        """The reference's get_optimizer(conf.training.optim, model), over all parameters."""
        oc = self.conf.training.optim
        name = str(oc.name).lower()
        if name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=oc.lr, weight_decay=oc.wd)
        betas, wd = optimizer_spec(oc)
        if name.startswith("adamw"):
            return torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=betas, weight_decay=wd)
        return torch.optim.Adam(model.parameters(), lr=oc.lr, betas=betas)

    def compute_scores(self, loss_t, loss_u):
        """scores [Ng, Nt] from loss_t [1, Nt, M] and loss_u [Ng, Nt, M] (the score formula)."""
        return skew_scores(
            loss_u,
            loss_t[0],
            eps=self.eps,
            use_loss_ratio=self.use_loss_ratio,
            use_same_noise_infer=self.use_same_noise_infer,
        )

    ###########################################################################

    @torch.inference_mode()
    def get_augmentations(self, x):
        x, a = self.augment(x)
        return x, a

    @torch.inference_mode()
    def get_instance_weight(self, ds, xi, yi, xg, yg, q=0.1):
        """The reference's instance weights (use_instance_weights=True; its lib.image_metrics)."""
        sim = self.image_sim_calc(ds.denormalize(xi), ds.denormalize(xg))
        if not getattr(self.module, "unconditional", True):
            sim += torch.nn.functional.cosine_similarity(yi, yg, dim=-1).clamp(min=0).sqrt()
        thres = torch.quantile(sim, 1 - q)
        weight = (sim <= thres).float()
        return weight / weight.mean()

    @torch.inference_mode()
    def get_noise_info(self, size, training=False):
        """(noise σ·ε [size], σ [size[0]]) from the global RNG, as the reference draws them:
        t_sched None: ln σ ~ N(P_mean, P_std²); else the first size[0] of int(size[0] / t_sched)
        Karras levels (training: sorted uniform positions; inference: evenly spaced)."""
        t_sched = self.t_sched_train if training else self.t_sched_infer
        dev = self._dev
        if t_sched is None:
            s = torch.randn(size[0], device=dev)
            sigma = (self.module.sigma_P_std * s + self.module.sigma_P_mean).exp()
        else:
            num = int(size[0] / t_sched)
            if training:
                s = torch.rand(num, device=dev).sort(descending=False).values
            else:
                s = torch.linspace(0, 1, num, device=dev)
            sigma_min, sigma_max, rho = self._sampler_conf()
            sigma = (
                sigma_max ** (1 / rho) + s * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
            ) ** rho
            sigma = sigma[: size[0]]
        noise = sigma.view(-1, 1, 1, 1) * torch.randn(list(size), device=dev)
        return noise, sigma

    def get_model_pred(self, model, x, n, s, y, a=None):
        return model(x + n, s, y=y, a=a)

    def get_model_loss(self, x, xhat, s, reduction="pixels"):
        """λ(σ)·(xhat − x)², λ(σ) = (σ² + σ_d²)/(σ·σ_d)²; reduction "pixels" (per sample), "mean"
        or None/"none"."""
        sd = self.module.sigma_data
        w = ((s**2 + sd**2) / (s * sd) ** 2).view(-1, 1, 1, 1)
        loss = w * (xhat - x).pow(2)
        if reduction is None or reduction == "none":
            return loss
        if reduction == "mean":
            return loss.mean()
        if reduction == "pixels":
            return loss.mean((-1, -2, -3))
        raise NotImplementedError(reduction)

    def is_frozen_param(self, name):
        return any(txt in name for txt in self.frozen_params)

    ###########################################################################

    @torch.inference_mode()
    def estimate_t_sched(self, dl, num_consec=3, qtl=0.05):
        """Fraction of the full σ grid above half the `qtl` quantile of normalized Euclidean
        distances between each batch of `dl` and its `num_consec` predecessors (the reference's
        estimate, which crashes there)."""
        distances, prev_x = [], []
        x = None
        for batch in dl:
            x = batch[1].to(self._dev)
            if prev_x:
                a = x.reshape(len(x), -1).float()
                b = torch.cat(prev_x, dim=0).reshape(-1, a.shape[1]).float()
                dist = torch.cdist(a[None], b[None])[0] / a.shape[1] ** 0.5
                distances.append(dist.reshape(-1).cpu())
            prev_x.append(x)
            if len(prev_x) > num_consec:
                prev_x = prev_x[1:]
        if not distances:
            raise ValueError('t_sched="auto" needs at least two batches of training data')
        distances = torch.sort(torch.cat(distances)).values
        tmp = self.t_sched_train, self.t_sched_infer
        self.t_sched_infer = 1
        try:
            _, sigma = self.get_noise_info([self.num_noises] + list(x.size()[1:]))
        finally:
            self.t_sched_train, self.t_sched_infer = tmp
        threshold = distances[int(qtl * len(distances))] / 2
        return max((sigma.cpu() > threshold).float().mean().item(), 1.0 / self.num_noises)

    @torch.inference_mode()
    def estimate_null_loss(self, dl, num_estimates=200):
        """Mean training-noise loss of a freshly initialized model over up to `num_estimates`
        batches of `dl` (global RNG, as the reference)."""
        init = getattr(self.fabric, "init_module", None)
        if init is not None:
            with init():
                model = self.build_null_model(dl.dataset)
        else:
            model = self.build_null_model(dl.dataset)
        model = model.to(self._dev).eval()
        losses = []
        for i, batch in enumerate(dl):
            x, y = batch[1].to(self._dev), batch[2].to(self._dev)
            n, s = self.get_noise_info(x.size(), training=True)
            losses.append(self.get_model_loss(x, self.get_model_pred(model, x, n, s, y), s))
            if i + 1 >= num_estimates:
                break
        loss_null = torch.stack(losses, dim=-1).mean().item()
        if not (math.isfinite(loss_null) and loss_null > 0):
            raise ValueError(f"loss_null='auto' gave {loss_null}; pass loss_null=<number>")
        return loss_null
