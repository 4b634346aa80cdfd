#!/usr/bin/env python
"""Drop-in seed sensitivity (issue 9): the reference Attributor (github sony/mucs, imported from a
working copy outside this repository) beside `mucs_fast.compat.reference.Attributor`
(fast=True: the engine; fast=False: the replay of the reference's global random stream), on the
reference's own tiny `dit_edm` trained on sklearn digits, for a list of seeds.

Agreement = Spearman of target-centered scores (scores minus their mean over targets, per training
image), per target, averaged over targets.

Steps (each cached in --work / --out, so a rerun only computes what is missing):
  setup     train the tiny model with the reference's loss (or load it), make the targets with the
            reference's EDM Heun sampler (fixed per-target seeds)
  main      reference, drop-in fast=True and fast=False at every seed
  decomp    bank-only and unlearning-only seed variation, both implementations: the bank drawn from
            seed b while every unlearning draw comes from seed u (engine: `make_bank` patched;
            reference: its bank draw replaced after it was made, so its stream is unchanged)
  inject    the engine with the reference's own bank of the same seed
  bisect    the engine at --bisect-seeds fed the reference's own bank, then + its retain batches,
            + its training noise, + both (recorded from a reference run)
  lr        the engine with the learning rate divided twice (a candidate harness mistake:
            one conf object shared by two Attributors divides lr by lr_factor twice)
  table     print the agreement tables (and write table.json)

Example (2-core CPU, ≈ 30 min for everything at the defaults):
  .venv/bin/python benches/dropin/seed_study.py --steps setup,main,decomp,inject,lr,table
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import refshim  # noqa: E402

DATE = "2026-12-01"


def tiny_conf(conditional: bool, lr: float):
    """The reference's config layout (configs/*.yaml) at a tiny size: 2 DiT blocks, width 32,
    patch 4, 4 extra tokens, conditioning width 32, a 2-channel conv frontend (53,804 parameters
    conditional, 52,386 unconditional on 1×16×16)."""
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "seed": 44,
            "model": {
                "name": "dit_edm",
                "arch": {
                    "unconditional": not conditional,
                    "frontend": {"channels": [2], "resample": [1], "kern": 5, "last_factor": 4},
                    "dit": {
                        "patch_size": [4, 4],
                        "extra_tokens": 4,
                        "num_blocks": 2,
                        "num_channels": 32,
                        "num_heads": 2,
                        "mlp_ratio": 4,
                        "p_drop": 0.1,
                        "num_channels_cond": 32,
                    },
                },
                "loss": {"p_drop_cond": 0.1, "sigma_P": [-1.2, 1.2], "sigma_data": 0.5},
                "sampler": {
                    "num_steps": 16,
                    "sigma_min": 0.002,
                    "sigma_max": 80,
                    "cfg": 1.0,
                    "rho": 7,
                    "S_churn": 0,
                    "S_min": 0,
                    "S_max": 1e12,
                    "S_noise": 1.003,
                },
            },
            "training": {
                "ema": None,
                "batch_size": 64,
                "optim": {"name": "adamw", "lr": lr, "wd": 0.01},
            },
        }
    )


def digits(n: int):
    """The first n sklearn digits, 8×8 → 16×16 (bilinear), in [-1, 1]; one-hot labels [n, 10];
    dataset ids 0..n-1."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    y = torch.nn.functional.one_hot(torch.tensor(d.target[:n]).long(), 10).float()
    return torch.arange(n), x, y


# ----------------------------------------------------------------------------------------------
# setup: model and targets
# ----------------------------------------------------------------------------------------------
def setup(args):
    """(conf, model (eval, raw module), dataset, xgen [K,...], ygen [K, 10], method_path)."""
    from omegaconf import OmegaConf

    mucs, dit, pu = refshim.import_reference(args.ref)
    tag = f"dit_edm-{'cond' if args.conditional else 'uncond'}-n{args.n_train}-s{args.train_steps}"
    work = os.path.join(args.work, tag)
    os.makedirs(work, exist_ok=True)
    conf = tiny_conf(args.conditional, args.train_lr)
    ids, x, y = digits(args.n_train)
    ds = refshim.RefDataset(ids, x, y)
    # "<...>--pre/configuration.yaml": what the reference reads for loss_null="auto"
    method_path = os.path.join(work, "exp--mucs")
    os.makedirs(os.path.join(work, "exp--pre"), exist_ok=True)
    OmegaConf.save(conf, os.path.join(work, "exp--pre", "configuration.yaml"))
    ckpt = os.path.join(work, "model.pt")
    torch.manual_seed(0)
    model = dit.Model(conf.model, ds.meta)
    if os.path.exists(ckpt):
        model.load_state_dict(torch.load(ckpt, weights_only=True))
    else:
        t0 = time.time()
        opt = torch.optim.AdamW(model.parameters(), lr=args.train_lr, weight_decay=0.01)
        g = torch.Generator().manual_seed(1)
        model.train()
        for step in range(args.train_steps):
            b = torch.randint(0, len(ids), (64,), generator=g)
            loss, _ = model.loss(x[b], y=y[b])  # the reference's training loss (label drop 0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 500 == 0 or step == args.train_steps - 1:
                print(f"  train step {step}: loss {loss.item():.4f}", flush=True)
        torch.save(model.state_dict(), ckpt)
        print(f"  trained {args.train_steps} steps in {time.time() - t0:.1f} s")
    model.eval()
    tfile = os.path.join(work, f"targets-{args.targets}.pt")
    if os.path.exists(tfile):
        xgen, ygen = torch.load(tfile, weights_only=True)
    else:
        K = args.targets
        ygen = torch.nn.functional.one_hot(torch.arange(K) % 10, 10).float()
        rng = pu.StackedRandomGenerator(seeds=[1000 + k for k in range(K)])
        with torch.no_grad():
            xgen = model.generate(y=ygen, rng=rng).clamp(-1, 1)
        torch.save([xgen, ygen], tfile)
    print(
        f"  model {tag}: {sum(p.numel() for p in model.parameters())} parameters, "
        f"conditional={not model.unconditional}; targets {tuple(xgen.shape)}"
    )
    return conf, model, ds, xgen, ygen, method_path


# ----------------------------------------------------------------------------------------------
# one attribution run
# ----------------------------------------------------------------------------------------------
@contextmanager
def engine_bank(bank_seed=None, bank_eps=None):
    """Patch `mucs_fast.engine.make_bank`: the bank from another seed, or a given ε [M, C, H, W]
    (levels: the engine's own deterministic grid)."""
    import mucs_fast.engine as E

    orig = E.make_bank
    if bank_seed is None and bank_eps is None:
        yield
        return

    def make_bank(den, chw, cfg, t_sched):
        if bank_eps is not None:
            level = den.inference_levels(cfg.num_noises, t_sched)
            return E.NoiseBank(bank_eps.clone(), level.to(den.level_dtype))
        c = copy.copy(cfg)
        c.seed = bank_seed
        return orig(den, chw, c, t_sched)

    E.make_bank = make_bank
    try:
        yield
    finally:
        E.make_bank = orig


def reference_bank_eps(seed: int, M: int, chw):
    """ε of the reference's inference bank at `seed` when loss_null is a number and t_sched is not
    "auto": after seed_everything, the inference DataLoader's iterator draws one int64, then
    get_noise_info draws randn([M, C, H, W]) (the σ grid is deterministic)."""
    torch.manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_()
    return torch.randn([M, *chw])


def run_one(args, S, impl, seed, bank_seed=None, lr_twice=False, inject_ref_bank=False):
    """scores [K, N] (cpu float32), seconds, extra dict."""
    conf0, model, ds, xgen, ygen, method_path = S
    mucs, _, _ = refshim.import_reference(args.ref)
    conf = copy.deepcopy(conf0)  # every Attributor divides conf.training.optim.lr in place
    if lr_twice:
        conf.training.optim.lr /= 10
    fabric = refshim.CPUFabric("cpu")
    wrapped = refshim.Wrapped(copy.deepcopy(model).eval())
    dl = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False)
    kw = dict(
        device="cpu",
        seed=seed,
        num_noises=args.num_noises,
        max_steps=args.max_steps,
        loss_null=args.loss_null if args.loss_null == "auto" else float(args.loss_null),
    )
    extra = {}
    t0 = time.time()
    if impl == "ref":
        bank = None
        if bank_seed is not None and bank_seed != seed:
            chw = list(ds.x.shape[1:])
            bank = reference_bank_eps(bank_seed, args.num_noises, chw)

        class RefAttributor(mucs.Attributor):
            _bank_eps = bank

            def get_noise_info(self, size, training=False):
                noise, sigma = super().get_noise_info(size, training)  # same draws as always
                if (
                    not training
                    and self._bank_eps is not None
                    and list(size[1:]) == list(self._bank_eps.shape[1:])
                    and size[0] == self.num_noises
                ):
                    noise = sigma.view(-1, 1, 1, 1) * self._bank_eps.to(noise.device)
                    self._bank_eps = None  # only the bank draw (the first inference draw)
                return noise, sigma

        with refshim.loader_workers(args.ref_workers):
            att = RefAttributor(conf, fabric, wrapped, method_path, **kw)
            _, _, scores = att.run(dl, xgen, ygen, {}, 10)
    else:
        from mucs_fast.compat.reference import Attributor

        if impl == "slow" and bank_seed is not None and bank_seed != seed:
            raise ValueError("bank_seed is for ref and fast")
        bank_eps = (
            reference_bank_eps(seed, args.num_noises, list(ds.x.shape[1:]))
            if inject_ref_bank
            else None
        )
        with engine_bank(bank_seed=None if bank_seed == seed else bank_seed, bank_eps=bank_eps):
            att = Attributor(
                conf,
                fabric,
                wrapped,
                method_path,
                fast=(impl == "fast"),
                targets_per_batch=args.targets_per_batch,
                progress=False,
                **kw,
            )
            _, _, scores = att.run(dl, xgen, ygen, {}, 10)
        if impl == "fast" and att.last_result is not None:
            meta = att.last_result.meta
            extra["steps"] = [t["steps"] for t in meta["targets"]]
            extra["lr"] = meta["resolved"]["lr"]
    secs = time.time() - t0
    return scores.detach().float().cpu(), secs, extra


# ----------------------------------------------------------------------------------------------
# bisection: the engine fed the reference's own random draws, one source at a time
# ----------------------------------------------------------------------------------------------
class LogDataset(refshim.RefDataset):
    """Logs every item index read (the reference's loaders run in-process: --ref-workers 0)."""

    def __init__(self, ids, x, y):
        super().__init__(ids, x, y)
        self.log = []

    def __getitem__(self, i):
        self.log.append(int(i))
        return super().__getitem__(i)


def record_reference(args, S, seed):
    """Run the reference at `seed` and record, per target, its retain batches (dataset positions,
    one per evaluated step) and the global RNG state before each training-noise draw (retain, then
    forget, per step). Returns (scores, [{"ids": [[B]...], "states": [...]}] per target)."""
    conf0, model, ds, xgen, ygen, method_path = S
    mucs, _, _ = refshim.import_reference(args.ref)
    lds = LogDataset(ds.ids, ds.x, ds.y)
    rec = []

    class Rec(mucs.Attributor):
        _cur = None

        def compute_unlearning(self, model, dl, xgen_i, ygen_i):
            Rec._cur = {"ids": [], "states": []}
            rec.append(Rec._cur)
            try:
                return super().compute_unlearning(model, dl, xgen_i, ygen_i)
            finally:
                Rec._cur = None

        def get_noise_info(self, size, training=False):
            if training and Rec._cur is not None:
                cur = Rec._cur
                if len(cur["states"]) % 2 == 0:  # the retain draw: its batch was just read
                    cur["ids"].append(list(lds.log[-size[0] :]))
                cur["states"].append(torch.get_rng_state())
            return super().get_noise_info(size, training)

    dl = torch.utils.data.DataLoader(lds, batch_size=64, shuffle=False)
    with refshim.loader_workers(0):
        att = Rec(
            copy.deepcopy(conf0),
            refshim.CPUFabric("cpu"),
            refshim.Wrapped(copy.deepcopy(model).eval()),
            method_path,
            device="cpu",
            seed=seed,
            num_noises=args.num_noises,
            max_steps=args.max_steps,
            loss_null=float(args.loss_null),
        )
        _, _, scores = att.run(dl, xgen, ygen, {}, 10)
    return scores.detach().float().cpu(), rec


@contextmanager
def engine_replay(rec, retain: bool, noise: bool):
    """Patch `mucs_fast.engine.target_streams` (targets are taken in order) so that target k's
    retain batches and/or training noise are the reference's (`rec[k]`): the noise by loading the
    recorded global-RNG state into a generator before each draw (the engine draws σ then ε like
    the reference)."""
    import mucs_fast.engine as E
    from mucs_fast.denoisers import EDMDenoiser

    orig_streams, orig_noise = E.target_streams, EDMDenoiser.training_noise
    queues = {}
    counter = [0]

    class Replay:
        def __init__(self, batches):
            self.it = iter(batches)

        def __iter__(self):
            return self

        def __next__(self):
            return torch.tensor(next(self.it), dtype=torch.int64)

    def target_streams(cfg, fp, N, device):
        k = counter[0]
        counter[0] += 1
        r, g, s = orig_streams(cfg, fp, N, device)
        if retain:
            r = Replay(rec[k]["ids"])
        if noise:
            g = torch.Generator()
            queues[id(g)] = list(rec[k]["states"])
        return r, g, s

    def training_noise(self, shape, generator=None, t_sched=None, device=None):
        q = queues.get(id(generator))
        if q is not None:
            g = torch.Generator()
            g.set_state(q.pop(0))
            return orig_noise(self, shape, g, t_sched, device)
        return orig_noise(self, shape, generator, t_sched, device)

    E.target_streams, EDMDenoiser.training_noise = target_streams, training_noise
    try:
        yield
    finally:
        E.target_streams, EDMDenoiser.training_noise = orig_streams, orig_noise


def bisect(args, S, st, seed):
    """The engine (fast=True) at `seed` with, in turn: the reference's bank; + its retain batches;
    + its training noise (bank kept); + both. Scores stored as fast-s<seed>-<variant>."""
    conf0, model, ds, xgen, ygen, method_path = S
    from mucs_fast.compat.reference import Attributor

    variants = {
        "refbank": (False, False),
        "refbank+retain": (True, False),
        "refbank+noise": (False, True),
        "refbank+retain+noise": (True, True),
    }
    todo = [v for v in variants if st.get(st.key("fast", seed, None, v)) is None]
    if not todo:
        return
    t0 = time.time()
    ref_scores, rec = record_reference(args, S, seed)
    print(
        f"  recorded the reference at seed {seed} ({time.time() - t0:.1f} s); "
        f"max |Δ| vs ref-s{seed}: "
        f"{_max_diff(ref_scores, st.get(st.key('ref', seed)))}"
    )
    bank_eps = reference_bank_eps(seed, args.num_noises, list(ds.x.shape[1:]))
    for v in todo:
        retain, noise = variants[v]
        t0 = time.time()
        with engine_bank(bank_eps=bank_eps), engine_replay(rec, retain, noise):
            att = Attributor(
                copy.deepcopy(conf0),
                refshim.CPUFabric("cpu"),
                refshim.Wrapped(copy.deepcopy(model).eval()),
                method_path,
                device="cpu",
                seed=seed,
                num_noises=args.num_noises,
                max_steps=args.max_steps,
                loss_null=float(args.loss_null),
                fast=True,
                targets_per_batch=args.targets_per_batch,
                progress=False,
            )
            _, _, scores = att.run(
                torch.utils.data.DataLoader(ds, batch_size=64), xgen, ygen, {}, 10
            )
        scores = scores.detach().float().cpu()
        st.put(st.key("fast", seed, None, v), scores, time.time() - t0, {})
        print(
            f"  fast-s{seed}-{v}: vs ref {agreement(scores, ref_scores):.4f} centered, "
            f"max |Δ| {float((scores - ref_scores).abs().max()):.2e}",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------
# agreement
# ----------------------------------------------------------------------------------------------
def centered(s: torch.Tensor) -> np.ndarray:
    s = s.double().numpy()
    return s - s.mean(0, keepdims=True)


def agreement(a: torch.Tensor, b: torch.Tensor, center=True) -> float:
    """Mean over targets of the Spearman correlation of (target-centered) scores."""
    from scipy.stats import spearmanr

    A, B = (centered(a), centered(b)) if center else (a.double().numpy(), b.double().numpy())
    return float(np.mean([spearmanr(A[k], B[k]).statistic for k in range(A.shape[0])]))


def msd(v):
    v = [x for x in v if x is not None and math.isfinite(x)]
    if not v:
        return None
    return {
        "mean": float(np.mean(v)),
        "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
        "min": float(np.min(v)),
        "max": float(np.max(v)),
        "n": len(v),
    }


def fmt(d):
    return (
        "—"
        if d is None
        else f"{d['mean']:.3f} ± {d['sd']:.3f} [{d['min']:.3f}, {d['max']:.3f}] (n={d['n']})"
    )


# ----------------------------------------------------------------------------------------------
class Store:
    """Scores per run key under --out (one .pt each) and their timings in runs.json."""

    def __init__(self, out):
        self.out = out
        os.makedirs(out, exist_ok=True)
        self.jf = os.path.join(out, "runs.json")
        self.runs = json.load(open(self.jf)) if os.path.exists(self.jf) else {}

    def key(self, impl, seed, bank=None, variant=""):
        return (
            f"{impl}-s{seed}"
            + (f"-b{bank}" if bank is not None and bank != seed else "")
            + (f"-{variant}" if variant else "")
        )

    def get(self, key):
        p = os.path.join(self.out, key + ".pt")
        return torch.load(p, weights_only=True) if os.path.exists(p) else None

    def put(self, key, scores, secs, extra):
        torch.save(scores, os.path.join(self.out, key + ".pt"))
        self.runs[key] = {"seconds": round(secs, 2), **extra}
        json.dump(self.runs, open(self.jf, "w"), indent=1)


def ensure(args, S, st, impl, seed, bank=None, variant=""):
    key = st.key(impl, seed, bank, variant)
    s = st.get(key)
    if s is None:
        if S is None:
            return None
        s, secs, extra = run_one(
            args,
            S,
            impl,
            seed,
            bank_seed=bank,
            lr_twice=(variant == "lr2"),
            inject_ref_bank=(variant == "refbank"),
        )
        st.put(key, s, secs, extra)
        print(f"  {key}: {secs:.1f} s", flush=True)
    return s


def pairs_stats(runs: dict):
    """Agreement over all unordered pairs of a {label: scores} dict."""
    return msd([agreement(runs[a], runs[b]) for a, b in itertools.combinations(sorted(runs), 2)])


def bootstrap_gap(R: dict, F: dict, B: int = 2000) -> dict:
    """The drop-in's self-agreement across seeds minus the reference's, with a 95 % percentile
    interval from resampling seeds (each implementation's runs resampled independently: they share
    no random numbers; pairs of a resampled seed with itself are left out)."""

    def matrix(runs):
        keys = sorted(runs)
        A = np.full((len(keys), len(keys)), np.nan)
        for (i, a), (j, b) in itertools.combinations(enumerate(keys), 2):
            A[i, j] = A[j, i] = agreement(runs[a], runs[b])
        return A

    def mean_pairs(A, idx):
        sub = A[np.ix_(idx, idx)]
        distinct = idx[:, None] != idx[None, :]
        return float(np.nanmean(np.where(distinct, sub, np.nan)))

    Ar, Af = matrix(R), matrix(F)
    rng = np.random.default_rng(0)
    gaps = [
        mean_pairs(Af, rng.integers(0, len(F), len(F)))
        - mean_pairs(Ar, rng.integers(0, len(R), len(R)))
        for _ in range(B)
    ]
    point = mean_pairs(Af, np.arange(len(F))) - mean_pairs(Ar, np.arange(len(R)))
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    return {"gap": point, "ci95": [float(lo), float(hi)], "seeds": [len(R), len(F)]}


def table(args, st, S=None):
    seeds = args.seeds
    get = lambda impl, s, b=None, v="": (  # noqa: E731
        ensure(args, S, st, impl, s, b, v) if S is not None else st.get(st.key(impl, s, b, v))
    )  # noqa: E731
    R = {s: get("ref", s) for s in seeds}
    F = {s: get("fast", s) for s in seeds}
    L = {s: get("slow", s) for s in seeds}
    R, F, L = ({s: v for s, v in d.items() if v is not None} for d in (R, F, L))
    out = {
        "settings": {
            k: getattr(args, k)
            for k in (
                "seeds",
                "targets",
                "num_noises",
                "max_steps",
                "loss_null",
                "n_train",
                "conditional",
                "train_steps",
                "targets_per_batch",
            )
        }
    }
    rows = []

    def row(name, d):
        out[name] = d
        rows.append((name, d))

    row("ref vs ref, across seeds", pairs_stats(R))
    row("fast vs fast, across seeds", pairs_stats(F))
    row("fast vs ref, same seed", msd([agreement(F[s], R[s]) for s in seeds if s in F and s in R]))
    row(
        "fast vs ref, different seeds", msd([agreement(F[a], R[b]) for a in F for b in R if a != b])
    )
    if len(R) > 2 and len(F) > 2:
        out["fast self − ref self, seed bootstrap"] = bootstrap_gap(R, F)
    row(
        "slow vs ref, same seed (agreement)",
        msd([agreement(L[s], R[s]) for s in seeds if s in L and s in R]),
    )
    diffs = [float((L[s] - R[s]).abs().max()) for s in seeds if s in L and s in R]
    out["slow vs ref, same seed: max |Δ score|"] = max(diffs) if diffs else None
    row(
        "ref vs ref, across seeds, UNcentered",
        msd([agreement(R[a], R[b], center=False) for a, b in itertools.combinations(sorted(R), 2)]),
    )
    row(
        "fast vs fast, across seeds, UNcentered",
        msd([agreement(F[a], F[b], center=False) for a, b in itertools.combinations(sorted(F), 2)]),
    )
    # the setting: 4 targets, centered over those 4 (the first 4 targets of a run are what a
    # 4-target run computes, in both implementations); every consecutive group of 4 as a replicate
    G = args.targets // 4
    g4 = lambda t, g: t[4 * g : 4 * g + 4]  # noqa: E731
    if R and F:
        row(
            "4-target groups: ref vs ref, across seeds",
            msd(
                [
                    agreement(g4(R[a], g), g4(R[b], g))
                    for a, b in itertools.combinations(sorted(R), 2)
                    for g in range(G)
                ]
            ),
        )
        row(
            "4-target groups: fast vs fast, across seeds",
            msd(
                [
                    agreement(g4(F[a], g), g4(F[b], g))
                    for a, b in itertools.combinations(sorted(F), 2)
                    for g in range(G)
                ]
            ),
        )
        row(
            "4-target groups: fast vs ref, same seed",
            msd(
                [
                    agreement(g4(F[s], g), g4(R[s], g))
                    for s in seeds
                    if s in F and s in R
                    for g in range(G)
                ]
            ),
        )
        if len(seeds) > 1 and seeds[0] in R and seeds[1] in R and seeds[0] in F and seeds[1] in F:
            a, b = seeds[:2]
            first4 = {
                "ref a/b": agreement(g4(R[a], 0), g4(R[b], 0)),
                "fast a/b": agreement(g4(F[a], 0), g4(F[b], 0)),
                "fast a vs ref a": agreement(g4(F[a], 0), g4(R[a], 0)),
                "fast b vs ref b": agreement(g4(F[b], 0), g4(R[b], 0)),
                "fast a vs ref b": agreement(g4(F[a], 0), g4(R[b], 0)),
                "fast b vs ref a": agreement(g4(F[b], 0), g4(R[a], 0)),
            }
            out[f"first 4 targets, seeds a={a} b={b}"] = first4
    per_seed = {
        s: {
            "fast vs ref": agreement(F[s], R[s]),
            "fast vs other fast (mean)": float(
                np.mean([agreement(F[s], F[t]) for t in F if t != s])
            ),
            "ref vs other ref (mean)": float(np.mean([agreement(R[s], R[t]) for t in R if t != s])),
        }
        for s in seeds
        if s in F and s in R
    }
    out["per seed"] = per_seed
    # bank-only / unlearning-only variation
    u0, b0 = seeds[0], seeds[0]
    for impl in ("ref", "fast"):
        bank_var = {b: get(impl, u0, b) for b in seeds}
        unl_var = {u: get(impl, u, b0) for u in seeds}
        bank_var = {k: v for k, v in bank_var.items() if v is not None}
        unl_var = {k: v for k, v in unl_var.items() if v is not None}
        if len(bank_var) > 1:
            row(f"{impl}: bank seed varied (unlearning seed {u0})", pairs_stats(bank_var))
        if len(unl_var) > 1:
            row(f"{impl}: unlearning seed varied (bank seed {b0})", pairs_stats(unl_var))
    # engine with the reference's bank
    FB = {s: get("fast", s, None, "refbank") for s in seeds}
    FB = {k: v for k, v in FB.items() if v is not None}
    if FB:
        row("fast+ref bank vs ref, same seed", msd([agreement(FB[s], R[s]) for s in FB if s in R]))
        row(
            "fast+ref bank vs fast+ref bank, across seeds", pairs_stats(FB) if len(FB) > 1 else None
        )
    for v in ("refbank+retain", "refbank+noise", "refbank+retain+noise"):
        FV = {s: st.get(st.key("fast", s, None, v)) for s in seeds}
        FV = {k: x for k, x in FV.items() if x is not None}
        if FV:
            row(f"fast+{v} vs ref, same seed", msd([agreement(FV[s], R[s]) for s in FV if s in R]))
            out[f"fast+{v} vs ref, same seed: max |Δ score|"] = max(
                float((FV[s] - R[s]).abs().max()) for s in FV if s in R
            )
    F2 = {s: get("fast", s, None, "lr2") for s in seeds}
    F2 = {k: v for k, v in F2.items() if v is not None}
    if F2:
        row(
            "fast, lr divided twice, vs ref, same seed",
            msd([agreement(F2[s], R[s]) for s in F2 if s in R]),
        )
        row("fast, lr divided twice, across seeds", pairs_stats(F2) if len(F2) > 1 else None)
    # score scale (how much the unlearning moved anything)
    if R and F:
        out["mean |score| ref / fast"] = [
            float(np.mean([R[s].abs().mean() for s in R])),
            float(np.mean([F[s].abs().mean() for s in F])),
        ]
        out["sd over targets of centered score ref / fast"] = [
            float(np.mean([centered(R[s]).std() for s in R])),
            float(np.mean([centered(F[s]).std() for s in F])),
        ]
    print(
        f"\nAgreement (Spearman of target-centered scores, mean over {args.targets} targets), "
        f"mean ± sd [min, max] over pairs:"
    )
    for name, d in rows:
        print(f"  {name:52s} {fmt(d)}")
    for k in [k for k in out if k.startswith("first 4 targets")] + ["per seed"]:
        print(f"  {k}: " + json.dumps(out[k], default=lambda v: round(v, 3)).replace('"', ""))
    for k in [k for k in out if "max |Δ" in k and k.startswith("fast+")] + [
        "slow vs ref, same seed: max |Δ score|",
        "mean |score| ref / fast",
        "sd over targets of centered score ref / fast",
    ]:
        if k in out:
            print(f"  {k:52s} {out[k]}")
    json.dump(out, open(os.path.join(st.out, "table.json"), "w"), indent=1)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps",
        default="setup,main,table",
        help="comma list of: setup, main, decomp, inject, bisect, lr, table (default "
        "setup,main,table)",
    )
    p.add_argument(
        "--ref",
        default=refshim.DEFAULT_REF,
        help="reference working copy (extracted from the mirror if missing)",
    )
    p.add_argument(
        "--work", default="/tmp/dropin-work", help="model/targets cache (outside the repo)"
    )
    p.add_argument(
        "--out",
        default=os.path.join(HERE, "..", "results", f"dropin-{DATE}"),
        help="scores (.pt per run), runs.json, table.json",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[45, 46, 47, 48, 49])
    p.add_argument(
        "--slow-seeds",
        type=int,
        nargs="*",
        default=None,
        help="seeds of the fast=False replay runs (default: the first seed only)",
    )
    p.add_argument("--bisect-seeds", type=int, nargs="*", default=[45, 46])
    p.add_argument("--targets", type=int, default=16)
    p.add_argument("--num-noises", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--loss-null", default="1.0", help='a number or "auto"')
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument(
        "--train-lr", type=float, default=1e-3, help="training lr (unlearning: / lr_factor 10)"
    )
    p.add_argument(
        "--unconditional",
        dest="conditional",
        action="store_false",
        help="an unconditional tiny model (default: class-conditional, label_dim 10)",
    )
    p.add_argument("--targets-per-batch", type=int, default=8)
    p.add_argument(
        "--ref-workers",
        type=int,
        default=0,
        help="DataLoader workers of the reference (its own: 8; -1: leave them)",
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.ref_workers = None if args.ref_workers < 0 else args.ref_workers
    torch.set_num_threads(args.threads)
    steps = args.steps.split(",")
    st = Store(os.path.abspath(args.out))
    S = setup(args) if set(steps) - {"table"} else None
    seeds = args.seeds
    if "main" in steps:
        for s in seeds:
            for impl in ("ref", "fast"):
                ensure(args, S, st, impl, s)
        for s in args.slow_seeds if args.slow_seeds is not None else seeds[:1]:
            ensure(args, S, st, "slow", s)
    if "decomp" in steps:
        for v in seeds[1:]:  # interleaved, so that a partial run is balanced
            for impl in ("ref", "fast"):
                ensure(args, S, st, impl, seeds[0], v)  # bank from seed v, unlearning from seeds[0]
                ensure(args, S, st, impl, v, seeds[0])  # bank from seeds[0], unlearning from seed v
    if "inject" in steps:
        for s in seeds:
            ensure(args, S, st, "fast", s, None, "refbank")
    if "bisect" in steps:
        for s in args.bisect_seeds:
            bisect(args, S, st, s)
    if "lr" in steps:
        for s in seeds:
            ensure(args, S, st, "fast", s, None, "lr2")
    if "table" in steps:
        table(args, st)


def _max_diff(a, b):
    return "n/a" if b is None else float((a - b).abs().max())


if __name__ == "__main__":
    main()
