"""The drop-in Attributor: the reference's constructor (arguments, defaults, side effects), its
public methods (from `ReferenceReplay`), and run() dispatching to the mucs_fast engine
(`mucs_fast.attribute`, default) or to the reference's algorithm replayed on its global RNG
stream (`fast=False`, and the options only that path runs). Both paths return the reference's
(top ids, all ids, scores) and warn about targets that hit the safety cap or diverged."""

from __future__ import annotations

import contextlib
import copy
import importlib
import warnings

import torch

from .. import engine  # a module: tests spy on engine.attribute
from ..config import REFERENCE_FROZEN, MUCSConfig
from ..denoisers import EDMDenoiser
from ..functional import StackedNet
from ..params import trainable_names
from ..result import Attribution
from .pointwise import pointwise_view
from .reference_conf import optimizer_spec, sampler_range
from .reference_files import ReferenceData, dataset_tensors
from .reference_models import build_null_model, null_model_error, raw_module
from .replay import ReferenceReplay

_FROZEN_DEFAULT = list(REFERENCE_FROZEN)  # the reference's default list (never mutated)
DEFAULT_TARGETS_PER_BATCH = 8


def get_topk(topk: int, all_idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Dataset ids [Ng, k] by descending score (ties: dataset order)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :topk]
    return all_idx.to(order.device)[order]


def _probe_batched(den, names, x, y) -> str | None:
    """None when the engine's batched (vmapped) unlearning runs on this model, else the error.

    A forward and backward for two stacked copies of two images (expanded views: no weight copy),
    with respect to every trainable weight (some may be unused, e.g. an unconditional model's label
    embedder). Models whose forward calls a random function (e.g. the reference's conditional
    embedders draw a dropout mask even when its probability is 0) cannot be vmapped."""

    params = dict(den.net.named_parameters())
    w = {
        n: params[n].detach().unsqueeze(0).expand(2, *params[n].shape).requires_grad_(True)
        for n in names
    }
    n = min(2, x.shape[0])
    xb = x[:n].unsqueeze(0).expand(2, *x[:n].shape)
    g = torch.Generator().manual_seed(0)
    eps, sigma = den.training_noise(x[:n].shape, g)
    yb = None if y is None else y[:n].unsqueeze(0).expand(2, *y[:n].shape)
    try:
        stack = StackedNet(den.net, w)
        L = stack.loss(den, xb, eps.expand(2, *eps.shape), sigma.expand(2, n), yb)
        torch.autograd.grad(L.sum(), list(w.values()), allow_unused=True)
    except Exception as e:  # noqa: BLE001  (any failure: run the targets one at a time)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


@contextlib.contextmanager
def _matmul_precision(precision):
    """torch's float32 matmul precision set to `precision` (None: unchanged) for the block, the
    previous setting restored after (it is process-global)."""
    before = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class Attributor(ReferenceReplay):
    """The reference's MUCS Attributor, run by mucs_fast.

    Reference arguments (same names, defaults and order) come first. Acceleration options,
    keyword-only:
      fast=True             run() on the mucs_fast engine; False: the reference's algorithm and
                            global RNG stream on resident data (also used for use_aug,
                            use_instance_weights and non-Adam optimizers, which the engine lacks)
      targets_per_batch=8   K targets unlearned and scored together (1 = one at a time; models
                            that cannot be vmapped fall back to 1, with a warning)
      score_batch=None      image·noise pairs per scoring forward (None: engine default); the
                            engine only: fast=False batches inference as the reference does,
                            16·batch_size // num_noises images per batch
      safety_steps=1000     cap on unlearning steps when max_steps=None (warned when hit)
      cache_dir=None        cache of the original model's losses (e.g. "auto"); rank 0 only
      run_dir=None, resume=False   persist per-target results / continue an interrupted run
      precision="auto"      scoring precision ("auto": bf16 autocast on CUDA, fp32 elsewhere)
      compile="auto"        torch.compile the scoring passes (MUCSConfig.compile)
      load_threads=8        threads that read the training set once
      pointwise="auto"      the engine runs 1×1 stride-1 convolutions as channel matmuls
                            (`pointwise.pointwise_view`: same parameters, float rounding apart);
                            "auto": on the CPU, where oneDNN runs few-channel 1×1 kernels slowly
      cpu_highest_precision=True   on the CPU, the engine runs under
                            torch.set_float32_matmul_precision("highest") (the caller's setting
                            restored after): CPU runs fp32 (spec), and attrib.py's "medium", meant
                            for GPUs, selects CPU attention and batched-matmul kernels up to 10×
                            slower without changing their fp32 results here (BENCHMARKS.md)
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
        pointwise="auto",
        cpu_highest_precision=True,
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
        if pointwise not in ("auto", True, False):
            raise ValueError(f"pointwise must be 'auto', True or False, got {pointwise!r}")
        self.pointwise = pointwise
        self.cpu_highest_precision = bool(cpu_highest_precision)
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

    def _train_data(self, dataset) -> ReferenceData:
        """The training set as tensors, read once per dataset object."""
        if self._data is None or self._data[0] is not dataset or self._data[1] != len(dataset):
            self._data = (dataset, len(dataset), dataset_tensors(dataset, self.load_threads))
        return self._data[2]

    def build_null_model(self, dataset=None) -> torch.nn.Module:
        """A freshly initialized model of the same architecture
        (`reference_models.build_null_model`: the '...--pre' run's configuration.yaml, else the
        module's `args`)."""
        return build_null_model(self.module, self.method_path, dataset)

    # -- engine pieces ---------------------------------------------------------------------------
    def engine_module(self) -> torch.nn.Module:
        """The raw module the engine runs: `pointwise_view` of it when `pointwise` says so (it
        shares the caller's parameters; the caller's module is unchanged)."""
        use = self._dev.type == "cpu" if self.pointwise == "auto" else self.pointwise
        return pointwise_view(self.module)[0] if use else self.module

    def denoiser(self, dataset=None, net=None):
        """The engine's view of the model (`net`, default the raw module): an EDMDenoiser with the
        sampler's σ range."""

        sigma_min, sigma_max, rho = sampler_range(self.conf)
        return EDMDenoiser(
            self.module if net is None else net,
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
        if self.loss_null == "auto":
            err = null_model_error(self.module, self.method_path)
            if err is not None:
                raise ValueError(err)
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
            all_idx, scores, stops = self._run_reference(dataset, data, xgen, ygen)
        else:
            all_idx, scores, stops = self._run_engine(dataset, data, cfg, xgen, ygen)
        self._warn_flagged(stops)
        scores, all_idx = scores.to(self._dev), all_idx.to(self._dev)
        return get_topk(top_k_attrib, all_idx, scores), all_idx, scores

    def _run_engine(self, dataset, data, cfg, xgen, ygen):
        """run() on the engine: (all ids [Nt], scores [Ng, Nt], stop reason per target); with
        several processes the engine splits the work over the ranks; every rank gets the full
        result."""

        den = self.denoiser(dataset, self.engine_module())
        ids, x, y = data
        xgen = xgen.detach().float().cpu()
        if not den.conditional:  # the reference's datasets carry y for every model
            y = ygen = None
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
        # several processes (an initialized group, e.g. Lightning Fabric's): the engine splits the
        # work over the ranks and every rank gets the full result
        with _matmul_precision(
            "highest" if self.cpu_highest_precision and self._dev.type == "cpu" else None
        ):
            res = engine.attribute(
                den,
                x,
                xgen,
                cfg,
                train_labels=y,
                target_labels=ygen,
                train_ids=ids,
                device=self._dev,
                progress=self.progress,
                run_dir=self.run_dir,
                resume=self.resume,
                cache_dir=self.cache_dir,
            )
        scores, meta = res.scores, res.meta
        self.last_result = Attribution(scores, ids, meta)
        resolved = meta["resolved"]
        self.loss_null = resolved["loss_null"]
        self.t_sched_infer, self.t_sched_train = (
            resolved["t_sched_infer"],
            resolved["t_sched_train"],
        )
        return ids, scores, [t["stop"] for t in meta["targets"]]

    def _warn_flagged(self, stops) -> None:
        """Warn about the targets that stopped at the safety cap or diverged (NaN)."""
        cap = [k for k, s in enumerate(stops) if s == "cap"]
        nan = [k for k, s in enumerate(stops) if s == "nan"]
        if cap:
            warnings.warn(
                f"mucs_fast: targets {cap} reached the safety cap of {self.safety_steps} "
                "unlearning "
                "steps before the stop rule (max_steps=None; the reference would keep going); "
                "raise safety_steps= or pass max_steps=",
                stacklevel=3,
            )
        if nan:
            warnings.warn(
                f"mucs_fast: unlearning diverged (NaN) for targets {nan}; their scores are NaN",
                stacklevel=3,
            )
