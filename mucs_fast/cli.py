"""The `mucs-fast` command line (also `python -m mucs_fast`).

    mucs-fast demo [--quick] [--out DIR]          the embedded end-to-end run on sklearn digits
    mucs-fast attribute --model M --train T --targets G --out DIR [...]
    mucs-fast evaluate [--quick] --data digits|mnist|PATH --methods mucs,random,... --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch

# The embedded demo (sklearn digits, 16×16, class-conditional EDM DiT). --quick trades fidelity for
# time (fewer training steps, targets and noises) and says so in attribution.json.
# Model: the class-conditional DiT whose samples a digit classifier recognizes at 0.92 (3000 steps;
# 0.82 at 1500) — see BENCHMARKS.md for the measured alternatives.
DEMO = {
    "default": dict(train_steps=3000, targets=8, num_noises=100, safety_steps=500, targets_per_batch=8),
    "quick": dict(train_steps=1500, targets=2, num_noises=50, safety_steps=150, targets_per_batch=2),
}
DEMO_MODEL = dict(patch_size=4, width=64, depth=4, heads=4, mlp_ratio=4, cond_width=64, extra_tokens=0)
DEMO_TRAIN = dict(batch_size=128, lr=2e-3, ema_decay=0.999)


def _cache_dir(arg: Optional[str]) -> str:
    d = arg or os.environ.get("MUCS_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mucs_fast")
    os.makedirs(d, exist_ok=True)
    return d


def _print(msg: str) -> None:
    print(f"[mucs-fast] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
def demo_model(args, images, labels, device):
    """Train (or load from the cache) the demo's DiT; the cache key is its full config."""
    from . import _io
    from .denoisers import EDMDenoiser
    from .models import DiT
    from .train import load_checkpoint, save_checkpoint, train

    spec = {"model": DEMO_MODEL, "train": {**DEMO_TRAIN, "steps": args.train_steps, "seed": args.seed},
            "data": _io.tensor_digest({"x": images, "y": labels}), "format": 1}
    key = _io.key_digest(spec)[:16]
    path = os.path.join(_cache_dir(args.cache_dir), f"demo-dit-{key}.pt")
    if os.path.isfile(path) and not args.no_cache:
        _print(f"model: cached {path}")
        return load_checkpoint(path, device=device), path, 0.0
    C, H, W = images.shape[1:]
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        net = DiT((C, H, W), label_dim=10, **DEMO_MODEL)
    _print(f"model: training a {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M-parameter DiT for "
           f"{args.train_steps} steps (cached afterwards at {path})")
    t0 = time.perf_counter()
    den, _ = train(EDMDenoiser(net), images, labels, steps=args.train_steps, seed=args.seed, device=device,
                   progress=True, **{k: v for k, v in DEMO_TRAIN.items()})
    seconds = time.perf_counter() - t0
    save_checkpoint(path, den, {"spec": json.dumps(spec)})
    return den, path, seconds


def cmd_demo(args) -> int:
    from .config import MUCSConfig
    from .data import load_digits
    from .engine import attribute
    from .report import write_report
    from .sample import sample_edm

    preset = DEMO["quick" if args.quick else "default"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_all = time.perf_counter()
    images, labels = load_digits(16)
    _print(f"data: sklearn digits, {images.shape[0]} images {tuple(images.shape[1:])} in [-1, 1] "
           "(8×8 upsampled bilinearly to 16×16)")
    den, model_path, train_s = demo_model(args, images, labels, device)

    K = args.targets
    seeds = list(range(1000, 1000 + K))
    target_labels = torch.arange(K) % 10
    _print(f"targets: {K} images sampled with seeds {seeds[0]}..{seeds[-1]}, labels {target_labels.tolist()}")
    t0 = time.perf_counter()
    targets = sample_edm(den, seeds, target_labels, device=device, progress=True).clamp(-1, 1)
    sample_s = time.perf_counter() - t0

    cfg = MUCSConfig(num_noises=args.num_noises, safety_steps=args.safety_steps, seed=args.seed,
                     targets_per_batch=args.targets_per_batch)
    _print(f"attribute: MUCS with M={cfg.num_noises} noises, B={cfg.B}, lr={den.train_lr / cfg.lr_factor:g}"
           + (" (quick settings: fewer noises/steps than the paper's defaults)" if args.quick else ""))
    res = attribute(den, images, targets, cfg, train_labels=labels, target_labels=target_labels,
                    device=device, progress=True, run_dir=args.out, resume=args.resume)
    res.meta["demo"] = {"quick": bool(args.quick), "model": model_path, "target_seeds": seeds,
                        "target_labels": target_labels.tolist(), "train_seconds": train_s,
                        "sample_seconds": sample_s, "total_seconds": time.perf_counter() - t_all}
    res.save(args.out, top_k=min(100, res.N))
    torch.save({"targets": targets, "target_labels": target_labels, "seeds": torch.tensor(seeds)},
               os.path.join(args.out, "targets.pt"))
    write_report(os.path.join(args.out, "report.png"), targets, images, res, top=8,
                 target_labels=target_labels, train_labels=labels,
                 title=f"mucs-fast demo{' --quick' if args.quick else ''}: digits, M={cfg.num_noises}")
    _summary(res, args.out, time.perf_counter() - t_all)
    return 0


def _summary(res, out, seconds):
    t = res.meta.get("timings", {})
    steps = [i["steps"] for i in res.meta["targets"]]
    _print(f"done in {seconds:.1f} s (L_t {t.get('loss_t', 0):.1f} s, unlearning {t.get('unlearn', 0):.1f} s, "
           f"scoring {t.get('score', 0):.1f} s); unlearning steps per target: {steps}")
    if res.meta.get("flagged"):
        _print(f"WARNING: targets {res.meta['flagged']} stopped by NaN or the safety cap (see attribution.json)")
    _print(f"wrote {out}/scores.safetensors, attribution.json" + (", report.png" if out else ""))


# ------------------------------------------------------------------------------------------------
# attribute
# ------------------------------------------------------------------------------------------------
def load_model(path: str, device=None):
    """A denoiser from --model: a diffusers model directory, a mucs_fast checkpoint, or a file holding
    a whole EDM-preconditioned torch.nn.Module (reference call signature)."""
    from .denoisers import EDMDenoiser

    if os.path.isdir(path):
        return _load_diffusers(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {path}: no such file or directory")
    from .train import CHECKPOINT_FORMAT, load_checkpoint

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # a whole module: the user's own file
    except Exception as e:
        raise ValueError(f"--model {path}: cannot read it with torch.load ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return load_checkpoint(path)
    if isinstance(obj, torch.nn.Module):
        return EDMDenoiser(obj.eval())
    raise ValueError(f"--model {path}: expected a diffusers model directory, a mucs_fast checkpoint or a "
                     f"saved torch.nn.Module, found {type(obj).__name__}")


def _load_diffusers(path: str):
    from .denoisers import DiffusersDenoiser

    try:
        import diffusers
    except ImportError as e:
        raise ImportError("--model is a directory (diffusers layout) but diffusers is not installed: "
                          "pip install diffusers") from e
    model_dir = path
    for sub in ("unet", "transformer"):  # a pipeline folder
        if os.path.isfile(os.path.join(path, sub, "config.json")):
            model_dir = os.path.join(path, sub)
    cfg_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"--model {path}: no config.json (expected a diffusers save_pretrained folder)")
    with open(cfg_file) as f:
        cls_name = json.load(f).get("_class_name")
    cls = getattr(diffusers, cls_name or "", None)
    if cls is None:
        raise ValueError(f"--model {path}: unknown diffusers class {cls_name!r} in {cfg_file}")
    model = cls.from_pretrained(model_dir).eval()
    sched_dir = None
    for cand in (os.path.join(path, "scheduler"), os.path.join(model_dir, "scheduler"), model_dir, path):
        if os.path.isfile(os.path.join(cand, "scheduler_config.json")):
            sched_dir = cand
            break
    if sched_dir is None:
        raise FileNotFoundError(f"--model {path}: no scheduler_config.json in scheduler/ or beside the model")
    scheduler = diffusers.DDPMScheduler.from_pretrained(sched_dir)
    return DiffusersDenoiser(model, scheduler)


def cmd_attribute(args) -> int:
    from .config import MUCSConfig
    from .data import load_images, load_labels
    from .engine import attribute
    from .report import write_report

    from .compat.cli import cmd_attribute_reference, uses_reference_files

    if uses_reference_files(args):  # the reference implementation's samples.pt / dataset folder
        return cmd_attribute_reference(args)
    if not (args.train and args.targets):
        raise ValueError("--train and --targets are required (or --reference-samples and --reference-data)")
    # Read and check every input before any compute.
    train, ids = load_images(args.train)
    targets, _ = load_images(args.targets)
    ytr = load_labels(args.train_labels, train.shape[0]) if args.train_labels else None
    ytg = load_labels(args.target_labels, targets.shape[0]) if args.target_labels else None
    if args.top_k is not None and not 1 <= args.top_k <= train.shape[0]:
        raise ValueError(f"--top-k must lie in [1, N={train.shape[0]}], got {args.top_k}")
    den = load_model(args.model)
    loss_null = args.loss_null if args.loss_null == "auto" else float(args.loss_null)
    cfg = MUCSConfig(num_noises=args.num_noises, max_steps=args.max_steps, lr=args.lr, loss_null=loss_null,
                     seed=args.seed, targets_per_batch=args.targets_per_batch,
                     **({"batch_size": args.batch_size} if args.batch_size else {}))
    t0 = time.perf_counter()
    res = attribute(den, train, targets, cfg, train_labels=ytr, target_labels=ytg, train_ids=ids,
                    device=args.device, progress=not args.quiet, run_dir=args.out, resume=args.resume)
    top_k = args.top_k or min(100, res.N)
    res.save(args.out, top_k=top_k)
    write_report(os.path.join(args.out, "report.png"), targets, train, res, top=min(8, res.N))
    _summary(res, args.out, time.perf_counter() - t0)
    return 0


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mucs-fast", description="MUCS training-data attribution for diffusion models")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="train a small model on sklearn digits, generate targets, attribute them")
    d.add_argument("--quick", action="store_true", help="a short run (≤ 3 min on 2 CPU cores)")
    d.add_argument("--out", default="mucs_demo", help="result directory (default: ./mucs_demo)")
    d.add_argument("--targets", type=int, default=None, help="number of generated targets")
    d.add_argument("--num-noises", type=int, default=None, help="M, noises in the bank")
    d.add_argument("--train-steps", type=int, default=None, help="training steps of the demo model")
    d.add_argument("--safety-steps", type=int, default=None, help="cap on unlearning steps per target")
    d.add_argument("--targets-per-batch", type=int, default=None, help="K targets unlearned and scored together")
    d.add_argument("--seed", type=int, default=45)
    d.add_argument("--device", default=None)
    d.add_argument("--cache-dir", default=None, help="model cache (default $MUCS_FAST_CACHE or ~/.cache/mucs_fast)")
    d.add_argument("--no-cache", action="store_true", help="retrain the demo model even if cached")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("attribute", help="attribute generated images to training images")
    a.add_argument("--model", required=True, help="diffusers model directory, mucs_fast checkpoint, or saved nn.Module")
    a.add_argument("--train", help="training images: .pt/.npy/.safetensors [N,C,H,W] or an image folder")
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
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    from .compat.cli import add_reference_arguments  # --reference-samples / --reference-data

    add_reference_arguments(a)
    a.set_defaults(func=cmd_attribute)

    from .evaluate.cli import add_evaluate_parser  # `mucs-fast evaluate` (mucs_fast/evaluate/cli.py)

    add_evaluate_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, ImportError) as e:
        _print(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
