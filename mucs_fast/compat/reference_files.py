"""The reference implementation's result files, read and written without its code.

- `samples.pt` (its generate.py): `[idx [N], x [N, C, H, W], y [N, label_dim], xgen [N, C, H, W],
  extra dict]`; the first `num_attrib` rows are the targets, the rest controls.
- `attrib-ids.pt` (its attrib.py): int64 [Ng, k] training ids, best first; beside it
  `attrib-ids_all.pt` = `[top [Ng, k], all_idx [Nt], scores [Ng, Nt]]`.

Its dataset folder lives with the other training-set formats (`mucs_fast.data.reference_folder`)
and its checkpoints' safe loading in `mucs_fast.safe_load`; both are re-exported here, the
drop-in's one place for the reference's files. Every writer is atomic.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .._io import atomic_write
from ..data.checks import to_model_range
from ..data.reference_folder import (
    METADATA,
    PT_FOLDER,
    ReferenceData,
    center_crop,
    dataset_tensors,
    load_dataset,
    load_files,
    load_metadata,
    save_dataset,
    split_filenames,
)
from ..safe_load import (
    install_omegaconf_safe_globals,
    load_checkpoint,
    omegaconf_globals,
    omegaconf_safe_globals,
)

# the reference's files in one place: its dataset folder and safe loading are re-exported
__all__ = [
    "METADATA",
    "PT_FOLDER",
    "ReferenceData",
    "Samples",
    "attrib_ids_all_path",
    "center_crop",
    "dataset_tensors",
    "install_omegaconf_safe_globals",
    "load_attrib_ids",
    "load_checkpoint",
    "load_dataset",
    "load_files",
    "load_metadata",
    "load_samples",
    "omegaconf_globals",
    "omegaconf_safe_globals",
    "save_attrib_ids",
    "save_dataset",
    "save_samples",
    "split_filenames",
    "to_model_range",
]


# --------------------------------------------------------------------------------------------
# samples.pt and attrib-ids
# --------------------------------------------------------------------------------------------
class Samples(NamedTuple):
    idx: torch.Tensor  # [N] seeds / dataset ids the generation was conditioned on
    x: torch.Tensor  # [N, C, H, W] the dataset images behind idx
    y: torch.Tensor  # [N, label_dim]
    xgen: torch.Tensor  # [N, C, H, W] generated images (the targets are the first num_attrib)
    extra: dict


def load_samples(path, map_location="cpu") -> Samples:
    """Read a reference `samples.pt`; raises ValueError if it is not one."""
    obj = load_checkpoint(path, map_location=map_location)
    if not (
        isinstance(obj, (list, tuple))
        and len(obj) == 5
        and isinstance(obj[4], dict)
        and all(isinstance(t, torch.Tensor) for t in obj[:4])
    ):
        raise ValueError(
            f"{path}: not a reference samples.pt (expected [idx, x, y, xgen, extra dict], "
            "got "
            f"{type(obj).__name__}{f' of {len(obj)}' if isinstance(obj, (list, tuple)) else ''})"
        )
    s = Samples(*obj)
    n = s.xgen.shape[0]
    if s.xgen.dim() != 4 or s.idx.shape[:1] != (n,) or s.y.shape[:1] != (n,):
        raise ValueError(
            f"{path}: inconsistent samples (idx {tuple(s.idx.shape)}, y {tuple(s.y.shape)}, "
            f"xgen {tuple(s.xgen.shape)})"
        )
    return s


def save_samples(path, idx, x, y, xgen, extra: dict | None = None) -> None:
    """Write a reference `samples.pt` (`[idx, x, y, xgen, extra]`)."""
    obj = [torch.as_tensor(idx).long().cpu(), x.cpu(), y.cpu(), xgen.cpu(), dict(extra or {})]
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def attrib_ids_all_path(fn_out) -> str:
    """`attrib-ids.pt` → `attrib-ids_all.pt` (as the reference names it)."""
    return os.path.splitext(os.fspath(fn_out))[0] + "_all.pt"


def save_attrib_ids(fn_out, top: torch.Tensor, all_idx: torch.Tensor, scores: torch.Tensor) -> None:
    """Write `fn_out` (int64 [Ng, k]) and its `_all.pt` companion ([top, all_idx, scores])."""
    top, all_idx, scores = top.cpu().long(), all_idx.cpu().long(), scores.cpu().float()
    atomic_write(fn_out, lambda tmp: torch.save(top, tmp))
    atomic_write(attrib_ids_all_path(fn_out), lambda tmp: torch.save([top, all_idx, scores], tmp))


def load_attrib_ids(fn_out, with_all: bool = False):
    """top [Ng, k]; with_all: (top, all_idx [Nt], scores [Ng, Nt]) from the `_all.pt` file."""
    if not with_all:
        return load_checkpoint(fn_out)
    top, all_idx, scores = load_checkpoint(attrib_ids_all_path(fn_out))
    return top, all_idx, scores
