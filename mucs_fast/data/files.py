"""Training data read whole from files: tensor files (.pt, .npy, .safetensors), labels files and
folders of images.

Images come back as float32 [N, C, H, W] in [-1, 1] (the reference's data range). Every failure
raises a ValueError (or FileNotFoundError) naming the file and what was expected vs. found.
Pure CPU; nothing here touches the network. (Large sets are streamed instead: `stream.open_source`.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from .checks import check_chw, check_labels, to_model_range

PathLike = str | os.PathLike

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TENSOR_EXTENSIONS = (".pt", ".pth", ".npy", ".safetensors")
# PIL modes taken as they are (8 bits per band); "1" and "P" are converted first.
IMAGE_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


# -- tensor files ---------------------------------------------------------------------------------
def split_key(path: PathLike) -> tuple[Path, str | None]:
    """`file` or `file:key` (the key selects one tensor of a .safetensors / dict-holding .pt)."""
    s = os.fspath(path)
    if os.path.exists(s):
        return Path(s), None
    head, sep, key = s.rpartition(":")
    if sep and head and os.path.exists(head) and key:
        return Path(head), key
    raise FileNotFoundError(f"{s}: no such file")


def _pick(tensors: dict, path: Path, key: str | None) -> torch.Tensor:
    if key is not None:
        if key not in tensors:
            raise ValueError(f"{path}: no tensor named {key!r}; found {sorted(tensors)}")
        return tensors[key]
    if len(tensors) != 1:
        raise ValueError(
            f"{path}: expected exactly one tensor (or name one as '{path}:<key>'), "
            f"found {len(tensors)}: {sorted(tensors)}"
        )
    return next(iter(tensors.values()))


def _read_tensors(p: Path, ext: str, key: str | None):
    if ext == ".safetensors":
        from safetensors.torch import load_file

        return _pick(load_file(str(p)), p, key)
    if ext == ".npy":
        if key is not None:
            raise ValueError(f"{p}: a .npy file holds one array; a ':{key}' key is not allowed")
        return torch.from_numpy(np.load(p, allow_pickle=False))
    return torch.load(p, map_location="cpu", weights_only=True)


def load_tensor_file(path: PathLike) -> torch.Tensor:
    """One tensor from a .pt/.pth (torch.load, weights_only), .npy (no pickles) or .safetensors
    file. `path:key` picks a named tensor from a safetensors file or a dict saved with torch.save;
    without a key the file must hold exactly one tensor."""
    p, key = split_key(path)
    ext = p.suffix.lower()
    if ext not in TENSOR_EXTENSIONS:
        raise ValueError(
            f"{p}: unknown tensor file extension {ext!r}; expected one of "
            f"{', '.join(TENSOR_EXTENSIONS)} (or a folder of images)"
        )
    try:
        obj = _read_tensors(p, ext, key)
    except ValueError as e:
        if str(p) in str(e):
            raise
        raise ValueError(
            f"{p}: cannot read it as a {ext} tensor file ({type(e).__name__}: {e})"
        ) from e
    except Exception as e:  # corrupt files raise anything from pickle/zip/safetensors errors
        raise ValueError(
            f"{p}: cannot read it as a {ext} tensor file ({type(e).__name__}: {e})"
        ) from e
    if isinstance(obj, torch.Tensor):
        if key is not None and ext in (".pt", ".pth"):
            raise ValueError(f"{p}: holds a single tensor; a ':{key}' key is not allowed")
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _pick(obj, p, key)
    raise ValueError(f"{p}: expected a tensor (or a dict of tensors), found {type(obj).__name__}")


def check_image_tensor(x: torch.Tensor, where: str) -> torch.Tensor:
    """Images [N, C, H, W] as stored: float, or uint8 0..255 (the reference's storage format)."""
    check_chw(x.shape, where)
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(
            f"{where}: expected float images in [-1, 1] (or uint8 0..255), found dtype {x.dtype}"
        )
    return x


def as_images(x: torch.Tensor, where: str) -> torch.Tensor:
    """Stored images → finite float32 [N, C, H, W] in the model's range."""
    x = to_model_range(check_image_tensor(x, where))
    if not torch.isfinite(x).all():
        raise ValueError(f"{where}: images contain NaN or Inf")
    return x


def load_labels(path: PathLike, n: int | None = None) -> torch.Tensor:
    """Labels from a tensor file: class ids int64 [N] or label vectors float32 [N, D] (e.g.
    one-hot). n: the number of images they belong to (checked when given)."""
    s = os.fspath(path)
    y = load_tensor_file(s)
    if n is not None and y.ndim in (1, 2) and y.shape[0] != n:
        raise ValueError(f"{s}: expected {n} labels (one per image), found {y.shape[0]}")
    return check_labels(y, n, s)


# -- image folders --------------------------------------------------------------------------------
def read_image(f: Path):
    """A PIL image in one of IMAGE_MODES ("1" → L, palette → RGB(A)); ValueError naming f."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im.load()
            if im.mode == "1":
                im = im.convert("L")
            elif im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            im = im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{f}: cannot read it as an image ({type(e).__name__}: {e})") from e
    if im.mode not in IMAGE_MODES:
        raise ValueError(
            f"{f}: unsupported image mode {im.mode!r}; expected one of "
            f"{', '.join(IMAGE_MODES)} (8 bits per band)"
        )
    return im


def image_array(f: Path) -> tuple[np.ndarray, str]:
    """(uint8 [H, W, C], PIL mode) of an image file."""
    im = read_image(f)
    a = np.asarray(im, dtype=np.uint8)
    return (a[:, :, None] if a.ndim == 2 else a), im.mode


def check_same_image(f, image: tuple, first_file, first: tuple) -> None:
    """All images of a folder share size and mode (what [N, C, H, W] needs); image and first:
    what `image_array` returns."""
    (a, mode), (a0, mode0) = image, first
    if a.shape != a0.shape or mode != mode0:
        raise ValueError(
            f"{f}: expected {a0.shape[1]}×{a0.shape[0]} {mode0} like {Path(first_file).name}, "
            f"found {a.shape[1]}×{a.shape[0]} {mode}; all images must share size and mode"
        )


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder, in sorted name order (the order of its ids and rows)."""
    return sorted(
        f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
    )


def folder_ids(files) -> torch.Tensor:
    """Dataset ids of an image folder's (sorted) files: their names when every stem is a distinct
    integer ("17.png" → 17), else their positions 0..n−1."""
    stems = [Path(f).stem for f in files]
    if all(re.fullmatch(r"-?[0-9]+", s) for s in stems):
        nums = [int(s) for s in stems]
        if len(set(nums)) == len(nums):
            return torch.tensor(nums, dtype=torch.int64)
    return torch.arange(len(files), dtype=torch.int64)


def load_image_folder(path: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image file (png, jpg, bmp, gif, tif, webp) of a folder, in sorted file-name order.

    All images must share size and mode (L, LA, RGB or RGBA with 8 bits per band; "1" and palette
    images are converted first). Values 0..255 map to [-1, 1] (v/127.5 − 1).
    ids: the integer file stems when every stem is an integer and they are distinct
    (e.g. 0007.png → 7), else 0..N−1.
    Returns (images float32 [N, C, H, W], ids int64 [N]).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = image_files(folder)
    if not files:
        raise ValueError(
            f"{folder}: expected image files ({', '.join(IMAGE_EXTENSIONS)}), found none"
        )
    arrays = [image_array(files[0])]
    for f in files[1:]:
        arrays.append(image_array(f))
        check_same_image(f, arrays[-1], files[0], arrays[0])
    x = torch.from_numpy(np.stack([a for a, _ in arrays])).permute(0, 3, 1, 2)
    return to_model_range(x), folder_ids(files)


def load_images(path: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A folder of images (`load_image_folder`) or a tensor file (`load_tensor_file`, [N, C, H, W]
    float in the model's range, or uint8 0..255 mapped to [-1, 1]).
    Returns (images float32 [N, C, H, W], ids int64 [N]; 0..N−1 for tensor files)."""
    s = os.fspath(path)
    if os.path.isdir(s):
        return load_image_folder(s)
    x = as_images(load_tensor_file(s), s)
    return x, torch.arange(x.shape[0], dtype=torch.int64)
