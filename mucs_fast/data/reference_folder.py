"""The reference implementation's dataset folder (its scripts/preproc_data), read and written
without its code.

`metadata.pt`, a dict with `image_size` [C, H, W], `image_mean`, `image_std`, `label_dim`,
`num_samples`, `filenames` {split: [relative paths]}, ..., and one
`pt_files/<last 3 digits of the zero-padded idx>/<idx>.pt` per image holding
`[idx, x uint8 [C, H, W], y, caption]`. Images enter the model as (x/255 − 0.5)/0.5 (bitwise
`checks.to_model_range`), center cropped to min(H, W); a y with several rows (several captions)
contributes its first row. A dataset object of the reference (its `filenames`, `meta`) reads as
resident tensors (`dataset_tensors`), from its files once instead of item by item.

Every reader uses `torch.load(weights_only=True)` inside `omegaconf_safe_globals` (metadata of the
reference may hold omegaconf containers). Every writer is atomic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from .._io import atomic_write
from ..safe_load import load_checkpoint, omegaconf_safe_globals
from .checks import to_model_range

PT_FOLDER = "pt_files"
METADATA = "metadata.pt"


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


def read_item(fn: str):
    item = torch.load(fn, map_location="cpu", weights_only=True)
    if not (isinstance(item, (list, tuple)) and len(item) >= 3):
        raise ValueError(
            f"{fn}: expected [idx, x uint8 [C, H, W], y, caption, ...], got {type(item).__name__}"
        )
    return item


def center_crop(x: torch.Tensor) -> torch.Tensor:
    """Crop [..., H, W] to a centered min(H, W) square (torchvision's CenterCrop rounding)."""
    H, W = x.shape[-2:]
    s = min(H, W)
    top, left = round((H - s) / 2.0), round((W - s) / 2.0)
    return x[..., top : top + s, left : left + s]


def label_row(y) -> torch.Tensor:
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
                items = list(pool.map(read_item, filenames, chunksize=64))
        else:
            items = [read_item(f) for f in filenames]
    ids = torch.tensor([int(it[0]) for it in items], dtype=torch.int64)
    x = torch.stack([center_crop(torch.as_tensor(it[1])) for it in items])
    x = to_model_range(x)
    y = torch.stack([label_row(it[2]) for it in items]).float()
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
    """Write a reference dataset folder. x: uint8 [N, C, H, W] or float in [-1, 1]; y: [N,
    label_dim] (or class ids [N], one-hot encoded with label_dim = max + 1); ids: dataset ids
    (default 0..N−1); splits: {"train": positions, "test": positions, ...} (default: all "train").
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
