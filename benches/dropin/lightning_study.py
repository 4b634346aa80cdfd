#!/usr/bin/env python
"""The drop-in in the reference's real surroundings (issue 19): the reference Attributor (github
sony/mucs, imported from a working copy OUTSIDE this repository) beside
`mucs_fast.compat.reference.Attributor` (fast=True: the engine; fast=False: the replay), each
constructed and run as the reference's attrib.py does it — inside a real `lightning.Fabric`
(CPU accelerator, `DDPStrategy(broadcast_buffers=False)`, `fabric.launch()`, the model through
`fabric.setup`, the training loader through `fabric.setup_dataloaders`) — on the reference's tiny
conditional `dit_edm` of the seed study (benches/dropin/seed_study.py: 300 digits, 16 targets).

Per implementation: wall time of `run()`, a phase table (L_null, L_t, unlearning, scoring, the
rest = fixed costs), each phase's FLOPs (torch.utils.flop_counter on the model, per image ×
images) and achieved GFLOP/s beside this CPU's fp32 GEMM rate at the same thread count
(benches/bench_gemm_rate.py: a large square and the model's own GEMM shapes); process start and
imports measured in fresh interpreters. Scores: replay vs reference (max |Δ| / score scale),
engine vs reference (the seed study's agreement), in the same run.

With --devices 2 Lightning's launcher re-runs this script as rank 1 (gloo); each rank compares
its own shard (the reference's ranks score only theirs).

Example (2-core CPU, one torch thread; fast-nopw / fast-medium: the engine without the pointwise
view / at attrib.py's matmul precision "medium"):
  .venv/bin/python benches/dropin/lightning_study.py --threads 1 \
      --impls ref,slow,fast,fast-nopw,fast-medium
  .venv/bin/python benches/dropin/lightning_study.py --threads 1 --impls ref,fast --num-noises 100 \
      --max-steps 60
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]
import refshim  # noqa: E402
import seed_study  # noqa: E402
from bench_gemm_rate import SQUARE, gemm_gflops, rate_over  # noqa: E402

DATE = "2026-12-03"
PHASES = ("L_null", "L_t", "unlearning", "scoring", "fixed")


def build_fabric(devices: int):
    """The Fabric as attrib.py builds it, on the CPU accelerator."""
    import lightning

    torch.use_deterministic_algorithms(True)
    torch.set_float32_matmul_precision("medium")
    fabric = lightning.Fabric(
        accelerator="cpu",
        devices=devices,
        num_nodes=1,
        strategy=lightning.fabric.strategies.DDPStrategy(broadcast_buffers=False),
        precision="32-true",
    )
    fabric.launch()
    return fabric


def cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (the reference's loader workers):
    the work done, which other jobs on a shared machine slow down far less than the wall time."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


class Clock:
    """Wall and CPU seconds per phase, accumulated (nested phases count once, in the outer)."""

    def __init__(self):
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.depth = 0

    @contextmanager
    def __call__(self, phase):
        self.depth += 1
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.wall[phase] += time.perf_counter() - t0
                self.cpu[phase] += cpu_seconds() - c0


def timed(cls, clock: Clock):
    """`cls` (the reference's Attributor or the drop-in) with its public phases timed: the
    first inference pass is L_t, later ones scoring (the replay calls the same methods)."""

    class Timed(cls):
        def estimate_null_loss(self, dl, *a, **k):
            with clock("L_null"):
                return super().estimate_null_loss(dl, *a, **k)

        def compute_inference_losses(self, model, dl, noiseinfo=None, force_y=None):
            with clock("L_t" if noiseinfo is None else "scoring"):
                return super().compute_inference_losses(model, dl, noiseinfo, force_y)

        def compute_unlearning(self, model, dl, xgen_i, ygen_i):
            with clock("unlearning"):
                return super().compute_unlearning(model, dl, xgen_i, ygen_i)

    return Timed


@contextmanager
def engine_timed(clock: Clock):
    """The engine's phases timed (mucs_fast.engine's module functions, restored after):
    resolve (L_null "auto", the bank, the loss pass) as L_null, L_t, K-target unlearning and
    scoring."""
    import mucs_fast.engine as E

    names = {
        "resolve": "L_null",
        "compute_loss_t": "L_t",
        "unlearn_block": "unlearning",
        "score_block": "scoring",
    }
    orig = {n: getattr(E, n) for n in names}

    def wrap(fn, phase):
        def f(*a, **k):
            with clock(phase):
                return fn(*a, **k)

        return f

    for n, phase in names.items():
        setattr(E, n, wrap(orig[n], phase))
    try:
        yield
    finally:
        for n, fn in orig.items():
            setattr(E, n, fn)


def run_impl(args, S, fabric, impl):
    """(all_idx, scores, {"wall": phase seconds, "cpu": phase CPU seconds}, extra)."""
    conf0, model, ds, xgen, ygen, method_path = S
    conf = copy.deepcopy(conf0)
    wrapped = fabric.setup(copy.deepcopy(model).eval())
    dl_train = fabric.setup_dataloaders(torch.utils.data.DataLoader(ds, batch_size=128))
    kw = dict(
        device=fabric.device,
        seed=args.seed,
        num_noises=args.num_noises,
        max_steps=args.max_steps,
        loss_null=args.loss_null if args.loss_null == "auto" else float(args.loss_null),
    )
    clock = Clock()
    extra = {}
    if impl == "ref":
        mucs, _, _ = refshim.import_reference(args.ref)
        cls = timed(mucs.Attributor, clock)
        opts = {}
    else:
        from mucs_fast.compat.reference import Attributor

        cls = timed(Attributor, clock)
        # fast-nopw / fast-medium: the engine without the pointwise view / at the caller's
        # matmul precision (attrib.py's "medium"), to show what each contributes
        opts = dict(
            fast=impl != "slow",
            targets_per_batch=args.targets_per_batch,
            progress=False,
            pointwise=impl != "fast-nopw",
            cpu_highest_precision=impl != "fast-medium",
        )
    t0, c0 = time.perf_counter(), cpu_seconds()
    with refshim.loader_workers(args.ref_workers if impl == "ref" else None), engine_timed(clock):
        att = cls(conf, fabric, wrapped, method_path, **kw, **opts)
        _, all_idx, scores = att.run(dl_train, xgen, ygen, {}, 10)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if impl.startswith("fast"):
        extra["steps"] = [x["steps"] for x in att.last_result.meta["targets"]]
    clock.wall["fixed"] = wall - sum(clock.wall[p] for p in PHASES if p != "fixed")
    clock.cpu["fixed"] = cpu - sum(clock.cpu[p] for p in PHASES if p != "fixed")
    times = {"wall": dict(clock.wall), "cpu": dict(clock.cpu), "wall_total": wall, "cpu_total": cpu}
    return all_idx.cpu(), scores.detach().float().cpu(), times, extra


# ----------------------------------------------------------------------------------------------
# FLOPs and the GEMM floor
# ----------------------------------------------------------------------------------------------
def model_flops(S, args):
    """(forward FLOPs per image·noise pair, fwd+bwd FLOPs per image as unlearning runs it (grads
    for the trainable weights only), the forward's GEMM shapes [(m, k, n, count)] at the
    reference's inference batch) — torch.utils.flop_counter on the real model."""
    from torch.utils.flop_counter import FlopCounterMode

    from mucs_fast.config import REFERENCE_FROZEN

    _, model, ds, _, _, _ = S
    b = max(1, 16 * args.num_noises // args.num_noises) * args.num_noises  # pairs per forward
    x, y = ds.x[:1].expand(b, *ds.x.shape[1:]).contiguous(), ds.y[:1].expand(b, -1).contiguous()
    sigma = torch.full((b,), 2.0)
    m = copy.deepcopy(model).eval()
    shapes = {}

    def hook(mod, inp, out):
        a = inp[0]
        key = (a.numel() // a.shape[-1], mod.in_features, mod.out_features)
        shapes[key] = shapes.get(key, 0) + 1

    hs = [
        mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, torch.nn.Linear)
    ]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x, sigma, y=y)
    for h in hs:
        h.remove()
    fwd = fc.get_total_flops() / b
    for name, p in m.named_parameters():
        p.requires_grad_(not any(t in name for t in REFERENCE_FROZEN))
    B = args.num_noises
    with FlopCounterMode(display=False) as fc:
        m(x[:B] + 1.0, sigma[:B], y=y[:B]).pow(2).mean().backward()
    fwdbwd = fc.get_total_flops() / B
    return fwd, fwdbwd, [(mm, k, n, c) for (mm, k, n), c in shapes.items()]


def phase_flops(args, N, K, fwd, fwdbwd, steps):
    """FLOPs per phase (both implementations do this arithmetic): L_null over min(200, N // B)
    batches of B, L_t = N·M forwards, scoring = K·N·M, unlearning per target: (s + 1) evaluated
    steps of 2B forwards (the stop check sees the losses of step s) and s backward passes."""
    B, M = args.num_noises, args.num_noises
    null = 0 if args.loss_null != "auto" else min(200, N // B) * B * fwd
    unlearn = sum((s + 1) * 2 * B * fwd + s * 2 * B * (fwdbwd - fwd) for s in steps)
    return {
        "L_null": null,
        "L_t": N * M * fwd,
        "unlearning": unlearn,
        "scoring": K * N * M * fwd,
        "fixed": 0,
    }


def profile_forward(S, pairs=1600, rows=12):
    """torch.profiler's top ops (self CPU) of the model's forward as the drop-in's engine runs it
    on the CPU (`pointwise_view`, precision "highest"), `pairs` image·noise pairs (its CPU score
    batch): where the non-GEMM time goes."""
    from torch.profiler import profile

    from mucs_fast.compat.pointwise import pointwise_view

    _, model, ds, _, _, _ = S
    view, _ = pointwise_view(copy.deepcopy(model).eval())
    g = torch.Generator().manual_seed(0)
    n = pairs // 16
    x = ds.x[:n].repeat(16, 1, 1, 1) + torch.randn(pairs, *ds.x.shape[1:], generator=g)
    y, sigma = ds.y[:n].repeat(16, 1), torch.rand(pairs, generator=g) * 5 + 0.3
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.inference_mode():
            view(x, sigma, y=y)
            with profile() as prof:
                for _ in range(3):
                    view(x, sigma, y=y)
    finally:
        torch.set_float32_matmul_precision(before)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def import_seconds(args) -> dict:
    """Fresh-interpreter seconds: bare start, + torch and lightning (attrib.py imports both),
    + the reference's Attributor module, + the drop-in (its module and the engine it runs)."""
    code = {
        "start": "pass",
        "torch+lightning": "import torch, lightning",
        "reference": (
            f"import sys; sys.path[:0] = [{HERE!r}]; import torch, lightning, refshim; "
            f"refshim.import_reference({args.ref!r})"
        ),
        "drop-in": (
            "import torch, lightning, mucs_fast.compat.reference, mucs_fast.engine, "
            "mucs_fast.compat.replay"
        ),
    }
    out = {}
    for k, c in code.items():
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", c], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        out[k] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------------------------
def compare(res, rank):
    """Replay and engine vs the reference, on the reference's ids (its rank's shard); the
    engine with the pointwise view vs without it."""
    out = {}
    pairs = [(i, "ref") for i in ("slow", "fast")]
    pairs += [("fast", "fast-nopw"), ("fast", "fast-medium")]
    for a, b in pairs:
        if a not in res or b not in res:
            continue
        bidx, bsc = res[b][0], res[b][1]
        scale = float(bsc.abs().max())
        idx, sc = res[a][0], res[a][1]
        pos = {int(i): j for j, i in enumerate(idx.tolist())}
        mine = sc[:, [pos[int(i)] for i in bidx.tolist()]]
        d = float((mine - bsc).abs().max())
        out[f"{a} vs {b}"] = {
            "max_abs_diff": d,
            "rel_to_scale": d / scale,
            "agreement": seed_study.agreement(mine, bsc),
            "score_scale": scale,
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", default="ref,slow,fast")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=45)
    p.add_argument("--ref", default=refshim.DEFAULT_REF)
    p.add_argument("--work", default="/tmp/dropin-work")
    p.add_argument("--out", default=os.path.join(HERE, "..", "results", f"dropin-lightning-{DATE}"))
    p.add_argument("--tag", default=None, help="result file name (default: from the settings)")
    p.add_argument("--targets", type=int, default=16)
    p.add_argument("--num-noises", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--loss-null", default="1.0")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--targets-per-batch", type=int, default=8)
    p.add_argument(
        "--ref-workers",
        type=int,
        default=None,
        help="the reference's DataLoader workers (default: its own 8)",
    )
    p.add_argument("--no-imports", action="store_true", help="skip the import timings")
    p.add_argument(
        "--profile",
        action="store_true",
        help="only print the profile of one forward as the engine runs it",
    )
    args = p.parse_args(argv)
    args.conditional = True
    fabric = build_fabric(args.devices)
    torch.set_num_threads(args.threads)  # after launch: Lightning's DDP sets its own count
    rank = fabric.global_rank
    S = seed_study.setup(args)
    if args.profile:
        print(profile_forward(S))
        return
    N, K = len(S[2]), S[3].shape[0]
    res = {}
    for impl in args.impls.split(","):
        res[impl] = run_impl(args, S, fabric, impl)
        t = res[impl][2]
        print(
            f"[rank {rank}] {impl}: wall {t['wall_total']:.1f} s, CPU {t['cpu_total']:.1f} s  "
            + " ".join(f"{k}={v:.2f}" for k, v in t["cpu"].items()),
            flush=True,
        )
    cmp = compare(res, rank)
    fwd, fwdbwd, shapes = model_flops(S, args)
    rates = {"square": gemm_gflops(*SQUARE), "model_shapes": rate_over(shapes)}
    steps = [args.max_steps] * K
    flops = phase_flops(args, N, K, fwd, fwdbwd, steps)
    report = {
        "date": DATE,
        "machine": {
            "threads": args.threads,
            "devices": args.devices,
            "rank": rank,
            "torch": torch.__version__,
            "nproc": os.cpu_count(),
        },
        "settings": {k: v for k, v in vars(args).items()},
        "N": N,
        "K": K,
        "fwd_flops_per_pair": fwd,
        "fwdbwd_flops_per_image": fwdbwd,
        "gemm_gflops": rates,
        "phase_flops": flops,
        "runs": {impl: {**r[2], "extra": r[3]} for impl, r in res.items()},
        "load_average": os.getloadavg(),
        "compare": cmp,
    }
    if rank == 0 and not args.no_imports:
        report["imports"] = import_seconds(args)
    tag = args.tag or f"s{args.seed}-K{K}-M{args.num_noises}-steps{args.max_steps}-d{args.devices}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{tag}-rank{rank}.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    torch.save(
        {impl: (r[0], r[1]) for impl, r in res.items()},
        os.path.join(args.out, f"{tag}-rank{rank}.pt"),
    )
    print_table(report)


def print_table(rep):
    fl, rates = rep["phase_flops"], rep["gemm_gflops"]
    print(
        f"\n[rank {rep['machine']['rank']}] N={rep['N']} K={rep['K']} "
        f"M={rep['settings']['num_noises']} steps={rep['settings']['max_steps']} "
        f"threads={rep['machine']['threads']}; fp32 GEMM: {rates['square']:.1f} GFLOP/s "
        f"(1024³), {rates['model_shapes']:.1f} GFLOP/s (the model's shapes); "
        f"load average {rep['load_average'][0]:.1f}"
    )
    impls = list(rep["runs"])
    print("CPU seconds (achieved GFLOP/s)")
    print("| phase | GFLOP | floor s (model shapes) | " + " | ".join(impls) + " |")
    for ph in PHASES:
        g = fl[ph] / 1e9
        floor = fl[ph] / 1e9 / rates["model_shapes"]
        cells = []
        for i in impls:
            s = rep["runs"][i]["cpu"][ph]
            cells.append(f"{s:.2f} ({g / s:.1f})" if g and s > 0 else f"{s:.2f}")
        print(f"| {ph} | {g:.2f} | {floor:.2f} | " + " | ".join(cells) + " |")
    for key in ("cpu_total", "wall_total"):
        print(f"| {key} | | | " + " | ".join(f"{rep['runs'][i][key]:.2f}" for i in impls) + " |")
    for k, v in rep.get("compare", {}).items():
        print(
            f"{k}: max|Δ| {v['max_abs_diff']:.3g} = {v['rel_to_scale']:.3g} of the score "
            f"scale ({v['score_scale']:.3g}); agreement {v['agreement']:.3f}"
        )
    if "imports" in rep:
        print(
            "imports (fresh interpreter, wall s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in rep["imports"].items())
        )


if __name__ == "__main__":
    main()
