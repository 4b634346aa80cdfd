"""Scoring pass: per-(image, noise) losses under the shared bank and the noise-consistent skew.

score[k, n] = (1/M) Σ_m (L_u[k, n, m] − L_t[n, m]) / (L_u[k, n, m] + L_t[n, m] + eps)

(spec/MUCS.md, "Score"). Losses are computed chunk by chunk over training images; the skew is
reduced per chunk, so no [K, N, M] tensor ever exists. With use_same_noise_infer=False every model
sees its own independent ε (same σ levels) and the skew compares per-image mean losses.

Batch layout is noise-major, "(m n)", as in the reference.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .denoisers import Denoiser
from .noise import NoiseBank
from .ops import skew_accumulate

DEFAULT_SCORE_BATCH = {"cpu": 1600, "cuda": 8192}
# compile="auto" compiles scoring passes of at least this many image·noise pairs: on 2 CPU cores the
# one-off compile of the demo DiT (~15-20 s) is repaid by the ≈ 1.5× faster forward within one
# demo-scale pass (1797 × 100 pairs); below it (e.g. 300 × 100 for a tiny model) it is not; see
# BENCHMARKS.md.
COMPILE_MIN_PAIRS = 100_000


def use_compile(setting, pairs: int) -> bool:
    return bool(setting) if isinstance(setting, bool) else pairs >= COMPILE_MIN_PAIRS


def score_batch_images(score_batch: Optional[int], M: int, device: torch.device) -> int:
    """Training images per scoring forward: (image·noise pairs per forward) // M, at least 1."""
    pairs = score_batch or DEFAULT_SCORE_BATCH.get(device.type, 1600)
    return max(1, pairs // M)


def autocast_for(device: torch.device, precision: str):
    """The reference's policy: bf16 autocast on CUDA (fp32 loss accumulation), fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")


def chunk_losses(den: Denoiser, net, x: torch.Tensor, y: Optional[torch.Tensor], eps: torch.Tensor,
                 level: torch.Tensor) -> torch.Tensor:
    """Losses [n, M] of n images x under M noises (eps [M, ...] shared, or [M, n, ...])."""
    return den.grid_loss(x, eps, level, y, net=net).t()


def _pad_rows(t: Optional[torch.Tensor], n: int, dim: int = 0) -> Optional[torch.Tensor]:
    """Pad dim `dim` to n by repeating its last slice (real values: no NaN/Inf can appear)."""
    if t is None or t.shape[dim] == n:
        return t
    last = t.narrow(dim, t.shape[dim] - 1, 1)
    reps = [1] * t.dim()
    reps[dim] = n - t.shape[dim]
    return torch.cat([t, last.repeat(*reps)], dim)


def fixed_shape(fn: Callable, compile: bool) -> Callable:
    """`fn` as called per chunk, optionally torch.compile'd for the fixed chunk shape (callers pad
    the last chunk to the full size, so the graph is traced once per run, not twice)."""
    return torch.compile(fn, dynamic=False) if compile else fn


@torch.inference_mode()
def inference_losses(den: Denoiser, net, x: torch.Tensor, y: Optional[torch.Tensor], bank: NoiseBank,
                     *, images_per_batch: int, precision: str = "auto",
                     generator: Optional[torch.Generator] = None, compile: bool = False,
                     progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """L [N, M] float32 of every training image under the bank (or, with `generator`, under
    independent ε per image drawn from it, same levels)."""
    N, per = x.shape[0], images_per_batch
    out = torch.empty(N, bank.M, dtype=torch.float32, device=x.device)
    run = fixed_shape(lambda xc, yc, e: chunk_losses(den, net, xc, yc, e, bank.level), compile)
    with autocast_for(x.device, precision):
        for n0 in range(0, N, per):
            n1 = min(N, n0 + per)
            eps = bank.eps
            if generator is not None:
                eps = torch.randn((bank.M, n1 - n0, *x.shape[1:]), generator=generator, device=x.device)
            pad = compile and N > per
            xc, yc = x[n0:n1], None if y is None else y[n0:n1]
            if pad:
                xc, yc = _pad_rows(xc, per), _pad_rows(yc, per)
                eps = eps if generator is None else _pad_rows(eps, per, dim=1)
            out[n0:n1] = run(xc, yc, eps)[:n1 - n0]
            if progress is not None:
                progress(n1 - n0)
    return out


@torch.inference_mode()
def skew_scores(loss_u: torch.Tensor, loss_t: torch.Tensor, *, eps: float, use_loss_ratio: bool,
                use_same_noise_infer: bool) -> torch.Tensor:
    """score [K, n] from loss_u [K, n, M] and loss_t [n, M] (the score formula and its switches)."""
    if not use_same_noise_infer:  # independent noises: compare per-image means
        loss_u = loss_u.mean(-1, keepdim=True)
        loss_t = loss_t.mean(-1, keepdim=True)
    return skew_accumulate(loss_u, loss_t, eps, use_loss_ratio) / loss_u.shape[-1]


@torch.inference_mode()
def score_target(den: Denoiser, net, x: torch.Tensor, y: Optional[torch.Tensor], bank: NoiseBank,
                 loss_t: torch.Tensor, *, eps: float, use_loss_ratio: bool, use_same_noise_infer: bool,
                 images_per_batch: int, precision: str = "auto",
                 generator: Optional[torch.Generator] = None,
                 progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Scores [N] of one unlearned model against the original's losses loss_t [N, M], streamed."""
    N = x.shape[0]
    scores = torch.empty(N, dtype=torch.float32, device=x.device)
    with autocast_for(x.device, precision):
        for n0 in range(0, N, images_per_batch):
            n1 = min(N, n0 + images_per_batch)
            eps_ = bank.eps
            if generator is not None:
                eps_ = torch.randn((bank.M, n1 - n0, *x.shape[1:]), generator=generator, device=x.device)
            loss_u = chunk_losses(den, net, x[n0:n1], None if y is None else y[n0:n1], eps_, bank.level)
            scores[n0:n1] = skew_scores(loss_u[None], loss_t[n0:n1], eps=eps, use_loss_ratio=use_loss_ratio,
                                        use_same_noise_infer=use_same_noise_infer)[0]
            if progress is not None:
                progress(n1 - n0)
    return scores


@torch.inference_mode()
def score_stacked(den: Denoiser, stack, x: torch.Tensor, y: Optional[torch.Tensor], bank: NoiseBank,
                  loss_t: torch.Tensor, *, eps: float, use_loss_ratio: bool, use_same_noise_infer: bool,
                  images_per_batch: int, precision: str = "auto", generators: Optional[list] = None,
                  compile: bool = False, mode: str = "auto",
                  progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Scores [K, N] of the K models of `stack` (a StackedNet) in one pass over the training set.

    Per chunk of n images the noisy batch [(m n)] is built once and shared by all K models (vmap
    with unbatched inputs: the frozen prefix runs once); the losses [K, n, M] are reduced to skew
    sums on the spot. No [K, N, M] tensor and no host sync inside the loop.
    With use_same_noise_infer=False, `generators[k]` draws model k's own ε per chunk.
    compile: torch.compile the per-chunk function once (weights are its inputs, so every block of
    K targets, and in "loop" mode every model, reuses the graph).
    mode: "vmap" evaluates the K models as one batched call (fewest launches: the GPU path);
    "loop" evaluates them one after another on the same chunk (each a plain, optionally compiled,
    functional call): on CPU the vmapped K-batched DiT ran 2-3x slower per model than K single
    calls, eager or compiled (BENCHMARKS.md). "auto": "vmap" on CUDA, "loop" elsewhere.
    Either way the chunk is read once and reduced straight into the [K, N] sums.
    """
    N, K, M, per = x.shape[0], stack.K, bank.M, images_per_batch
    scores = torch.empty(K, N, dtype=torch.float32, device=x.device)
    if mode == "auto":
        mode = "vmap" if x.device.type == "cuda" else "loop"
    if mode not in ("vmap", "loop"):
        raise ValueError(f"mode must be 'auto', 'vmap' or 'loop', got {mode!r}")

    if mode == "vmap":
        def chunk(weights, xc, yc, e):  # losses [K, M, n]; e: the bank [M, ...] or per-model ε [K, M, n, ...]
            return stack.vmap(lambda net, e_: den.grid_loss(xc, e_, bank.level, yc, net=net), e,
                              in_dims=(None if generators is None else 0,), weights=weights)
    else:
        def one(w, xc, yc, e_):  # losses [M, n] of the model with trainable weights w
            return den.grid_loss(xc, e_, bank.level, yc, net=stack.module(w))

        run_one = fixed_shape(one, compile)

        def chunk(weights, xc, yc, e):
            return torch.stack([run_one({n: t[k] for n, t in weights.items()}, xc, yc,
                                        e if generators is None else e[k]) for k in range(K)])

    run = fixed_shape(chunk, compile and mode == "vmap")
    with autocast_for(x.device, precision):
        for n0 in range(0, N, per):
            n1 = min(N, n0 + per)
            n = n1 - n0
            xc, yc = x[n0:n1], None if y is None else y[n0:n1]
            e = bank.eps  # the shared bank: one input batch for all K models
            if generators is not None:
                e = torch.stack([torch.randn((M, n, *xc.shape[1:]), generator=g, device=x.device)
                                 for g in generators])
            if compile and N > per:
                xc, yc = _pad_rows(xc, per), _pad_rows(yc, per)
                e = e if generators is None else _pad_rows(e, per, dim=2)
            L = run(stack.weights, xc, yc, e)[:, :, :n]
            loss_u = L.transpose(1, 2)  # [K, M, n] → [K, n, M]
            scores[:, n0:n1] = skew_scores(loss_u, loss_t[n0:n1], eps=eps, use_loss_ratio=use_loss_ratio,
                                           use_same_noise_infer=use_same_noise_infer)
            if progress is not None:
                progress(n)
    return scores
