"""The reference's models as the drop-in gets and builds them: the raw module behind a
Lightning-Fabric wrapper, the freshly initialized model of loss_null="auto" (the reference's
'<method_path with its last --part replaced by pre>/configuration.yaml' route, or the model's own
`args`), and one of its checkpoints as an EDMDenoiser."""

from __future__ import annotations

import copy
import importlib
import os
import sys

import torch

from ..denoisers import EDMDenoiser
from .reference_files import load_checkpoint


def raw_module(model) -> torch.nn.Module:
    """The plain nn.Module behind a Lightning-Fabric (or DDP) wrapper; the module itself
    otherwise."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _omegaconf_load(fn: str):
    try:
        from omegaconf import OmegaConf
    except ImportError as e:
        raise ImportError(
            f"reading {fn} needs omegaconf (the reference's dependency): pip install omegaconf"
        ) from e
    return OmegaConf.load(fn)


# -- the fresh model for loss_null="auto" ----------------------------------------------------------
def null_config_path(method_path) -> str:
    """The configuration.yaml the reference builds its null model from: that of the '...--pre' run
    folder beside `method_path`."""
    path = "--".join(str(method_path).split("--")[:-1] + ["pre"])
    return os.path.join(path, "configuration.yaml")


def null_model_error(module: torch.nn.Module, method_path) -> str | None:
    """None when `build_null_model` can build a fresh model, else why not."""
    fn = null_config_path(method_path)
    if os.path.isfile(fn) or isinstance(getattr(module, "args", None), tuple):
        return None
    return (
        f'loss_null="auto" needs a freshly initialized model: no {fn} (the '
        f"reference's '<method_path with its last --part replaced by pre>/configuration.yaml') and "
        f"{type(module).__name__} has no `args` tuple to rebuild it from; pass loss_null=<number>"
    )


def build_null_model(module: torch.nn.Module, method_path, dataset=None) -> torch.nn.Module:
    """A freshly initialized model of `module`'s architecture, as the reference builds it:
    `models.<conf.model.name>.Model(conf.model, dataset.meta)` with the configuration.yaml of the
    '...--pre' run folder, imported from the user's checkout; without that file,
    `type(module)(*module.args)` (the reference's models keep `args = (conf, metadata)`)."""
    fn = null_config_path(method_path)
    if os.path.isfile(fn):
        conf = _omegaconf_load(fn)
        meta = getattr(dataset, "meta", None)
        if meta is None:
            raise ValueError(
                f"loss_null='auto': the training dataset has no `meta` (needed by "
                f"models.{conf.model.name}.Model); pass loss_null=<number>"
            )
        return importlib.import_module("models." + conf.model.name).Model(conf.model, meta)
    args = getattr(module, "args", None)
    if isinstance(args, tuple):
        return type(module)(*copy.deepcopy(args))
    raise ValueError(null_model_error(module, method_path))


# -- a checkpoint ----------------------------------------------------------------------------------
def load_reference_model(checkpoint, code_dir=None, metadata=None, which: str = "ema"):
    """An EDMDenoiser for one of the reference's checkpoints: `configuration.yaml` beside it names
    `models.<conf.model.name>.Model(conf.model, metadata)`, imported from the reference checkout
    `code_dir` (default: already importable); weights `which` ("ema", else "model") of the
    checkpoint, read with `load_checkpoint` (omegaconf-safe, weights_only=True). The denoiser knows
    the sampler's σ range, the training lr (unlearning lr = lr / 10) and how to build a fresh
    model."""

    fn = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "configuration.yaml")
    if not os.path.isfile(fn):
        raise FileNotFoundError(
            f"{checkpoint}: no configuration.yaml beside it (a reference run folder has one)"
        )
    conf = _omegaconf_load(fn)
    if code_dir is not None and os.path.abspath(code_dir) not in sys.path:
        sys.path.insert(0, os.path.abspath(code_dir))
    if metadata is None:
        raise ValueError(
            "load_reference_model: the dataset metadata (metadata.pt) is needed to build the model"
        )
    Model = importlib.import_module("models." + conf.model.name).Model
    net = Model(conf.model, metadata)
    state = load_checkpoint(checkpoint)
    sd = state.get(which) if isinstance(state, dict) else None
    if sd is None:
        sd = state["model"]
    sd = {k.removeprefix("_forward_module.").removeprefix("module."): v for k, v in sd.items()}
    net.load_state_dict(sd)
    net.eval()
    sm = conf.model.sampler
    return EDMDenoiser(
        net,
        sigma_min=float(sm.sigma_min),
        sigma_max=float(sm.sigma_max),
        rho=float(sm.rho),
        train_lr=float(conf.training.optim.lr),
        null_factory=lambda: Model(conf.model, metadata),
    )
