"""Adaptive scoring (opt-in: `MUCSConfig(adaptive_top_k=k)`): each target's top-k for a fraction
of the image·noise forwards (spec/PERFORMANCE.md, "Adaptive mode").

Exact MUCS evaluates every training image under all M noises of the bank, for every target; most
images are nowhere near a target's top-k, and a few noises tell. The score of image n is the mean
over the bank of its per-noise skew r_nm = (L_u − L_t)/(L_u + L_t + eps) (or L_u − L_t).

Screening. The bank is visited in a stratified order (`screening_order`: levels sorted, taken in
van der Corput order, so every prefix spans the whole σ range — the per-noise skew depends strongly
on σ) and cut into segments of m_s noises (one shape: one compiled graph). The images still in the
running for target k are evaluated on the next segment; after 1, 2, 4, 8, … segments those that
cannot reach the top-k are set aside:

    c_m   mean of r_nm over the images in the running: common to all of them, it shifts every score
          alike, so comparisons are paired — the σ-dependence shared by all images cancels
    d_n   mean over the m seen noises of r_nm − c_m
    w_n   z·s_n·√((1 − m/M)/m), s_n the sd of r_nm − c_m over the seen noises (sampling without
          replacement from the finite bank; stratification makes this conservative)
    set aside n when d_n + w_n < τ, τ = the k-th largest d − w in the running.

Worst-case (Hoeffding/Serfling) bounds are vacuous at M = 100, so this is a CLT bound with a
margin z; every image still in the running after the last segment has been evaluated on the whole
bank, so its score is the exact one (summed in another order: equal to float rounding). A set-aside
image keeps its screening estimate (the mean of r over the noises it saw); `exact` says which.

Audit. Each set-aside image is audited with probability p (a draw per target and image from the
target's own seed): it is evaluated on the rest of the bank like a survivor (its score becomes
exact), and counts as a miss when that exact score reaches the final k-th best. The miss rate among
audited images (Wilson 95 % interval) estimates how many unaudited set-aside images belong in the
top-k.

L_t is computed only for the (image, segment) pairs some target uses, through the same loss pass
as L_u, and kept for the following targets of the run.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ._io import derive_seed
from .noise import NoiseBank
from .ops import skew_accumulate
from .score import LossPass, autocast_for


def screening_order(level: torch.Tensor) -> torch.Tensor:
    """Positions [M] of the bank in screening order: sorted by level (largest noise first), then in
    van der Corput (bit-reversed) order, so any prefix of m noises spreads over the whole range
    (the first 2^j: one in every 2^-j of it)."""
    M = level.numel()
    by_level = torch.argsort(level.detach().double().cpu(), descending=True, stable=True)
    bits = max(1, (M - 1).bit_length())
    # van der Corput points v = j/2^b as ranks ⌈v·M⌉ (the first rank of v's cell at
    ranks: dict = {}
    for i in range(1 << bits):  # every scale), first occurrences (2^b ≥ M: every rank occurs)
        ranks.setdefault(
            min(M - 1, (int(format(i, f"0{bits}b")[::-1], 2) * M + (1 << bits) - 1) >> bits), None
        )
    return by_level[torch.tensor(list(ranks), dtype=torch.int64)]


def screen_noises(M: int, setting: Optional[int]) -> int:
    """m_s: noises per segment (None: ⌈M/16⌉, at least 2, at most M)."""
    return min(M, max(2, math.ceil(M / 16)) if setting is None else setting)


def checkpoints(n_segments: int) -> list:
    """Segments after which images are set aside: 1, 2, 4, … (before the last)."""
    out, c = [], 1
    while c < n_segments:
        out.append(c)
        c *= 2
    return out


def wilson(misses: int, n: int, z: float = 1.96) -> tuple:
    """Wilson score interval of a binomial proportion (0, 1 when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = misses / n
    scale = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return max(0.0, mid - half), min(1.0, mid + half)


class LazyLossT:
    """L_t [N, M] of the original model, computed per (image, segment) on first use; every rank
    holds all of it (each computes a share of the missing rows, the shares are combined)."""

    def __init__(self, N: int, n_segments: int, M: int, device):
        self.values = torch.zeros(N, M, dtype=torch.float32, device=device)
        self.known = torch.zeros(N, n_segments, dtype=torch.bool)
        self.pairs = 0  # image·noise forwards of the original model (all ranks)

    def ensure(
        self, lp: LossPass, x, y, need: torch.Tensor, seg: int, cols: torch.Tensor, m: int, group
    ) -> None:
        todo = (need & ~self.known[:, seg]).nonzero().squeeze(1)
        if len(todo) == 0:
            return
        part = torch.zeros(len(todo), m, dtype=torch.float32, device=self.values.device)
        models = lp.prepare(None)
        for i, rc in enumerate(torch.split(todo, lp.images_per_forward)):
            if i % group.world == group.rank:  # chunks of the same rows whatever the world size
                xc, yc = lp.gather(x, y, rc)
                part[i * lp.images_per_forward : i * lp.images_per_forward + len(rc)] = lp.losses(
                    models, xc, yc, lp.bank.eps
                )[0, :m, : len(rc)].t()
        group.sum_(part)  # zero outside each rank's chunks: an exact sum
        self.values[todo.to(part.device)[:, None], cols.to(part.device)[None, :]] = part
        self.known[todo, seg] = True
        self.pairs += len(todo) * m


def per_noise_skew(
    loss_u: torch.Tensor, loss_t: torch.Tensor, eps: float, use_loss_ratio: bool
) -> torch.Tensor:
    """r [n, m]: the skew of each (image, noise) pair — the score formula's op, one term per sum."""
    n, m = loss_t.shape
    return skew_accumulate(
        loss_u.reshape(1, n * m, 1), loss_t.reshape(n * m, 1), eps, use_loss_ratio
    ).view(n, m)


class Screen:
    """The adaptive state of one target: which images are in the running, their sums."""

    def __init__(self, N: int, u: torch.Tensor):
        self.alive = torch.ones(N, dtype=torch.bool)  # compared for the top-k
        self.audit = torch.zeros(N, dtype=torch.bool)  # set aside, but evaluated on the whole bank
        self.sum_r = torch.zeros(N, dtype=torch.float64)  # Σ r over the noises seen
        self.sum_d = torch.zeros(N, dtype=torch.float64)  # Σ (r − c) (alive images)
        self.sum_d2 = torch.zeros(N, dtype=torch.float64)  # Σ (r − c)²
        self.depth = torch.zeros(N, dtype=torch.int64)  # noises seen
        self.u = u  # audit draws
        self.set_aside_at: dict = {}  # depth → count

    @property
    def running(self) -> torch.Tensor:
        return self.alive | self.audit

    def set_aside(self, k: int, z: float, M: int, p_audit: float) -> None:
        alive = self.alive.nonzero().squeeze(1)
        if len(alive) <= k:
            return
        m = int(self.depth[alive[0]])
        d = self.sum_d[alive] / m
        var = ((self.sum_d2[alive] - m * d * d) / (m - 1)).clamp_min(0)
        w = z * (var * (1 - m / M) / m).sqrt()
        tau = torch.topk(d - w, k).values[-1]
        out = alive[d + w < tau]
        if len(out):
            self.alive[out] = False
            self.audit[out[self.u[out] < p_audit]] = True
            self.set_aside_at[m] = self.set_aside_at.get(m, 0) + len(out)


def adaptive_scores(
    lp: LossPass,
    loss_t: LazyLossT,
    weights: dict,
    x,
    y,
    *,
    N: int,
    cfg,
    target_fps: Sequence[str],
    group,
    progress: Optional[Callable[[int], None]] = None,
) -> tuple:
    """(scores [K, N] float32, exact [K, N] bool, per-target infos) of the K copies `weights`
    ({name: [K, ...]}), on the CPU; `loss_t` gains the L_t pairs they use (and counts them).

    Work: per segment, each copy's images in the running are cut into chunks of `per` in position
    order and the chunks of all copies are dealt to the ranks in turn; per-noise sums come back per
    chunk and are added in chunk order, per-image sums are exact (one rank each). The chunks, the
    sums and so every decision are the same whatever the number of ranks."""
    bank = lp.bank
    M, k_top = bank.M, min(cfg.adaptive_top_k, N)
    m_s = screen_noises(M, cfg.adaptive_screen_noises)
    order = screening_order(bank.level)
    n_seg = math.ceil(M / m_s)
    checks = set(checkpoints(n_seg))
    K = next(iter(weights.values())).shape[0]
    models = [{n: w[j] for n, w in weights.items()} for j in range(K)]  # each copy on its own rows
    screens = [
        Screen(
            N,
            torch.rand(
                N,
                generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "audit", fp)),
                dtype=torch.float64,
            ),
        )
        for fp in target_fps
    ]
    pairs = [0] * K
    # the same image·noise pairs per forward as the exact pass
    per = max(1, lp.images_per_forward * M // m_s)
    with torch.inference_mode(), autocast_for(lp.device, lp.precision):
        for seg in range(n_seg):
            cols = order[seg * m_s : (seg + 1) * m_s]
            m = len(cols)
            idx = torch.cat([cols, cols[-1:].expand(m_s - m)])  # the last segment padded: one shape
            seg_lp = lp.segment(NoiseBank.select(bank, idx), per)
            need = torch.zeros(N, dtype=torch.bool)
            for sc in screens:
                need |= sc.running
            loss_t.ensure(seg_lp, x, y, need, seg, cols, m, group)
            inc = _segment_sums(
                seg_lp, loss_t, models, screens, x, y, cols, per, cfg, group, pairs, progress
            )
            for j, sc in enumerate(screens):
                running = sc.running
                if not torch.equal(inc[j, 3], running.double()):
                    raise RuntimeError(
                        f"adaptive scores of target {target_fps[j][:8]}, segment {seg}: "
                        f"{int((inc[j, 3] != running.double()).sum())} running images were "
                        "not scored exactly once; no result is returned"
                    )
                sc.sum_r += inc[j, 0]
                sc.sum_d += inc[j, 1]
                sc.sum_d2 += inc[j, 2]
                sc.depth[running] += m
                if seg + 1 in checks:
                    sc.set_aside(k_top, cfg.adaptive_margin, M, cfg.adaptive_audit)
    scores = torch.stack([(sc.sum_r / sc.depth.clamp_min(1)).float() for sc in screens])
    exact = torch.stack([sc.running for sc in screens])
    infos = [_audit(scores[j], exact[j], sc, pairs[j], k_top) for j, sc in enumerate(screens)]
    return scores, exact, infos


def _segment_sums(seg_lp, loss_t, models, screens, x, y, cols, per, cfg, group, pairs, progress):
    """One segment's per-image sums [K, 4, N] float64 — Σ r, Σ (r − c), Σ (r − c)² and how often
    the image was written (coverage.py) — over ranks. Each copy's running images are cut into
    chunks of `per` in position order and the chunks dealt to the ranks in turn; c, the per-noise
    mean skew of the alive images, is summed chunk by chunk in chunk order: the same on every
    rank."""
    K, N, m, dev = len(models), screens[0].running.numel(), len(cols), seg_lp.device
    cols_d = cols.to(dev)
    work = [
        (j, rc)
        for j, sc in enumerate(screens)
        for rc in torch.split(sc.running.nonzero().squeeze(1), per)
    ]
    csum = torch.zeros(
        len(work), m + 1, dtype=torch.float64
    )  # per chunk: Σ r over alive rows, count
    done_here = []  # this rank's chunks: (copy, rows, r)
    for w_i, (j, rc) in enumerate(work):
        pairs[j] += len(rc) * m
        if w_i % group.world != group.rank:
            continue
        xc, yc = seg_lp.gather(x, y, rc)
        L_u = seg_lp.losses([models[j]], xc, yc, seg_lp.bank.eps)[0, :m, : len(rc)].t()  # [n, m]
        L_t = loss_t.values[rc.to(dev)][:, cols_d]
        r = (
            per_noise_skew(L_u.float(), L_t, cfg.eps, cfg.use_loss_ratio).double().cpu()
        )  # stats: CPU
        a = screens[j].alive[rc]
        csum[w_i, :m], csum[w_i, m] = r[a].sum(0), a.sum()
        done_here.append((j, rc, r))
        if progress is not None:
            progress(len(rc) * m)
    group.sum_(csum)
    c = torch.zeros(K, m + 1, dtype=torch.float64)
    for w_i, (j, _) in enumerate(work):  # chunk order: the same sum on every rank
        c[j] += csum[w_i]
    inc = torch.zeros(K, 4, N, dtype=torch.float64)
    for j, rc, r in done_here:
        dr = r - c[j, :m] / c[j, m].clamp_min(1)
        inc[j, 0, rc] = r.sum(1)
        inc[j, 1, rc] = dr.sum(1)
        inc[j, 2, rc] = (dr * dr).sum(1)
        inc[j, 3, rc] += 1
    return group.sum_(inc)


def _audit(scores, exact, sc, pairs: int, k_top: int) -> dict:
    """One target's report: the work done, what was set aside, and the audit's misses with their
    Wilson 95 % interval (audited images that reach the final k-th best score)."""
    kth = torch.topk(scores[exact], min(k_top, int(exact.sum()))).values[-1]
    audited = int(sc.audit.sum())
    misses = int((scores[sc.audit] >= kth).sum())
    lo, hi = wilson(misses, audited)
    unaudited = int((~exact).sum())
    return {
        "pairs_evaluated": pairs,
        "exact": int(exact.sum()),
        "set_aside": unaudited + audited,
        "set_aside_at": {str(d): c for d, c in sorted(sc.set_aside_at.items())},
        "audited": audited,
        "audit_misses": misses,
        "miss_rate_95": [lo, hi],
        "expected_missed_95": [lo * unaudited, hi * unaudited],
    }
