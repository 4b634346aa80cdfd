"""Models from files, loaded safely: `load_model(path)` reads a diffusers model directory (its
safetensors weights) or a mucs_fast checkpoint (`train.save_checkpoint`, torch.load with
weights_only=True); a whole pickled torch.nn.Module, or a diffusers folder with only pickled `.bin`
weights, only with `trust_pickle=True` — unpickling runs whatever code the file holds, so nothing is
unpickled unless the caller opted in, and then a warning says so first. Errors are one line naming
the path and what was expected."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys

import torch

from .denoisers import DiffusersDenoiser, EDMDenoiser
from .train import CHECKPOINT_FORMAT, load_checkpoint

PREFIX = "[mucs-fast]"


def say(msg: str) -> None:
    """One line on stderr, prefixed `[mucs-fast]` (progress, warnings, the final error)."""
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


PICKLE_WARNING = (
    "--trust-pickle: unpickling {path} runs whatever code the file holds; do this only "
    "with files you made or trust"
)


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
            raise ValueError(
                f"--model {path}: cannot read it with torch.load ({type(e).__name__}: "
                f"{one_line(e)})"
            ) from e
        if not trust_pickle:
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f" (it needs {found.group(1)})" if found else ""
            raise ValueError(
                f"--model {path} is not a weights-only checkpoint: it holds pickled Python "
                f"objects{what}, and unpickling runs code. If it is a saved nn.Module you "
                "trust, pass --trust-pickle"
            ) from None
        say(PICKLE_WARNING.format(path=path))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ValueError(
                f"--model {path}: cannot read it with torch.load ({type(e2).__name__}: "
                f"{one_line(e2)})"
            ) from e2
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return load_checkpoint(path, device=device)
    if isinstance(obj, torch.nn.Module):
        return EDMDenoiser(obj.eval())
    kind = (
        "a state dict (weights without the model)" if isinstance(obj, dict) else type(obj).__name__
    )
    raise ValueError(
        f"--model {path}: expected a diffusers model directory, a mucs_fast checkpoint or "
        f"(with --trust-pickle) a saved torch.nn.Module, found {kind}"
    )


def _is_pickle_refusal(e: Exception) -> bool:
    return isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower()


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _load_diffusers(path: str, trust_pickle: bool = False):
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            "--model is a directory (diffusers layout) but diffusers is not installed: "
            "pip install diffusers"
        ) from e
    model_dir = path
    for sub in ("unet", "transformer"):  # a pipeline folder
        if os.path.isfile(os.path.join(path, sub, "config.json")):
            model_dir = os.path.join(path, sub)
    cfg_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(
            f"--model {path}: no config.json (expected a diffusers save_pretrained folder)"
        )
    try:
        with open(cfg_file) as f:
            cls_name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"--model {path}: cannot read {cfg_file} ({one_line(e)})") from e
    cls = getattr(diffusers, cls_name or "", None) if isinstance(cls_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(
            f"--model {path}: unknown diffusers model class {cls_name!r} in {cfg_file}"
        )  # noqa: TRY004
    names = os.listdir(model_dir)
    if any(n.endswith(".safetensors") for n in names):
        safetensors = True
    elif any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        if not trust_pickle:
            raise ValueError(
                f"--model {path}: the weights in {model_dir} are pickles (.bin), not safetensors, "
                "and unpickling can run code; re-save them with save_pretrained("
                "safe_serialization=True), or pass --trust-pickle if you trust them"
            )
        say(PICKLE_WARNING.format(path=model_dir))
        safetensors = False
    else:
        raise FileNotFoundError(f"--model {path}: no weights (*.safetensors) in {model_dir}")
    try:
        model = cls.from_pretrained(model_dir, use_safetensors=safetensors).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(
            f"--model {path}: diffusers cannot load it ({type(e).__name__}: {one_line(e)})"
        ) from e
    sched_dir = None
    for cand in (
        os.path.join(path, "scheduler"),
        os.path.join(model_dir, "scheduler"),
        model_dir,
        path,
    ):
        if os.path.isfile(os.path.join(cand, "scheduler_config.json")):
            sched_dir = cand
            break
    if sched_dir is None:
        raise FileNotFoundError(
            f"--model {path}: no scheduler_config.json in scheduler/ or beside the model"
        )
    scheduler = diffusers.DDPMScheduler.from_pretrained(sched_dir)
    return DiffusersDenoiser(model, scheduler)
