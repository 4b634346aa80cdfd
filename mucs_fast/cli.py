"""The `mucs-fast` command line (also `python -m mucs_fast`).

mucs-fast demo [--quick] [--text] [--out DIR]  the embedded end-to-end run on sklearn digits
mucs-fast attribute --model M --train T --targets G --out DIR [...]
mucs-fast attribute --pipeline P [--lora F] --train-folder D --targets G --out DIR [...]
mucs-fast evaluate [--quick] --data digits|mnist|PATH --methods mucs,random,... --out DIR
mucs-fast pack SRC OUT [--labels L] [--split S] [--shard-images N]   a streamable shard folder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from . import _io
from .cli_common import (
    attribute_config,
    cache_dir,
    check_device,
    check_out,
    check_top_k,
    cli_message,
    interrupted_message,
    load_model,
    print_summary,
    say,
)
from .compat.cli import add_reference_arguments, cmd_attribute_reference, uses_reference_files
from .config import MUCSConfig
from .data import load_digits, load_images, load_labels, open_source, pack, streamable
from .denoisers import EDMDenoiser
from .engine import attribute
from .evaluate.cli import add_evaluate_parser
from .models import DiT
from .parallel import rank_world
from .report import write_report
from .sample import sample_edm
from .text_cli import add_text_arguments, cmd_attribute_text, cmd_demo_text
from .train import load_checkpoint, save_checkpoint, train

__all__ = ["build_parser", "load_model", "main"]

# The embedded demo (sklearn digits, 16×16, class-conditional EDM DiT). --quick trades fidelity for
# time (fewer training steps, targets and noises) and says so in attribution.json.
# Model: the class-conditional DiT whose samples a digit classifier recognizes best among the
# measured alternatives at these step counts (BENCHMARKS.md).
DEMO = {
    "default": {
        "train_steps": 3000,
        "targets": 8,
        "num_noises": 100,
        "safety_steps": 500,
        "targets_per_batch": 8,
    },
    "quick": {
        "train_steps": 1500,
        "targets": 2,
        "num_noises": 50,
        "safety_steps": 150,
        "targets_per_batch": 2,
    },
}
DEMO_MODEL = {
    "patch_size": 4,
    "width": 64,
    "depth": 4,
    "heads": 4,
    "mlp_ratio": 4,
    "cond_width": 64,
    "extra_tokens": 0,
}
DEMO_TRAIN = {"batch_size": 128, "lr": 2e-3, "ema_decay": 0.999}


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
def demo_model(args, images, labels, device):
    """Train (or load from the cache) the demo's DiT; the cache key is its full config."""

    spec = {
        "model": DEMO_MODEL,
        "train": {**DEMO_TRAIN, "steps": args.train_steps, "seed": args.seed},
        "data": _io.tensor_digest({"x": images, "y": labels}),
        "format": 1,
    }
    key = _io.key_digest(spec)[:16]
    path = os.path.join(cache_dir(args.cache_dir), f"demo-dit-{key}.pt")
    if os.path.isfile(path) and not args.no_cache:
        say(f"model: cached {path}")
        return load_checkpoint(path, device=device), path, 0.0
    C, H, W = images.shape[1:]
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        net = DiT((C, H, W), label_dim=10, **DEMO_MODEL)
    say(
        f"model: training a {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M-parameter DiT "
        "for "
        f"{args.train_steps} steps (cached afterwards at {path})"
    )
    t0 = time.perf_counter()
    den, _ = train(
        EDMDenoiser(net),
        images,
        labels,
        steps=args.train_steps,
        seed=args.seed,
        device=device,
        progress=True,
        **{k: v for k, v in DEMO_TRAIN.items()},
    )
    seconds = time.perf_counter() - t0
    save_checkpoint(path, den, {"spec": json.dumps(spec)})
    return den, path, seconds


def cmd_demo(args) -> int:
    if args.text:  # the text-to-image demo (mucs_fast/text_cli.py)
        return cmd_demo_text(args)
    if args.vae_steps is not None or args.unet_steps is not None or args.data != "digits":
        raise ValueError("--vae-steps, --unet-steps and --data go with --text")

    preset = DEMO["quick" if args.quick else "default"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_out(args.out)
    check_device(args.device)
    cfg = MUCSConfig(
        num_noises=args.num_noises,
        safety_steps=args.safety_steps,
        seed=args.seed,
        targets_per_batch=args.targets_per_batch,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_all = time.perf_counter()
    images, labels = load_digits(16)
    say(
        f"data: sklearn digits, {images.shape[0]} images {tuple(images.shape[1:])} in [-1, 1] "
        "(8×8 upsampled bilinearly to 16×16)"
    )
    den, model_path, train_s = demo_model(args, images, labels, device)

    K = args.targets
    seeds = list(range(1000, 1000 + K))
    target_labels = torch.arange(K) % 10
    say(
        f"targets: {K} images sampled with seeds {seeds[0]}..{seeds[-1]}, labels "
        f"{target_labels.tolist()}"
    )
    t0 = time.perf_counter()
    targets = sample_edm(den, seeds, target_labels, device=device, progress=True).clamp(-1, 1)
    sample_s = time.perf_counter() - t0

    say(
        f"attribute: MUCS with M={cfg.num_noises} noises, B={cfg.B}, "
        f"lr={den.train_lr / cfg.lr_factor:g}"
        + (" (quick settings: fewer noises/steps than the paper's defaults)" if args.quick else "")
    )
    # The demo's own record; the attribution's timings cover the rest (timings.total).
    meta = {
        "demo": {
            "quick": bool(args.quick),
            "model": model_path,
            "target_seeds": seeds,
            "target_labels": target_labels.tolist(),
            "train_seconds": train_s,
            "sample_seconds": sample_s,
            "seconds_before_attribute": time.perf_counter() - t_all,
        }
    }
    res = attribute(
        den,
        images,
        targets,
        cfg,
        train_labels=labels,
        target_labels=target_labels,
        device=device,
        progress=True,
        run_dir=args.out,
        resume=args.resume,
        top_k=100,
        meta=meta,
    )
    payload = {"targets": targets, "target_labels": target_labels, "seeds": torch.tensor(seeds)}
    _io.atomic_write(os.path.join(args.out, "targets.pt"), lambda tmp: torch.save(payload, tmp))
    write_report(
        os.path.join(args.out, "report.png"),
        targets,
        images,
        res,
        top=8,
        target_labels=target_labels,
        train_labels=labels,
        title=f"mucs-fast demo{' --quick' if args.quick else ''}: digits, M={cfg.num_noises}",
    )
    print_summary(res, args.out, time.perf_counter() - t_all)
    return 0


# ------------------------------------------------------------------------------------------------
# attribute
# ------------------------------------------------------------------------------------------------
def cmd_attribute(args) -> int:
    if args.pipeline:  # a diffusers text-to-image pipeline (mucs_fast/text_cli.py)
        if args.model:
            raise ValueError("give --model or --pipeline, not both")
        return cmd_attribute_text(args)
    if args.train_folder or args.lora:
        raise ValueError("--train-folder and --lora go with --pipeline")

    if uses_reference_files(args):  # the reference implementation's samples.pt / dataset folder
        if args.adaptive:
            raise ValueError(
                "--adaptive is not available with the reference's files (--reference-samples)"
            )
        return cmd_attribute_reference(args)
    if not (args.train and args.targets):
        raise ValueError(
            "--train and --targets are required (or --reference-samples and --reference-data)"
        )
    cfg = attribute_config(args)  # --out, --device, --loss-null, ... before anything is read
    if streamable(args.train):  # .npy / .safetensors / a packed folder: read in chunks, never whole
        train = open_source(args.train)
        ids = None  # the source's own ids (a packed folder's), else 0..N−1
    else:
        train, ids = load_images(args.train)
    targets, _ = load_images(args.targets)
    ytr = load_labels(args.train_labels, len(train)) if args.train_labels else None
    ytg = load_labels(args.target_labels, targets.shape[0]) if args.target_labels else None
    check_top_k(args.top_k, len(train))
    if args.adaptive:  # the top-k that adaptive scoring keeps exact is the one the result reports
        cfg = dataclasses.replace(cfg, adaptive_top_k=min(args.top_k or 100, len(train)))
    den = load_model(args.model, trust_pickle=args.trust_pickle)
    t0 = time.perf_counter()
    res = attribute(
        den,
        train,
        targets,
        cfg,
        train_labels=ytr,
        target_labels=ytg,
        train_ids=ids,
        device=args.device,
        progress=not args.quiet,
        run_dir=args.out,
        resume=args.resume,
        top_k=args.top_k or 100,
    )
    if rank_world()[0] == 0:  # under torchrun every rank has the result; one writes
        write_report(os.path.join(args.out, "report.png"), targets, train, res, top=min(8, res.N))
        print_summary(res, args.out, time.perf_counter() - t0)
    return 0


# ------------------------------------------------------------------------------------------------
# pack
# ------------------------------------------------------------------------------------------------
def cmd_pack(args) -> int:
    """SRC → the packed, memory-mappable folder OUT (mucs_fast/data/pack.py); `--train OUT` streams
    it."""

    if args.shard_images < 1:
        raise ValueError(f"--shard-images must be >= 1, got {args.shard_images}")
    t0 = time.perf_counter()
    try:
        index = pack(
            args.src,
            args.out,
            shard_images=args.shard_images,
            progress=not args.quiet,
            labels=args.labels,
            split=args.split,
        )
    except KeyboardInterrupt:
        say(
            f"interrupted: {args.out} is not a packed folder (no index.json); rerun the same "
            "command"
        )
        return 130
    size = sum(s["bytes"] for s in index["shards"])
    labels = f", {index['labels']}" if index["labels"] else ""
    say(
        f"wrote {args.out}: {index['N']} images {index['C']}×{index['H']}×{index['W']} "
        f"{index['dtype']} in "
        f"{len(index['shards'])} shard(s) of <= {args.shard_images} ({size / 2**20:.1f} MiB), "
        f"{index['ids']}{labels}, index.json in {time.perf_counter() - t0:.1f} s; "
        f"stream it with --train {args.out}"
    )
    return 0


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mucs-fast", description="MUCS training-data attribution for diffusion models"
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser(
        "demo", help="train a small model on sklearn digits, generate targets, attribute them"
    )
    d.add_argument("--quick", action="store_true", help="a short run (≤ 3 min on 2 CPU cores)")
    d.add_argument("--out", default="mucs_demo", help="result directory (default: ./mucs_demo)")
    d.add_argument("--targets", type=int, default=None, help="number of generated targets")
    d.add_argument("--num-noises", type=int, default=None, help="M, noises in the bank")
    d.add_argument("--train-steps", type=int, default=None, help="training steps of the demo model")
    d.add_argument(
        "--safety-steps", type=int, default=None, help="cap on unlearning steps per target"
    )
    d.add_argument(
        "--targets-per-batch",
        type=int,
        default=None,
        help="K targets unlearned and scored together",
    )
    d.add_argument("--seed", type=int, default=45)
    d.add_argument("--device", default=None)
    d.add_argument(
        "--cache-dir",
        default=None,
        help="model cache (default $MUCS_FAST_CACHE or ~/.cache/mucs_fast)",
    )
    d.add_argument("--no-cache", action="store_true", help="retrain the demo model even if cached")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    d.add_argument(
        "--text",
        action="store_true",
        help="the text-to-image demo: a tiny latent pipeline (VAE, CLIP text model, "
        "UNet2DConditionModel) on captioned digits, saved as a diffusers pipeline folder",
    )
    d.add_argument(
        "--data",
        default="digits",
        help="--text: digits (sklearn's, colored and captioned) or emoji (Noto emoji from the npm "
        "package emoji-datasource-google, fetched once by you; $MUCS_FAST_EMOJI)",
    )
    d.add_argument("--vae-steps", type=int, default=None, help="--text: VAE training steps")
    d.add_argument("--unet-steps", type=int, default=None, help="--text: UNet training steps")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("attribute", help="attribute generated images to training images")
    a.add_argument(
        "--model",
        default=None,
        help="diffusers model directory, mucs_fast checkpoint, or (with --trust-pickle) a saved "
        "nn.Module",
    )
    a.add_argument(
        "--train", help="training images: .pt/.npy/.safetensors [N,C,H,W] or an image folder"
    )
    a.add_argument("--targets", help="generated images (same formats)")
    a.add_argument("--out", required=True, help="result/run directory")
    a.add_argument("--train-labels", default=None)
    a.add_argument("--target-labels", default=None)
    a.add_argument("--num-noises", type=int, default=100)
    a.add_argument("--max-steps", type=int, default=None)
    a.add_argument("--batch-size", type=int, default=None)
    a.add_argument("--targets-per-batch", type=int, default=1)
    a.add_argument("--lr", type=float, default=None)
    a.add_argument("--loss-null", default="auto", help='"auto" or a number')
    a.add_argument("--seed", type=int, default=45)
    a.add_argument("--top-k", type=int, default=None)
    a.add_argument("--device", default=None)
    a.add_argument("--resume", action="store_true")
    a.add_argument(
        "--adaptive",
        action="store_true",
        help="adaptive scoring: screen on a few noises, score on the full bank only the images "
        "that can "
        "reach each target's --top-k (default 100); the rest keep estimates (audited; see README)",
    )
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow --model to be a pickled file (a whole saved nn.Module, diffusers .bin "
        "weights): "
        "unpickling runs the code the file holds, so only for files you trust",
    )
    add_text_arguments(a)  # --pipeline, --lora, --train-folder, ... (mucs_fast/text_cli.py)
    add_reference_arguments(a)  # --reference-samples / --reference-data (mucs_fast/compat/cli.py)
    a.set_defaults(func=cmd_attribute)

    k = sub.add_parser(
        "pack", help="write a packed, memory-mappable shard folder that --train streams"
    )
    k.add_argument(
        "src",
        metavar="SRC",
        help="an image folder, a .pt/.npy/.safetensors [N,C,H,W] file, the "
        "reference's dataset folder (metadata.pt + pt_files/) or a packed folder (to reshard)",
    )
    k.add_argument(
        "out", metavar="OUT", help="the folder to write (new, empty, or a previous pack)"
    )
    k.add_argument(
        "--labels", default=None, help="labels file for SRC (class ids [N] or vectors [N, D])"
    )
    k.add_argument(
        "--split", default=None, help="split of a reference dataset folder (default: train)"
    )
    k.add_argument(
        "--shard-images", type=int, default=65536, help="images per shard (default: 65536)"
    )
    k.add_argument("--quiet", action="store_true", help="no progress bar")
    k.set_defaults(func=cmd_pack)

    # `mucs-fast evaluate` (mucs_fast/evaluate/cli.py)

    add_evaluate_parser(sub)
    return p


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 a usage or input error (one line on stderr, no traceback), 130
    Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # the run directory keeps every finished target
        say(interrupted_message(args.out) if args.cmd in ("attribute", "demo") else "interrupted")
        return 130
    except (ValueError, TypeError, ImportError, OSError) as e:
        say(f"error: {cli_message(e)}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
