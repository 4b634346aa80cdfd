"""What `mucs-fast attribute` (mucs_fast/cli.py) and its reference-files variant
(mucs_fast/compat/cli.py) share: --model through `loading.load_model`, checking the flags before any
heavy work, the MUCSConfig they build, CLI wording for engine messages, and the closing summary.

Neither CLI module imports the other's internals through here: this module imports neither.
"""

from __future__ import annotations

import math
import os
import re
import tempfile

import torch

from .cache import default_dir
from .config import MUCSConfig
from .loading import PREFIX, load_model, one_line, say  # noqa: F401  (the CLIs' names for them)
from .rundir import RUN_FILE, TARGETS_DIR, check_run_dir


def cache_dir(arg: str | None) -> str:
    """--cache-dir, else the default cache folder (cache.default_dir), created."""
    d = arg or default_dir()
    os.makedirs(d, exist_ok=True)
    return d


# ------------------------------------------------------------------------------------------------
# flags checked before anything is loaded
# ------------------------------------------------------------------------------------------------
def check_out(out: str) -> None:
    """--out: create the folder and write a probe file now, so that a bad path fails in a second,
    not after the model, the data and the first targets. Also refuses a folder that is not a
    run directory, or one a running process holds (mucs_fast.rundir.check_run_dir)."""

    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(
            f"--out {out} is an existing file, not a folder; give a new folder or a previous run's"
        )
    check_run_dir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"--out {out}: cannot create the folder ({e.strerror or one_line(e)})"
        ) from None
    try:  # named like an atomic-write temporary, so a leftover is cleaned with them
        fd, probe = tempfile.mkstemp(prefix=".mucs-fast-probe.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or one_line(e)})") from None


def check_device(device: str | None) -> str | None:
    """--device: a device torch knows and this machine has (None: the engine's default)."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"--device {device}: not a device name (expected cpu, cuda, cuda:N, mps, ...)"
        ) from None
    if d.type == "cpu":
        return device
    mod = torch.backends.mps if d.type == "mps" else getattr(torch, d.type, None)
    if mod is None or not callable(getattr(mod, "is_available", None)):
        raise ValueError(
            f"--device {device}: mucs-fast runs on cpu or an accelerator (cuda, mps, xpu), "
            f"not {d.type}"
        )
    if not mod.is_available():
        why = (
            " (this torch is built without CUDA)"
            if d.type == "cuda" and torch.version.cuda is None
            else ""
        )
        raise ValueError(
            f"--device {device}: no {d.type} device is available on this machine{why}; "
            "use --device cpu"
        )
    count = getattr(mod, "device_count", None)
    if d.index is not None and callable(count) and d.index >= count():
        raise ValueError(
            f"--device {device}: this machine has {count()} {d.type} device(s) "
            f"({d.type}:0..{d.type}:{count() - 1})"
        )
    return device


def parse_loss_null(value: str):
    """--loss-null: "auto" or a positive finite number."""
    if value == "auto":
        return value
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f'--loss-null: expected "auto" or a positive number, got {value!r}')
    return x


def check_top_k(top_k: int | None, N: int | None = None) -> None:
    if top_k is None:
        return
    if top_k < 1 or (N is not None and top_k > N):
        bound = f"[1, N={N}]" if N is not None else ">= 1"
        raise ValueError(f"--top-k must lie in {bound}, got {top_k}")


def attribute_config(args):
    """The MUCSConfig of `mucs-fast attribute`'s flags; checks --model exists, --out, --device,
    --loss-null and --top-k first (all before any model or data is read). MUCSConfig's own checks
    name fields; main() rewords them as flags (cli_message)."""

    flag, path = (
        ("--pipeline", args.pipeline)
        if getattr(args, "pipeline", None)
        else ("--model", args.model)
    )
    if path is None:
        raise ValueError("--model (or --pipeline for a text-to-image pipeline) is required")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    check_out(args.out)
    check_device(args.device)
    loss_null = parse_loss_null(args.loss_null)
    check_top_k(args.top_k)
    return MUCSConfig(
        num_noises=args.num_noises,
        max_steps=args.max_steps,
        lr=args.lr,
        loss_null=loss_null,
        seed=args.seed,
        targets_per_batch=args.targets_per_batch,
        **({"batch_size": args.batch_size} if args.batch_size is not None else {}),
    )


# ------------------------------------------------------------------------------------------------
# messages
# ------------------------------------------------------------------------------------------------
# MUCSConfig fields that have a flag; the engine's messages name the field, the CLI the flag.
FLAGS = {
    "num_noises": "--num-noises",
    "max_steps": "--max-steps",
    "safety_steps": "--safety-steps",
    "batch_size": "--batch-size",
    "targets_per_batch": "--targets-per-batch",
    "lr": "--lr",
    "loss_null": "--loss-null",
    "seed": "--seed",
    "adaptive_top_k": "--top-k",
}


def cli_message(msg: str) -> str:
    """An engine message in CLI words, on one line: `MUCSConfig(lr=<x>)` → `--lr <x>`,
    `MUCSConfig.lr` → `--lr`, `run_dir` → `--out`, the Python-only train_lr= hint dropped."""
    msg = " ".join(str(msg).split())

    def call(m):
        flag = FLAGS.get(m.group(1))
        if flag is None:
            return m.group(0)
        value = m.group(2).strip()
        return f"{flag} {'<value>' if value in ('', '...') else value}"

    msg = re.sub(r"MUCSConfig\((\w+)=([^()]*(?:\([^()]*\)[^()]*)*)\)", call, msg)
    msg = re.sub(r"MUCSConfig\.(\w+)", lambda m: FLAGS.get(m.group(1), m.group(0)), msg)
    msg = msg.replace("--lr is None", "--lr is not given")
    msg = msg.replace(" or the denoiser's train_lr=", "")
    msg = re.sub(r"\brun_dir\b", "--out", msg)
    return msg


def interrupted_message(out: str | None) -> str:
    """What Ctrl-C leaves behind and how to continue."""

    if out and os.path.isfile(os.path.join(out, RUN_FILE)):
        tdir = os.path.join(out, TARGETS_DIR)
        n = (
            len([f for f in os.listdir(tdir) if f.endswith(".safetensors")])
            if os.path.isdir(tdir)
            else 0
        )
        return (
            f"interrupted: finished targets ({n} so far) are kept in {out}; rerun the same command "
            "with "
            "--resume to continue"
        )
    return "interrupted before any target finished; rerun the same command to start again"


def print_summary(res, out, seconds) -> None:
    t = res.meta.get("timings", {})
    steps = [i["steps"] for i in res.meta["targets"]]
    say(
        f"done in {seconds:.1f} s (L_t {t.get('loss_t', 0):.1f} s, unlearning "
        f"{t.get('unlearn', 0):.1f} s, "
        f"scoring {t.get('score', 0):.1f} s); unlearning steps per target: {steps}"
    )
    ad = res.meta.get("adaptive")
    if ad:
        full = res.N * res.meta["M"]
        pairs = res.meta["pairs_evaluated"]
        hi = sum(a["expected_missed_95"][1] for a in ad["targets"] if a)
        say(
            f"adaptive (top {ad['top_k']}): {sum(pairs) / max(1, len(pairs)) / full:.1%} of the "
            "exact forwards per "
            f"target, {res.exact.float().mean():.1%} of the scores exact; audit: "
            f"{sum(a['audit_misses'] for a in ad['targets'] if a)} misses in "
            f"{sum(a['audited'] for a in ad['targets'] if a)} audited set-aside images "
            f"(≤ {hi:.0f} top-k images missed in all, 95 %)"
        )
    if res.meta.get("flagged"):
        say(
            f"WARNING: targets {res.meta['flagged']} stopped by NaN or the safety cap (see "
            "attribution.json)"
        )
    say(f"wrote {out}/scores.safetensors, attribution.json" + (", report.png" if out else ""))
