"""What `mucs-fast attribute` (mucs_fast/cli.py) and its reference-files variant
(mucs_fast/compat/cli.py) share: loading --model safely, checking the flags before any heavy work,
the MUCSConfig they build, CLI wording for engine messages, and the closing summary.

Neither CLI module imports the other's internals through here: this module imports neither.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile

import torch

from .config import MUCSConfig
from .denoisers import DiffusersDenoiser, EDMDenoiser
from .rundir import RUN_FILE, TARGETS_DIR, check_run_dir
from .train import CHECKPOINT_FORMAT, load_checkpoint

PREFIX = "[mucs-fast]"


def say(msg: str) -> None:
    """One line on stderr, prefixed `[mucs-fast]` (progress, warnings, the final error)."""
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# --model
# ------------------------------------------------------------------------------------------------
PICKLE_WARNING = ("--trust-pickle: unpickling {path} runs whatever code the file holds; do this only "
                  "with files you made or trust")


def load_model(path: str, device=None, trust_pickle: bool = False):
    """A denoiser from --model: a diffusers model directory (its safetensors weights), a mucs_fast
    checkpoint (mucs_fast.train.save_checkpoint, read with torch.load(weights_only=True)), or, only
    with `trust_pickle=True`, a file holding a whole EDM-preconditioned torch.nn.Module (reference
    call signature) or a diffusers folder with only pickled `.bin` weights.

    Nothing is unpickled without `trust_pickle`: unpickling runs code, so a crafted file could do
    anything. With it, a warning saying so is printed before the file is read."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_diffusers(path, trust_pickle=trust_pickle)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {path}: no such file or directory")

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for objects outside the allowlist
        if not _is_pickle_refusal(e):
            raise ValueError(f"--model {path}: cannot read it with torch.load ({type(e).__name__}: "
                             f"{_one_line(e)})") from e
        if not trust_pickle:
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f" (it needs {found.group(1)})" if found else ""
            raise ValueError(f"--model {path} is not a weights-only checkpoint: it holds pickled Python "
                             f"objects{what}, and unpickling runs code. If it is a saved nn.Module you "
                             "trust, pass --trust-pickle") from None
        say(PICKLE_WARNING.format(path=path))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ValueError(f"--model {path}: cannot read it with torch.load ({type(e2).__name__}: "
                             f"{_one_line(e2)})") from e2
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return load_checkpoint(path, device=device)
    if isinstance(obj, torch.nn.Module):

        return EDMDenoiser(obj.eval())
    kind = "a state dict (weights without the model)" if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"--model {path}: expected a diffusers model directory, a mucs_fast checkpoint or "
                     f"(with --trust-pickle) a saved torch.nn.Module, found {kind}")


def _is_pickle_refusal(e: Exception) -> bool:
    import pickle

    return isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _load_diffusers(path: str, trust_pickle: bool = False):

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
    try:
        with open(cfg_file) as f:
            cls_name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"--model {path}: cannot read {cfg_file} ({_one_line(e)})") from e
    cls = getattr(diffusers, cls_name or "", None) if isinstance(cls_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"--model {path}: unknown diffusers model class {cls_name!r} in {cfg_file}")  # noqa: TRY004
    names = os.listdir(model_dir)
    if any(n.endswith(".safetensors") for n in names):
        safetensors = True
    elif any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        if not trust_pickle:
            raise ValueError(f"--model {path}: the weights in {model_dir} are pickles (.bin), not safetensors, "
                             "and unpickling can run code; re-save them with save_pretrained("
                             "safe_serialization=True), or pass --trust-pickle if you trust them")
        say(PICKLE_WARNING.format(path=model_dir))
        safetensors = False
    else:
        raise FileNotFoundError(f"--model {path}: no weights (*.safetensors) in {model_dir}")
    try:
        model = cls.from_pretrained(model_dir, use_safetensors=safetensors).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"--model {path}: diffusers cannot load it ({type(e).__name__}: {_one_line(e)})") from e
    sched_dir = None
    for cand in (os.path.join(path, "scheduler"), os.path.join(model_dir, "scheduler"), model_dir, path):
        if os.path.isfile(os.path.join(cand, "scheduler_config.json")):
            sched_dir = cand
            break
    if sched_dir is None:
        raise FileNotFoundError(f"--model {path}: no scheduler_config.json in scheduler/ or beside the model")
    scheduler = diffusers.DDPMScheduler.from_pretrained(sched_dir)
    return DiffusersDenoiser(model, scheduler)


# ------------------------------------------------------------------------------------------------
# flags checked before anything is loaded
# ------------------------------------------------------------------------------------------------
def check_out(out: str) -> None:
    """--out: create the folder and write a probe file now, so that a bad path fails in a second,
    not after the model, the data and the first targets. Also refuses a folder that is not a
    run directory, or one a running process holds (mucs_fast.rundir.check_run_dir)."""

    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is an existing file, not a folder; give a new folder or a previous "
                         "run's")
    check_run_dir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror or _one_line(e)})") from None
    try:  # named like an atomic-write temporary, so a leftover is cleaned with them
        fd, probe = tempfile.mkstemp(prefix=".mucs-fast-probe.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or _one_line(e)})") from None


def check_device(device: str | None) -> str | None:
    """--device: a device torch knows and this machine has (None: the engine's default)."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device}: not a device name (expected cpu, cuda, cuda:N, mps, ...)") from None
    if d.type == "cpu":
        return device
    mod = torch.backends.mps if d.type == "mps" else getattr(torch, d.type, None)
    if mod is None or not callable(getattr(mod, "is_available", None)):
        raise ValueError(f"--device {device}: mucs-fast runs on cpu or an accelerator (cuda, mps, xpu), "
                         f"not {d.type}")
    if not mod.is_available():
        why = " (this torch is built without CUDA)" if d.type == "cuda" and torch.version.cuda is None else ""
        raise ValueError(f"--device {device}: no {d.type} device is available on this machine{why}; "
                         "use --device cpu")
    count = getattr(mod, "device_count", None)
    if d.index is not None and callable(count) and d.index >= count():
        raise ValueError(f"--device {device}: this machine has {count()} {d.type} device(s) "
                         f"({d.type}:0..{d.type}:{count() - 1})")
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
    --loss-null and --top-k first (all before any model or data is read). MUCSConfig's own checks name fields;
    main() rewords them as flags (cli_message)."""

    if not os.path.exists(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such file or directory")
    check_out(args.out)
    check_device(args.device)
    loss_null = parse_loss_null(args.loss_null)
    check_top_k(args.top_k)
    return MUCSConfig(num_noises=args.num_noises, max_steps=args.max_steps, lr=args.lr, loss_null=loss_null,
                      seed=args.seed, targets_per_batch=args.targets_per_batch,
                      **({"batch_size": args.batch_size} if args.batch_size is not None else {}))


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
        n = len([f for f in os.listdir(tdir) if f.endswith(".safetensors")]) if os.path.isdir(tdir) else 0
        return (f"interrupted: finished targets ({n} so far) are kept in {out}; rerun the same command with "
                "--resume to continue")
    return "interrupted before any target finished; rerun the same command to start again"


def print_summary(res, out, seconds) -> None:
    t = res.meta.get("timings", {})
    steps = [i["steps"] for i in res.meta["targets"]]
    say(f"done in {seconds:.1f} s (L_t {t.get('loss_t', 0):.1f} s, unlearning {t.get('unlearn', 0):.1f} s, "
        f"scoring {t.get('score', 0):.1f} s); unlearning steps per target: {steps}")
    ad = res.meta.get("adaptive")
    if ad:
        full = res.N * res.meta["M"]
        pairs = res.meta["pairs_evaluated"]
        hi = sum(a["expected_missed_95"][1] for a in ad["targets"] if a)
        say(f"adaptive (top {ad['top_k']}): {sum(pairs) / max(1, len(pairs)) / full:.1%} of the exact forwards per "
            f"target, {res.exact.float().mean():.1%} of the scores exact; audit: "
            f"{sum(a['audit_misses'] for a in ad['targets'] if a)} misses in "
            f"{sum(a['audited'] for a in ad['targets'] if a)} audited set-aside images "
            f"(≤ {hi:.0f} top-k images missed in all, 95 %)")
    if res.meta.get("flagged"):
        say(f"WARNING: targets {res.meta['flagged']} stopped by NaN or the safety cap (see attribution.json)")
    say(f"wrote {out}/scores.safetensors, attribution.json" + (", report.png" if out else ""))
