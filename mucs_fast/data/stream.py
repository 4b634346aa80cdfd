"""Which Source a training set is: `open_source` (a tensor, a path, a packed folder), and which
paths stream at all (`streamable`)."""

from __future__ import annotations

import os

import numpy as np
import torch

from .files import split_key
from .npy import NpySource
from .safetensors_source import SafetensorsSource
from .shards import INDEX, ShardSource
from .source import Source, TensorSource

_FORMATS = (
    "a .npy file, a .safetensors file (path or path:key), a folder packed by "
    "`mucs-fast pack` (with index.json), or an in-memory tensor"
)


def streamable(path) -> bool:
    """Whether `open_source` streams this path (.npy, .safetensors [path or path:key], a packed
    folder) — the formats the CLI does not load whole."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return os.path.isfile(os.path.join(p, INDEX))
    try:
        f, key = split_key(p)
    except FileNotFoundError:
        return False
    return (f.suffix.lower() == ".npy" and key is None) or f.suffix.lower() == ".safetensors"


def open_source(x) -> Source:
    """A Source for x: a Source itself; a tensor [N, C, H, W] (TensorSource); a path to a .npy
    (NpySource) or .safetensors file (`path` or `path:key`, SafetensorsSource); a folder packed
    by `pack` (ShardSource)."""
    if isinstance(x, Source):
        return x
    if isinstance(x, torch.Tensor):
        return TensorSource(x)
    if isinstance(x, np.ndarray):
        return TensorSource(torch.from_numpy(x))
    if not isinstance(x, (str, os.PathLike)):
        raise ValueError(f"cannot stream a {type(x).__name__}: expected {_FORMATS}")  # noqa: TRY004
    s = os.fspath(x)
    if os.path.isdir(s):
        if os.path.isfile(os.path.join(s, INDEX)):
            return ShardSource(s)
        raise ValueError(
            f"{s}: a folder without {INDEX} is not a packed folder (an image folder or a "
            f"reference dataset folder is packed first: mucs-fast pack {s} OUT); expected "
            f"{_FORMATS}"
        )
    p, key = split_key(s)  # FileNotFoundError when there is no such file
    ext = p.suffix.lower()
    if ext == ".npy" and key is None:
        return NpySource(p)
    if ext == ".safetensors":
        return SafetensorsSource(p, key)
    raise ValueError(
        f"{s}: cannot stream a {ext or 'extensionless'} file; expected {_FORMATS} "
        "(.pt files are read whole by mucs_fast.data.load_images, or packed first with "
        "mucs-fast pack)"
    )
