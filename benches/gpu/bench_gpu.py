"""GPU benchmarks of the MUCS phases (PERFORMANCE.md): the scoring pass and K-target unlearning.

    python benches/gpu/bench_gpu.py --out results.json [--dry-run]

1. scoring: images·noises per second of the original-model loss pass (`score.original_losses` of a
one-model `LossPass`, the
   per-chunk work of every scoring pass) on the CIFAR-10 reference DiT config (32×32×3, patch 2,
   256 + 32 tokens, width 768, 12 blocks, 12 heads, MLP 4, adaLN width 256), bf16 autocast with fp32
   loss accumulation, eager and torch.compile; FLOPs per image from torch.utils.flop_counter;
   MFU against 790 TFLOP/s (H200 dense bf16). Also the exact per-target scoring time for
   N = 50,000, M = 100 at that rate, against the 5.2-minute floor.
2. K-targets: per-target unlearning step throughput of `unlearn_batched` for K ∈ {1, 4, 16} on a
   small DiT (bar: K = 16 ≥ 4× K = 1; K = 1 is the engine's one-target run); then the
   K-stacked scoring pass (images·noises·models per second) for the same K.

--dry-run: tiny shapes on whatever device is there (the CPU check that the script runs).
Every number printed is measured in this run; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

PEAK_BF16 = 790e12  # H200 dense bf16 FLOP/s (spec/PERFORMANCE.md)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=5, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def dit(cfg, device):
    from mucs_fast.models import DiT

    torch.manual_seed(0)
    net = DiT(**cfg).to(device).eval()
    with torch.no_grad():  # a "trained" model: non-zero outputs everywhere
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net


def flops_per_image(den, net, shape, device):
    """(FLOPs per image forward used for MFU, torch's flop_counter figure, the analytic figure).
    The counter misses fused attention kernels (flash / cuDNN / the CPU's SDPA: tests/test_models.py
    pins analytic = counter + QKᵀ + AV), so MFU uses the larger — the analytic count."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *shape, device=device)
    eps, lev = torch.zeros_like(x), torch.ones(1, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        den.loss(x, eps, lev, None, net=net)
    counted, analytic = fc.get_total_flops(), net.forward_flops()
    return max(counted, analytic), counted, analytic


def bench_scoring(args, device, log):
    import mucs_fast as mf
    from mucs_fast.data import TensorSource
    from mucs_fast.noise import NoiseBank
    from mucs_fast.score import LossPass, original_losses

    if args.dry_run:
        cfg = dict(
            image_size=(3, 8, 8),
            patch_size=2,
            width=32,
            depth=2,
            heads=2,
            cond_width=16,
            extra_tokens=4,
        )
        N, M, per_batch = 8, 4, 4
    else:
        cfg = dict(
            image_size=(3, 32, 32),
            patch_size=2,
            width=768,
            depth=12,
            heads=12,
            mlp_ratio=4,
            cond_width=256,
            extra_tokens=32,
        )
        N, M, per_batch = args.scoring_images, 100, args.scoring_images_per_forward
    net = dit(cfg, device)
    den = mf.EDMDenoiser(net)
    shape = cfg["image_size"]
    fpi, counted, analytic = flops_per_image(den, net, shape, device)
    log(
        f"scoring model: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params, "
        f"{fpi / 1e9:.3f} GFLOP per image forward for MFU (flop_counter {counted / 1e9:.3f}, "
        f"analytic incl. attention {analytic / 1e9:.3f})"
    )
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(N, *shape, generator=g) * 2 - 1).to(device)
    bank = NoiseBank(torch.randn(M, *shape, generator=g), den.inference_levels(M, 0.7)).to(device)
    results = {
        "model": cfg,
        "flops_per_image": fpi,
        "flops_counter": counted,
        "flops_analytic": analytic,
        "N": N,
        "M": M,
        "pairs_per_forward": per_batch * M,
    }
    for mode in args.scoring_modes:
        precision = "bf16" if device.type == "cuda" else "fp32"
        run_net = net
        if mode == "compiled":
            run_net = torch.compile(net, dynamic=False)
        den_m = mf.EDMDenoiser(run_net, raw=False) if mode != "raw" else den

        lp = LossPass(den_m, den_m.net, [], bank, images_per_forward=per_batch, precision=precision)

        def run():
            return original_losses(lp, TensorSource(x), None, torch.arange(N))

        t_first = time.perf_counter()
        out = run()
        sync(device)
        t_first = time.perf_counter() - t_first
        assert torch.isfinite(out).all()
        med, ts = timed(run, device, repeats=args.repeats, warmup=1)
        pairs = N * M / med
        tflops = pairs * fpi / 1e12
        r = {
            "median_s": med,
            "times_s": ts,
            "first_call_s": t_first,
            "pairs_per_s": pairs,
            "tflops": tflops,
            "mfu": pairs * fpi / PEAK_BF16,
            "scoring_minutes_per_target_cifar": 50_000 * 100 / pairs / 60,
        }
        results[mode] = r
        log(
            f"scoring [{mode}]: {pairs:,.0f} images·noises/s, {tflops:.1f} TFLOP/s, MFU "
            f"{100 * r['mfu']:.1f} %, "
            f"exact CIFAR-10 scoring {r['scoring_minutes_per_target_cifar']:.2f} min/target (floor "
            "5.2), "
            f"first call {t_first:.1f} s"
        )
    if device.type == "cuda":
        results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return results


def bench_ktargets(args, device, log):
    import mucs_fast as mf
    from mucs_fast.data import TensorSource
    from mucs_fast.noise import NoiseBank
    from mucs_fast.params import trainable_names
    from mucs_fast.score import LossPass, score_stacked
    from mucs_fast.unlearn import RetainStream, unlearn_batched

    if args.dry_run:
        cfg = dict(
            image_size=(1, 8, 8),
            label_dim=10,
            patch_size=2,
            width=32,
            depth=2,
            heads=2,
            cond_width=16,
        )
        N, B, steps, Ks, M, n_score = 64, 8, 3, (1, 2, 4), 4, 16
    else:
        cfg = dict(
            image_size=(1, 16, 16),
            label_dim=10,
            patch_size=4,
            width=128,
            depth=4,
            heads=4,
            cond_width=64,
        )
        N, B, steps, Ks, M, n_score = 2048, 100, args.unlearn_steps, (1, 4, 16), 100, 512
    net = dit(cfg, device)
    den = mf.EDMDenoiser(net)
    shape = cfg["image_size"]
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(N, *shape, generator=g) * 2 - 1).to(device)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (N,), generator=g), 10).float().to(device)
    names = trainable_names(net, mf.REFERENCE_FROZEN)
    conf = mf.MUCSConfig(num_noises=B, max_steps=steps, lr=1e-4)
    res = {
        "model": cfg,
        "B": B,
        "steps": steps,
        "trainable": sum(dict(net.named_parameters())[n].numel() for n in names),
    }

    def streams(K):
        return (
            [RetainStream(N, B, torch.Generator().manual_seed(k)) for k in range(K)],
            [torch.Generator(device).manual_seed(k) for k in range(K)],
        )

    base = None
    for K in Ks:

        def batched():
            r, gs = streams(K)
            unlearn_batched(
                den,
                net,
                names,
                TensorSource(x),
                y,
                x[:K],
                y[:K],
                cfg=conf,
                loss_null=1.0,
                lr=1e-4,
                retains=r,
                generators=gs,
            )

        med, _ = timed(batched, device, repeats=3, warmup=1)
        tps = K * steps / med
        base = base or tps
        res[f"batched_K{K}"] = {
            "seconds": med,
            "target_steps_per_s": tps,
            "speedup_vs_K1": tps / base,
        }
        log(
            f"unlearning [batched, K={K}]: {tps:.1f} target·steps/s ({tps / base:.2f}× K=1 per "
            "target)"
        )

    # K-stacked scoring pass
    bank = NoiseBank(torch.randn(M, *shape, generator=g), den.inference_levels(M, 0.7)).to(device)
    loss_t = torch.ones(n_score, M, device=device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    base = None
    for K in Ks:
        params = dict(net.named_parameters())
        weights = {n: params[n].detach()[None].repeat(K, *([1] * params[n].dim())) for n in names}
        lp = LossPass(
            den, net, names, bank, images_per_forward=max(1, 8192 // (M * K)), precision=precision
        )
        ids = torch.arange(n_score)

        def score():
            return score_stacked(
                lp,
                weights,
                TensorSource(x[:n_score]),
                y[:n_score],
                ids,
                loss_t,
                eps=1e-3,
                use_loss_ratio=True,
                use_same_noise_infer=True,
            )

        med, _ = timed(score, device, repeats=3, warmup=1)
        rate = K * n_score * M / med
        base = base or rate
        res[f"score_K{K}"] = {
            "seconds": med,
            "pairs_models_per_s": rate,
            "speedup_vs_K1": rate / base,
        }
        log(
            f"scoring [stacked, K={K}]: {rate:,.0f} images·noises·models/s ({rate / base:.2f}× K=1)"
        )
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benches/results/gpu.json")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--phases", default="scoring,ktargets")
    p.add_argument("--scoring-images", type=int, default=1024)
    p.add_argument("--scoring-images-per-batch", type=int, default=64)
    p.add_argument("--scoring-modes", default="eager,compiled")
    p.add_argument("--unlearn-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    args.scoring_modes = args.scoring_modes.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def log(msg):
        print(f"[bench_gpu] {msg}", flush=True)

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        sha = ""
    out = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "git": sha,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dry_run": args.dry_run,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    log(f"device {out['device']}, torch {out['torch']}, triton {out['triton']}")
    for phase in args.phases.split(","):
        t0 = time.perf_counter()
        out[phase] = {"scoring": bench_scoring, "ktargets": bench_ktargets}[phase](
            args, device, log
        )
        out[phase]["wall_s"] = time.perf_counter() - t0
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # after every phase: a timeout later keeps what was measured
            json.dump(out, f, indent=2)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
