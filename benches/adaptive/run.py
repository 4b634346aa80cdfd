#!/usr/bin/env python
"""Adaptive scoring (issue 11) against exact scoring, same run, same machine: forwards saved, wall
time, top-k recall vs exact and Spearman on the exactly scored images.

Models: `demo` (the `mucs-fast demo` DiT on sklearn digits 16×16, cached like the demo's), `unet` (a
tiny class-conditional diffusers UNet2DModel trained briefly on the same digits, cached in --work).
Targets: the model's own samples (EDM Heun / DDIM), seeds 1000 + k, labels k mod 10. One exact run,
then one adaptive run per (k, margin) — each run unlearns again (the same weights: the streams are
per target).

  .venv/bin/python benches/adaptive/run.py --model demo --threads 2
  .venv/bin/python benches/adaptive/run.py --model unet --train-steps 1500 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import mucs_fast as mf  # noqa: E402


def demo_problem(args):
    from mucs_fast.cli import DEMO, demo_model
    from mucs_fast.data import load_digits
    from mucs_fast.sample import sample_edm

    x, y = load_digits(16)
    ns = SimpleNamespace(
        train_steps=DEMO["default"]["train_steps"], seed=45, cache_dir=None, no_cache=False
    )
    den, _, _ = demo_model(ns, x, y, torch.device("cpu"))
    seeds = list(range(1000, 1000 + args.targets))
    ty = torch.arange(args.targets) % 10
    t = sample_edm(den, seeds, ty, device="cpu", progress=False).clamp(-1, 1)
    return den, x, y, t, ty


def unet_problem(args):
    from mucs_fast.data import load_digits
    from mucs_fast.models.unet import ddpm_scheduler, tiny_unet
    from mucs_fast.sample import sample_vp
    from mucs_fast.train import train

    x, y = load_digits(16)
    os.makedirs(args.work, exist_ok=True)
    path = os.path.join(args.work, f"unet-digits16-s{args.train_steps}.pt")
    torch.manual_seed(0)
    model = tiny_unet(1, 16, num_classes=10)
    den = mf.DiffusersDenoiser(model, ddpm_scheduler(1000), train_lr=2e-3, num_classes=10)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        t0 = time.perf_counter()
        den, info = train(
            den, x, y, steps=args.train_steps, batch_size=128, lr=2e-3, seed=0, progress=True
        )
        print(
            f"trained the UNet {args.train_steps} steps in {time.perf_counter() - t0:.0f} s, "
            f"last loss {sum(info['loss'][-50:]) / 50:.4f}"
        )
        torch.save(den.net.state_dict(), path)
    den.net.eval()
    seeds = list(range(1000, 1000 + args.targets))
    ty = torch.arange(args.targets) % 10
    t = sample_vp(den, seeds, ty, num_steps=50, device="cpu", progress=False)
    return den, x, y, t, ty


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def compare(exact: mf.Attribution, res: mf.Attribution, k: int) -> dict:
    K = exact.K
    recall = [
        len(set(exact.topk(k)[t].tolist()) & set(res.topk(k)[t].tolist())) / k for t in range(K)
    ]
    rho = [spearman(exact.scores[t][res.exact[t]], res.scores[t][res.exact[t]]) for t in range(K)]
    pe = sum(exact.meta["pairs_evaluated"]) + exact.meta["pairs_evaluated_original"]
    pa = sum(res.meta["pairs_evaluated"]) + res.meta["pairs_evaluated_original"]
    tim_e, tim_a = exact.meta["timings"], res.meta["timings"]
    score_e = (
        tim_e["score"] + tim_e["loss_t"]
    )  # exact: L_t is its own phase; adaptive: inside scoring
    aud = res.meta["adaptive"]["targets"]
    return {
        "k": k,
        "margin": res.meta["adaptive"]["margin"],
        "screen_noises": res.meta["adaptive"]["screen_noises"],
        "recall_mean": sum(recall) / K,
        "recall_min": min(recall),
        "recall": recall,
        "spearman_exact_scored": sum(rho) / K,
        "exact_fraction": float(res.exact.float().mean()),
        "forwards_exact": pe,
        "forwards_adaptive": pa,
        "forwards_ratio": pe / pa,
        "forwards_ratio_unlearned": sum(exact.meta["pairs_evaluated"])
        / sum(res.meta["pairs_evaluated"]),
        "scoring_s_exact": score_e,
        "scoring_s_adaptive": tim_a["score"],
        "scoring_speedup": score_e / tim_a["score"],
        "total_s_exact": tim_e["total"],
        "total_s_adaptive": tim_a["total"],
        "audit": {
            "audited": sum(a["audited"] for a in aud),
            "misses": sum(a["audit_misses"] for a in aud),
            "expected_missed_95_hi": sum(a["expected_missed_95"][1] for a in aud),
        },
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=["demo", "unet"], default="demo")
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--num-noises", type=int, default=100)
    p.add_argument("--k", type=int, nargs="+", default=None, help="default: 2 %% of N and 100")
    p.add_argument("--margins", type=float, nargs="+", default=[3.0])
    p.add_argument("--screen-noises", type=int, default=None)
    p.add_argument("--train-steps", type=int, default=1500, help="UNet training steps")
    p.add_argument("--work", default="/tmp/adaptive-work")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out",
        default=None,
        help="JSON file (default benches/results/cpu-<date>-adaptive-<model>.json)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    den, x, y, t, ty = (demo_problem if args.model == "demo" else unet_problem)(args)
    N = len(x)
    ks = args.k or [max(1, round(0.02 * N)), 100]
    base = {"num_noises": args.num_noises, "targets_per_batch": args.targets, "seed": 45}
    if den.train_lr is None:
        base["lr"] = 2e-4
    print(
        f"{args.model}: N={N}, K={args.targets}, M={args.num_noises}, k={ks}, "
        f"margins={args.margins}"
    )
    exact = mf.attribute(den, x, t, mf.MUCSConfig(**base), y, ty, progress=False, cache_dir=None)
    print(
        f"exact: total {exact.meta['timings']['total']:.1f} s, steps "
        f"{[i['steps'] for i in exact.meta['targets']]}"
    )
    rows = []
    for k in ks:
        for z in args.margins:
            cfg = mf.MUCSConfig(
                **base,
                adaptive_top_k=k,
                adaptive_margin=z,
                adaptive_screen_noises=args.screen_noises,
            )
            res = mf.attribute(den, x, t, cfg, y, ty, progress=False, cache_dir=None)
            row = compare(exact, res, k)
            rows.append(row)
            print(
                f"k={k:4d} z={z:g}: forwards ÷{row['forwards_ratio']:.2f} (unlearned "
                f"÷{row['forwards_ratio_unlearned']:.2f}), "
                f"scoring {row['scoring_s_exact']:.1f} → {row['scoring_s_adaptive']:.1f} s "
                f"(×{row['scoring_speedup']:.2f}), "
                f"recall {row['recall_mean']:.3f} (min {row['recall_min']:.3f}), ρ exact-scored "
                f"{row['spearman_exact_scored']:.4f}, "
                f"exact {row['exact_fraction']:.3f}, audit {row['audit']}"
            )
    out = args.out or os.path.join(
        HERE, "..", "results", f"cpu-{time.strftime('%Y-%m-%d')}-adaptive-{args.model}.json"
    )
    with open(out, "w") as f:
        json.dump(
            {
                "model": args.model,
                "N": N,
                "K": args.targets,
                "M": args.num_noises,
                "threads": args.threads,
                "exact_timings": exact.meta["timings"],
                "rows": rows,
                "steps": [i["steps"] for i in exact.meta["targets"]],
            },
            f,
            indent=1,
        )
    print("wrote", out)


if __name__ == "__main__":
    main()
