"""Scoring: per-(image, noise) losses under the shared bank and the noise-consistent skew.

score[k, n] = (1/M) Σ_m (L_u[k, n, m] − L_t[n, m]) / (L_u[k, n, m] + L_t[n, m] + eps)

(spec/MUCS.md, "Score"). A `LossPass` is the one callable that evaluates every loss of a run: the
original model's L_t and the K unlearned copies' L_u go through the same per-model function, the
same compile setting, precision and op backends, so nothing target-independent can enter the
difference of two nearly equal losses. Losses are computed chunk by chunk over training images and
reduced to skew sums per chunk: no [K, N, M] tensor ever exists. With use_same_noise_infer=False
every model sees its own independent ε (same σ levels), keyed by (model stream, image id, noise
index), and the skew compares per-image mean losses.

Batch layout is noise-major, "(m n)", as in the reference.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional, Sequence

import torch

from ._io import derive_seed
from .coverage import Writes, nan_tensor
from .data import Source
from .denoisers import Denoiser
from .functional import StackedNet
from .noise import NoiseBank
from .ops import skew_accumulate

DEFAULT_SCORE_BATCH = {"cpu": 1600, "cuda": 8192}
# compile="auto" compiles scoring passes of at least this many image·noise pairs: the one-off
# compile is repaid within a demo-scale pass (1797 × 100 pairs) and not within a tiny one
# (300 × 100); the measurements are in BENCHMARKS.md.
COMPILE_MIN_PAIRS = 100_000


def use_compile(setting, pairs: int) -> bool:
    return bool(setting) if isinstance(setting, bool) else pairs >= COMPILE_MIN_PAIRS


def images_per_forward(score_batch: Optional[int], M: int, device: torch.device) -> int:
    """Training images per scoring forward: (image·noise pairs per forward) // M, at least 1."""
    pairs = score_batch or DEFAULT_SCORE_BATCH.get(device.type, 1600)
    return max(1, pairs // M)


def resolve_precision(device: torch.device, precision: str) -> str:
    """ "auto" → the reference's policy: bf16 autocast on CUDA (fp32 loss accumulation), fp32
    elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str):
    precision = resolve_precision(device, precision)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")


def independent_eps(
    seed: int, ids: torch.Tensor, M: int, chw: Sequence[int], device
) -> torch.Tensor:
    """ε [M, n, C, H, W] of one model's independent noise stream `seed` for the images `ids`
    (use_same_noise_infer=False): image i's M noises come from a generator seeded by (seed, i), so
    they do not depend on the chunking, the batch size or the other images."""
    g = torch.Generator()
    out = torch.empty((ids.numel(), M, *chw))
    for j, i in enumerate(ids.tolist()):
        g.manual_seed(derive_seed(seed, int(i)))
        out[j] = torch.randn((M, *chw), generator=g)
    return out.transpose(0, 1).contiguous().to(device)


def _pad_rows(t: Optional[torch.Tensor], n: int, dim: int = 0) -> Optional[torch.Tensor]:
    """Pad dim `dim` to n by repeating its last slice (real values: no NaN/Inf can appear)."""
    if t is None or t.shape[dim] == n:
        return t
    last = t.narrow(dim, t.shape[dim] - 1, 1)
    reps = [1] * t.dim()
    reps[dim] = n - t.shape[dim]
    # the same kind of tensor (inference or not) as the chunk it pads: a compiled graph guards on
    # dispatch keys, and an inference tensor among normal ones retraced it for the last chunk
    with torch.inference_mode(t.is_inference()):
        return torch.cat([t, last.repeat(*reps)], dim)


class LossPass:
    """Losses [K, M, n] of K copies of `net` (differing in the trainable weights `names`) on chunks
    of n training images under the bank — for the original model (K = 1) and the unlearned copies.

    mode: "loop" evaluates the K copies one after another on the same chunk (each one functional
    call, optionally compiled): on CPU the vmapped K-batched DiT ran slower per model than K
    single calls (measured in BENCHMARKS.md); "vmap" evaluates them as one batched call (fewest
    launches: the GPU path; K = 1 runs unbatched, see StackedNet.vmap). "auto": "vmap" on CUDA,
    "loop" elsewhere.
    compile: torch.compile the per-chunk function once; weights are its inputs, so every block of
    targets (and in "loop" mode every copy and the original) reuses the graph, and the last chunk
    is padded to the full size so it is traced once.
    N: the size of the whole training set when the pass is called on parts of it (shards), so that
    padding is decided for the whole set.
    """

    def __init__(
        self,
        den: Denoiser,
        net: torch.nn.Module,
        names: Sequence[str],
        bank: NoiseBank,
        *,
        images_per_forward: int,
        precision: str = "auto",
        compile: bool = False,
        mode: str = "auto",
        N: Optional[int] = None,
    ):
        self.den, self.bank, self.images_per_forward = den, bank, int(images_per_forward)
        # compiled: every chunk has images_per_forward rows (the last one padded) unless the whole
        # set of N
        # images fits one chunk; decided for the whole set, so a shard's chunks are the set's chunks
        self.N = N
        self.device = bank.eps.device
        self.precision, self.compile = precision, bool(compile)
        if mode == "auto":
            mode = "vmap" if self.device.type == "cuda" else "loop"
        if mode not in ("vmap", "loop"):
            raise ValueError(f"mode must be 'auto', 'vmap' or 'loop', got {mode!r}")
        self.mode = mode
        params = dict(net.named_parameters())
        self.original = {n: params[n].detach().unsqueeze(0) for n in names}  # {name: [1, ...]}
        self.stack = StackedNet(net, self.original) if names else None
        self._terms: dict = {}

        def one(w, xc, yc, e, level, terms):  # losses [M, n] of the model with trainable weights w
            # only w is an input of the compiled graph: the frozen weights are the same for every
            # copy and chunk (as graph inputs they made the compile longer, for nothing)
            return den.grid_loss(
                xc, e, level, yc, net=self.stack.module(w) if self.stack else net, terms=terms
            )

        def batched(
            weights, xc, yc, e, level, terms
        ):  # losses [K, M, n]; e: the bank or per-model [K, M, n, ...]
            return self.stack.vmap(
                lambda net_k, e_k: den.grid_loss(xc, e_k, level, yc, net=net_k, terms=terms),
                e,
                in_dims=(None if e.dim() == xc.dim() else 0,),
                weights=weights,
            )

        wrap = (lambda f: torch.compile(f, dynamic=False)) if self.compile else (lambda f: f)
        self._one = wrap(one)
        self._batched = wrap(batched) if mode == "vmap" else None

    def segment(self, bank: NoiseBank, images_per_forward: int) -> "LossPass":
        """This pass (the same compiled functions, so the same graph for every segment of one
        shape) over another bank: a segment of this one (adaptive scoring)."""
        view = copy.copy(self)
        view.bank, view.images_per_forward, view._terms = bank, int(images_per_forward), {}
        return view

    def prepare(self, weights: Optional[dict]):
        """The models of one pass: `weights` {name: [K, ...]} of K copies, or None for the
        original."""
        weights = self.original if weights is None else weights
        if (
            self.mode == "vmap"
            and self.stack is not None
            and next(iter(weights.values())).shape[0] > 1
        ):
            return weights
        if self.stack is None:
            return [None]
        K = next(iter(weights.values())).shape[0]
        return [
            {n: w[k] for n, w in weights.items()} for k in range(K)
        ]  # built once per pass, not per chunk

    def chunks(
        self,
        x: Source,
        y,
        ids,
        seeds: Optional[Sequence[int]],
        start: int = 0,
        stop: Optional[int] = None,
    ):
        """(n0, n1, x, y, ε) per chunk of `images_per_forward` images of x[start:stop], padded to it
        when compiled; ε is the bank or, with `seeds` (independent noise), each model's own [K, M,
        n, ...]."""
        N, per, M = len(x), self.images_per_forward, self.bank.M
        stop = N if stop is None else stop
        pad = self.compile and (N if self.N is None else self.N) > per
        ranges = [(n0, min(stop, n0 + per)) for n0 in range(start, stop, per)]
        for n0, n1, xc in x.chunks(ranges, self.device):
            yc = None if y is None else self.den.forward_labels(y[n0:n1], self.device)
            e = self.bank.eps
            if seeds is not None:
                e = torch.stack(
                    [independent_eps(s, ids[n0:n1], M, xc.shape[1:], self.device) for s in seeds]
                )
            if pad:
                xc, yc = _pad_rows(xc, per), _pad_rows(yc, per)
                e = e if seeds is None else _pad_rows(e, per, dim=2)
            yield n0, n1, xc, yc, e

    def gather(self, x: Source, y, rows: torch.Tensor):
        """(x, y) of the training images `rows` (≤ images_per_forward positions, CPU int64), padded
        when compiled: one chunk of a row subset."""
        xc = x.take(rows, self.device)
        yc = None if y is None else self.den.forward_labels(y[rows.to(y.device)], self.device)
        if self.compile:
            xc, yc = _pad_rows(xc, self.images_per_forward), _pad_rows(yc, self.images_per_forward)
        return xc, yc

    def losses(self, models, xc, yc, e) -> torch.Tensor:
        """Losses [K, M, n] of the prepared `models` on one chunk."""
        n = xc.shape[0]
        key = (n, e.dim())
        if key not in self._terms:  # the same for every chunk of a fixed bank: built once
            self._terms[key] = self.den.grid_terms(
                e if e.dim() == xc.dim() else e[0], self.bank.level, n
            )
        terms = self._terms[key]
        level = self.bank.level
        if isinstance(models, dict):
            return self._batched(models, xc, yc, e, level, terms)
        return torch.stack(
            [
                self._one(p, xc, yc, e if e.dim() == xc.dim() else e[k], level, terms)
                for k, p in enumerate(models)
            ]
        )


@torch.inference_mode()
def original_losses(
    lp: LossPass,
    x: Source,
    y: Optional[torch.Tensor],
    ids: torch.Tensor,
    *,
    infer_seed: Optional[int] = None,
    start: int = 0,
    stop: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """L_t [n, M] float32 of the original model on training images start..stop (default all) of
    x under the bank (with `infer_seed`: under its own independent ε per image, same levels)."""
    stop = len(x) if stop is None else stop
    out = nan_tensor(stop - start, lp.bank.M, device=lp.device)
    writes = Writes(stop - start, f"L_t of images {start}..{stop - 1}")
    models = lp.prepare(None)
    with autocast_for(lp.device, lp.precision):
        for n0, n1, xc, yc, e in lp.chunks(
            x, y, ids, None if infer_seed is None else [infer_seed], start, stop
        ):
            out[n0 - start : n1 - start] = lp.losses(models, xc, yc, e)[0, :, : n1 - n0].t()
            writes.mark(n0 - start, n1 - start)
            if progress is not None:
                progress(n1 - n0)
    writes.require_full()
    return out


@torch.inference_mode()
def skew_scores(
    loss_u: torch.Tensor,
    loss_t: torch.Tensor,
    *,
    eps: float,
    use_loss_ratio: bool,
    use_same_noise_infer: bool,
) -> torch.Tensor:
    """score [K, n] from loss_u [K, n, M] and loss_t [n, M] (the score formula and its switches)."""
    if not use_same_noise_infer:  # independent noises: compare per-image means
        loss_u = loss_u.mean(-1, keepdim=True)
        loss_t = loss_t.mean(-1, keepdim=True)
    return skew_accumulate(loss_u, loss_t, eps, use_loss_ratio) / loss_u.shape[-1]


@torch.inference_mode()
def score_stacked(
    lp: LossPass,
    weights: dict,
    x: Source,
    y: Optional[torch.Tensor],
    ids: torch.Tensor,
    loss_t: torch.Tensor,
    *,
    eps: float,
    use_loss_ratio: bool,
    use_same_noise_infer: bool,
    infer_seeds: Optional[Sequence[int]] = None,
    start: int = 0,
    stop: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """Scores [K, n] of the K copies `weights` ({name: [K, ...]}) against L_t [N, M] on training
    images start..stop (default all) of x, in one pass.

    Per chunk the training images (and the bank's noisy inputs) are read once for all K copies and
    their losses [K, n, M] are reduced to skew sums on the spot; no host sync inside the loop.
    use_same_noise_infer=False: `infer_seeds[k]` is copy k's independent noise stream.
    """
    stop = len(x) if stop is None else stop
    models = lp.prepare(weights)
    K = len(models) if isinstance(models, list) else next(iter(models.values())).shape[0]
    scores = nan_tensor(K, stop - start, device=lp.device)
    writes = Writes(stop - start, f"scores of images {start}..{stop - 1}")
    with autocast_for(lp.device, lp.precision):
        for n0, n1, xc, yc, e in lp.chunks(x, y, ids, infer_seeds, start, stop):
            loss_u = lp.losses(models, xc, yc, e)[:, :, : n1 - n0].transpose(1, 2)  # [K, n, M]
            scores[:, n0 - start : n1 - start] = skew_scores(
                loss_u,
                loss_t[n0:n1],
                eps=eps,
                use_loss_ratio=use_loss_ratio,
                use_same_noise_infer=use_same_noise_infer,
            )
            writes.mark(n0 - start, n1 - start)
            if progress is not None:
                progress(n1 - n0)
    writes.require_full()
    return scores
