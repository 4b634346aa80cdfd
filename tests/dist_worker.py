"""A tiny attribution run for the multi-process tests: `torchrun --nproc-per-node W dist_worker.py
OUT [options]` or plain `python dist_worker.py OUT` (one process). Every rank returns the full
result; each rank saves its scores to OUT/rank<r>.pt so the test can check that all ranks agree."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from nets import TinyEDMNet  # noqa: E402

import mucs_fast as mf  # noqa: E402


def problem(K, N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = TinyEDMNet(C=1, label_dim=3)
    train = torch.rand(N, 1, 6, 6, generator=g) * 2 - 1
    targets = torch.rand(K, 1, 6, 6, generator=g) * 2 - 1
    ytr = torch.randint(0, 3, (N,), generator=g)
    ytg = torch.randint(0, 3, (K,), generator=g)
    return net, train, targets, ytr, ytg


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--targets", type=int, default=3)
    p.add_argument(
        "--images", type=int, default=40, help="training images (37: a short last chunk and shard)"
    )
    p.add_argument("--targets-per-batch", type=int, default=1)
    p.add_argument("--independent-noise", action="store_true")
    p.add_argument(
        "--streamed", action="store_true", help="train from a .npy file (read in chunks)"
    )
    p.add_argument("--adaptive", type=int, default=None, help="adaptive scoring of this top-k")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--die-after-blocks", type=int, default=None, help="rank 1 SIGKILLs itself then")
    p.add_argument(
        "--fail-on-rank1", action="store_true", help="rank 1 raises in its first unlearning"
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    net, train, targets, ytr, ytg = problem(a.targets, a.images)
    cfg = mf.MUCSConfig(
        num_noises=8,
        lr=1e-2,
        safety_steps=6,
        score_batch=32,
        targets_per_batch=a.targets_per_batch,
        use_same_noise_infer=not a.independent_noise,
        adaptive_top_k=a.adaptive,
        adaptive_margin=1.0,
    )
    if a.die_after_blocks is not None:
        from mucs_fast import engine

        real, calls = engine.score_block, []

        def score_block(*args, **kw):
            if len(calls) == a.die_after_blocks and int(os.environ.get("RANK", "0")) == 1:
                os.kill(os.getpid(), 9)
            calls.append(1)
            return real(*args, **kw)

        engine.score_block = score_block
    if a.fail_on_rank1 and int(os.environ.get("RANK", "0")) == 1:
        from mucs_fast import engine

        def unlearn_block(*args, **kw):
            raise ValueError("the model blew up on rank 1")

        engine.unlearn_block = unlearn_block
    if a.streamed:
        import numpy as np

        path = os.path.join(a.out, f"train-{os.environ.get('RANK', '0')}.npy")
        os.makedirs(a.out, exist_ok=True)
        np.save(path, train.numpy())
        train = path
    res = mf.attribute(
        mf.EDMDenoiser(net),
        train,
        targets,
        cfg,
        ytr,
        ytg,
        progress=False,
        cache_dir=None,
        run_dir=a.run_dir,
        resume=a.resume,
    )
    os.makedirs(a.out, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {
            "scores": res.scores,
            "exact": res.exact,
            "pairs": res.meta["pairs_evaluated"],
            "meta_world": res.meta["world_size"],
            "steps": [t["steps"] for t in res.meta["targets"]],
        },
        os.path.join(a.out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
