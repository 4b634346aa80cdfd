"""The reference implementation's files, read and written without its code.

- `samples.pt` (its generate.py): `[idx [N], x [N, C, H, W], y [N, label_dim], xgen [N, C, H, W],
  extra dict]`; the first `num_attrib` rows are the targets, the rest controls.
- `attrib-ids.pt` (its attrib.py): int64 [Ng, k] training ids, best first; beside it
  `attrib-ids_all.pt` = `[top [Ng, k], all_idx [Nt], scores [Ng, Nt]]`.
- dataset folder (its scripts/preproc_data): `metadata.pt`, a dict with `image_size` [C, H, W],
  `image_mean`, `image_std`, `label_dim`, `num_samples`, `filenames` {split: [relative paths]}, ...,
  and one `pt_files/<last 3 digits of the zero-padded idx>/<idx>.pt` per image holding
  `[idx, x uint8 [C, H, W], y, caption]`. Images enter the model as (x/255 − 0.5)/0.5, center
  cropped to min(H, W); a y with several rows (several captions) contributes its first row.
- a dataset object of the reference (its `filenames`, `meta`) as resident tensors
  (`dataset_tensors`), read from its files once instead of item by item.

Every reader uses `torch.load(weights_only=True)` inside `omegaconf_safe_globals` (checkpoints and
metadata of the reference may hold omegaconf containers). Every writer is atomic.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import os
import typing
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from .._io import atomic_write

PT_FOLDER = "pt_files"
METADATA = "metadata.pt"
_SAFE_BUILTINS = (
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "int",
    "float",
    "complex",
    "str",
    "bytes",
    "bool",
    "object",
)


# --------------------------------------------------------------------------------------------
# omegaconf in checkpoints
# --------------------------------------------------------------------------------------------
def omegaconf_globals() -> list:
    """The classes a pickled omegaconf container refers to (DictConfig, ListConfig, their
    metadata, every node type), plus the plain types and `typing.Any` their metadata records.
    Empty when omegaconf is not installed (then no checkpoint can hold its objects)."""
    try:
        import omegaconf
        from omegaconf import base, nodes
    except ImportError:
        return []
    out = [
        omegaconf.DictConfig,
        omegaconf.ListConfig,
        base.ContainerMetadata,
        base.Metadata,
        typing.Any,
        collections.defaultdict,
        collections.OrderedDict,
    ]
    out += [getattr(builtins, n) for n in _SAFE_BUILTINS]
    for name in dir(nodes):
        obj = getattr(nodes, name)
        if isinstance(obj, type) and issubclass(obj, base.Node) and obj not in out:
            out.append(obj)
    return out


@contextlib.contextmanager
def omegaconf_safe_globals():
    """`torch.load(weights_only=True)` inside this context accepts omegaconf containers (the
    reference's training script stores its config in every checkpoint; torch ≥ 2.6 loads with
    weights_only=True by default and refuses them). Nothing else is allowlisted."""
    allowed = omegaconf_globals()
    if not allowed:
        yield
        return
    with torch.serialization.safe_globals(allowed):
        yield


def install_omegaconf_safe_globals() -> None:
    """Process-wide version of `omegaconf_safe_globals` (for scripts that load checkpoints
    themselves, e.g. the reference's attrib.py through `python -m mucs_fast.compat`)."""
    allowed = omegaconf_globals()
    if allowed:
        torch.serialization.add_safe_globals(allowed)


def load_checkpoint(path, map_location="cpu", weights_only: bool = True):
    """`torch.load` of a reference checkpoint (or any file it writes), omegaconf objects included,
    still with weights_only=True: no arbitrary code runs."""
    with omegaconf_safe_globals():
        return torch.load(path, map_location=map_location, weights_only=weights_only)


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
            f"got {type(obj).__name__}{f' of {len(obj)}' if isinstance(obj, (list, tuple)) else ''})"
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


# --------------------------------------------------------------------------------------------
# dataset folder
# --------------------------------------------------------------------------------------------
class ReferenceData(NamedTuple):
    ids: torch.Tensor  # int64 [N] dataset ids, in the split's file order
    x: torch.Tensor  # float32 [N, C, H, W] in [-1, 1]
    y: torch.Tensor  # float32 [N, label_dim]


def load_metadata(path) -> dict:
    fn = os.path.join(os.fspath(path), METADATA)
    if not os.path.isfile(fn):
        raise FileNotFoundError(f"{path}: no {METADATA} (not a reference dataset folder)")
    meta = load_checkpoint(fn)
    if not isinstance(meta, dict) or "filenames" not in meta:
        raise ValueError(f"{fn}: expected a dict with 'filenames', got {type(meta).__name__}")
    return meta


def split_filenames(meta: dict, split: str = "train", seed: int = 44) -> list[str]:
    """Relative file names of a split, named as the reference's dataset does: "train" / "valid" /
    "test" (or "orig-<part>"), "full" (all parts), "half-a" / "half-b" (a seeded half of train)."""
    fns = meta["filenames"]
    if split.startswith("full"):
        return [f for part in ("train", "valid", "test") for f in fns.get(part, [])]
    part = split.removeprefix("orig-")
    if part in fns:
        return list(fns[part])
    if split in ("half-a", "half-b"):
        train = fns["train"]
        perm = torch.randperm(
            len(train), generator=torch.Generator("cpu").manual_seed(seed)
        ).tolist()
        half = perm[: len(perm) // 2] if split == "half-a" else perm[len(perm) // 2 :]
        return [train[i] for i in half]
    raise ValueError(
        f"split {split!r}: expected one of {sorted(fns)}, 'orig-<part>', 'full', 'half-a', 'half-b'"
    )


def _read_item(fn: str):
    item = torch.load(fn, map_location="cpu", weights_only=True)
    if not (isinstance(item, (list, tuple)) and len(item) >= 3):
        raise ValueError(
            f"{fn}: expected [idx, x uint8 [C, H, W], y, caption, ...], got {type(item).__name__}"
        )
    return item


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, H, W] → float32 in [-1, 1] as the reference normalizes: (x/255 − 0.5)/0.5."""
    return x_uint8.float().div_(255).sub_(0.5).div_(0.5)


def center_crop(x: torch.Tensor) -> torch.Tensor:
    """Crop [..., H, W] to a centered min(H, W) square (torchvision's CenterCrop rounding)."""
    H, W = x.shape[-2:]
    s = min(H, W)
    top, left = round((H - s) / 2.0), round((W - s) / 2.0)
    return x[..., top : top + s, left : left + s]


def _label_row(y) -> torch.Tensor:
    y = torch.as_tensor(y)
    return y[0] if y.dim() > 1 else y


def load_files(filenames: Sequence[str], threads: int = 8) -> ReferenceData:
    """Load image files of the reference's format (full paths) into memory, in order, with a
    thread pool: once, not per step. Returns (ids, x float32 in [-1, 1], y float32)."""
    if not filenames:
        raise ValueError("no files to load (empty split)")
    with omegaconf_safe_globals():
        if threads > 1 and len(filenames) > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                items = list(pool.map(_read_item, filenames, chunksize=64))
        else:
            items = [_read_item(f) for f in filenames]
    ids = torch.tensor([int(it[0]) for it in items], dtype=torch.int64)
    x = torch.stack([center_crop(torch.as_tensor(it[1])) for it in items])
    x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
    y = torch.stack([_label_row(it[2]) for it in items]).float()
    return ReferenceData(ids, x.contiguous(), y.contiguous())


def load_dataset(path, split: str = "train", threads: int = 8, seed: int = 44) -> ReferenceData:
    """A reference dataset folder's split as in-memory tensors: (ids int64 [N], x float32
    [N, C, H, W] in [-1, 1], y float32 [N, label_dim]), in the split's file order."""
    path = os.fspath(path)
    meta = load_metadata(path)
    fns = [os.path.join(path, f) for f in split_filenames(meta, split, seed)]
    missing = [f for f in fns[:1000] if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"{path}: {len(missing)} image files of split {split!r} are missing, e.g. {missing[0]}"
        )
    return load_files(fns, threads)


def dataset_tensors(ds, threads: int = 8) -> ReferenceData:
    """All items of a map-style dataset as tensors (ids, x, y), read once.

    The reference's own dataset class (files listed in `.filenames`, `.meta`, no augmentation,
    no z-normalization) is read straight from its files with `load_files`; any other dataset is
    indexed item by item (threads too: `threads=1` for datasets that are not thread-safe)."""
    fns = getattr(ds, "filenames", None)
    if (
        isinstance(fns, list)
        and isinstance(getattr(ds, "meta", None), dict)
        and not getattr(ds, "znorm", False)
        and not getattr(ds, "augment", False)
        and fns
        and all(isinstance(f, str) for f in fns[:1])
        and os.path.isfile(fns[0])
    ):
        return load_files(fns, threads)
    n = len(ds)
    if n == 0:
        raise ValueError("the training dataset is empty")

    def get(i):
        item = ds[i]
        return item[0], item[1], item[2]

    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            items = list(pool.map(get, range(n), chunksize=64))
    else:
        items = [get(i) for i in range(n)]
    ids = torch.as_tensor([int(i) for i, _, _ in items], dtype=torch.int64)
    x = torch.stack([torch.as_tensor(x) for _, x, _ in items]).float()
    y = torch.stack([torch.as_tensor(y) for _, _, y in items])
    return ReferenceData(ids, x, y.float() if torch.is_floating_point(y) else y)


def save_dataset(
    path,
    x: torch.Tensor,
    y: torch.Tensor,
    ids=None,
    captions: Sequence[str] | None = None,
    splits: dict | None = None,
    name: str = "mucs_fast",
    threads: int = 8,
) -> dict:
    """Write a reference dataset folder. x: uint8 [N, C, H, W] or float in [-1, 1]; y: [N, label_dim]
    (or class ids [N], one-hot encoded with label_dim = max + 1); ids: dataset ids (default 0..N−1);
    splits: {"train": positions, "test": positions, ...} (default: all "train").
    Returns the metadata dict it wrote."""
    path = os.fspath(path)
    N = x.shape[0]
    if x.dtype != torch.uint8:
        x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.as_tensor(y)
    if y.dim() == 1 and not torch.is_floating_point(y):
        y = torch.nn.functional.one_hot(y.long(), int(y.max()) + 1).float()
    ids = torch.arange(N) if ids is None else torch.as_tensor(ids).long()
    if ids.shape != (N,) or y.shape[0] != N:
        raise ValueError(f"save_dataset: {N} images but ids {tuple(ids.shape)}, y {tuple(y.shape)}")
    width = max(3, len(str(int(ids.max()))))
    rel = []
    for i in ids.tolist():
        s = str(i).zfill(width)
        rel.append(os.path.join(PT_FOLDER, s[-3:], s + ".pt"))
    for d in sorted({os.path.dirname(r) for r in rel}):
        os.makedirs(os.path.join(path, d), exist_ok=True)

    def write(i):
        c = captions[i] if captions is not None else ""
        torch.save([int(ids[i]), x[i].clone(), y[i].clone(), c], os.path.join(path, rel[i]))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(write, range(N)))
    splits = {"train": range(N)} if splits is None else splits
    xf = x.float() / 255
    meta = {
        "dataset_name": name,
        "image_size": torch.Size(x.shape[1:]),
        "image_mean": xf.mean((0, 2, 3), keepdim=True).squeeze(0),
        "image_std": xf.std((0, 2, 3), keepdim=True).squeeze(0),
        "label_dim": int(y.shape[1]),
        "num_samples": N,
        "filenames": {k: [rel[int(i)] for i in v] for k, v in splits.items()},
    }
    atomic_write(os.path.join(path, METADATA), lambda tmp: torch.save(meta, tmp))
    return meta
