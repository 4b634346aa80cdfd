"""Scale-out on one machine: `mf.attribute` in 1 process vs W processes (torchrun, gloo), one
torch thread each, on a problem where scoring dominates; scores must be bitwise equal (asserted
before any time is reported).

    python benches/scaleout/run.py [--nproc 1 2] [--images 1797] [--targets 2] [--num-noises 100]
[--out JSON]

Problem: the demo's DiT shape (patch 4, width 64, depth 4, class-conditional) with random weights
on sklearn digits (16×16, the first --images), `--targets` targets of the training set, M noises, 3
unlearning steps (scoring is ≥ 95 % of the work, as at scale), compile off. Wall time of the whole
`attribute` call per world size, measured inside the processes (rank 0), start-up excluded.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def worker(out: str, n: int, K: int, M: int) -> None:
    import torch

    import mucs_fast as mf
    from mucs_fast.data import load_digits
    from mucs_fast.models import DiT

    torch.set_num_threads(1)
    x, y = load_digits(16)
    x, y = x[:n], y[:n]
    torch.manual_seed(0)
    net = DiT(
        (1, 16, 16), label_dim=10, patch_size=4, width=64, depth=4, heads=4, cond_width=64
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    cfg = mf.MUCSConfig(
        num_noises=M, max_steps=3, lr=1e-4, loss_null=1.0, compile=False, targets_per_batch=K
    )
    t0 = time.perf_counter()
    res = mf.attribute(mf.EDMDenoiser(net), x, x[:K], cfg, y, y[:K], progress=False, cache_dir=None)
    seconds = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(
            {
                "scores": res.scores,
                "seconds": seconds,
                "timings": res.meta["timings"],
                "world": res.meta["world_size"],
            },
            out,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=1797)
    p.add_argument("--targets", type=int, default=2)
    p.add_argument("--num-noises", type=int, default=100)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.images, a.targets, a.num_noises)
        return
    import torch

    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for w in a.nproc:
            out = os.path.join(tmp, f"w{w}.pt")
            args = [
                __file__,
                "--worker",
                out,
                "--images",
                str(a.images),
                "--targets",
                str(a.targets),
                "--num-noises",
                str(a.num_noises),
            ]
            cmd = (
                [sys.executable, *args]
                if w == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc-per-node={w}",
                    *args,
                ]
            )
            subprocess.run(
                cmd,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            r = torch.load(out)
            ref = r["scores"] if ref is None else ref
            assert torch.equal(r["scores"], ref), (
                f"scores with {w} processes differ from {a.nproc[0]}"
            )
            rows.append({"world": w, "seconds": r["seconds"], "timings": r["timings"]})
            print(
                f"{w} process(es) × 1 thread: {r['seconds']:.1f} s (L_t "
                f"{r['timings']['loss_t']:.1f} s, "
                f"unlearning {r['timings']['unlearn']:.1f} s, scoring {r['timings']['score']:.1f} "
                "s), "
                f"{rows[0]['seconds'] / r['seconds']:.2f}× the first; scores bitwise equal",
                flush=True,
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(
                {"N": a.images, "targets": a.targets, "M": a.num_noises, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
