"""Image and label loading: sklearn digits (the embedded demo data), tensor files, image folders.

Images come back as float32 [N, C, H, W] in [-1, 1] (the reference's data range). Every failure
raises a ValueError (or FileNotFoundError) naming the file and what was expected vs. found.
Pure CPU; nothing here touches the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch.nn import functional as F

PathLike = str | os.PathLike

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TENSOR_EXTENSIONS = (".pt", ".pth", ".npy", ".safetensors")
# PIL modes taken as they are (8 bits per band); "1" and "P" are converted first.
_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def load_digits(size: int = 16, mode: str = "resize") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes; no download).

    Pixel values 0..16 map linearly to [-1, 1] (v/8 − 1). mode:
    - "resize": bilinear upsampling of the 8×8 image to size×size (align_corners=False; for
      size = 8 the images are returned unchanged);
    - "pad": the 8×8 image centered on a size×size canvas of −1 (background); size ≥ 8.
    Returns (images float32 [1797, 1, size, size], labels int64 [1797]).
    """
    from sklearn.datasets import load_digits as _sk_digits

    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"load_digits: size must be a positive int, got {size!r}")
    d = _sk_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1
    y = torch.as_tensor(d.target, dtype=torch.int64)
    if mode == "resize":
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    elif mode == "pad":
        if size < 8:
            raise ValueError(f'load_digits(mode="pad"): size must be >= 8, got {size}')
        lo = (size - 8) // 2
        canvas = torch.full((x.shape[0], 1, size, size), -1.0)
        canvas[:, :, lo : lo + 8, lo : lo + 8] = x
        x = canvas
    else:
        raise ValueError(f'load_digits: mode must be "resize" or "pad", got {mode!r}')
    return x.clamp_(-1, 1).contiguous(), y


# -- tensor files ---------------------------------------------------------------------------------
def _split_key(path: PathLike) -> tuple[Path, str | None]:
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


def load_tensor_file(path: PathLike) -> torch.Tensor:
    """One tensor from a .pt/.pth (torch.load, weights_only), .npy (no pickles) or .safetensors
    file. `path:key` picks a named tensor from a safetensors file or a dict saved with torch.save;
    without a key the file must hold exactly one tensor."""
    p, key = _split_key(path)
    ext = p.suffix.lower()
    if ext not in TENSOR_EXTENSIONS:
        raise ValueError(
            f"{p}: unknown tensor file extension {ext!r}; expected one of "
            f"{', '.join(TENSOR_EXTENSIONS)} (or a folder of images)"
        )
    try:
        if ext == ".safetensors":
            from safetensors.torch import load_file

            return _pick(load_file(str(p)), p, key)
        if ext == ".npy":
            import numpy as np

            if key is not None:
                raise ValueError(f"{p}: a .npy file holds one array; a ':{key}' key is not allowed")
            return torch.from_numpy(np.load(p, allow_pickle=False))
        obj = torch.load(p, map_location="cpu", weights_only=True)
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
        if key is not None:
            raise ValueError(f"{p}: holds a single tensor; a ':{key}' key is not allowed")
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _pick(obj, p, key)
    raise ValueError(f"{p}: expected a tensor (or a dict of tensors), found {type(obj).__name__}")


# -- image folders --------------------------------------------------------------------------------
def _read_image(f: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im.load()
            if im.mode == "1":
                im = im.convert("L")
            elif im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{f}: cannot read it as an image ({type(e).__name__}: {e})") from e


def load_image_folder(path: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image file (png, jpg, bmp, gif, tif, webp) of a folder, in sorted file-name order.

    All images must share size and mode (L, LA, RGB or RGBA with 8 bits per band; "1" and palette
    images are converted first). Values 0..255 map to [-1, 1] (v/127.5 − 1).
    ids: the integer file stems when every stem is an integer and they are distinct
    (e.g. 0007.png → 7), else 0..N−1.
    Returns (images float32 [N, C, H, W], ids int64 [N]).
    """
    import numpy as np

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(
        f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(
            f"{folder}: expected image files ({', '.join(IMAGE_EXTENSIONS)}), found none"
        )
    arrays = []
    first = None
    for f in files:
        im = _read_image(f)
        if im.mode not in _MODES:
            raise ValueError(
                f"{f}: unsupported image mode {im.mode!r}; expected one of "
                f"{', '.join(_MODES)} (8 bits per band)"
            )
        if first is None:
            first = (f, im.size, im.mode)
        elif (im.size, im.mode) != first[1:]:
            raise ValueError(
                f"{f}: expected {first[1][0]}×{first[1][1]} {first[2]} like {first[0].name}, "
                f"found {im.size[0]}×{im.size[1]} {im.mode}; all images must share size "
                "and mode"
            )
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x.contiguous(), folder_ids(files)


def folder_ids(files) -> torch.Tensor:
    """Dataset ids of an image folder's (sorted) files: their names when every stem is a distinct
    integer ("17.png" → 17), else their positions 0..n−1."""
    stems = [Path(f).stem for f in files]
    if all(re.fullmatch(r"-?[0-9]+", s) for s in stems):
        nums = [int(s) for s in stems]
        if len(set(nums)) == len(nums):
            return torch.tensor(nums, dtype=torch.int64)
    return torch.arange(len(files), dtype=torch.int64)


# -- dispatch -------------------------------------------------------------------------------------
def _as_images(x: torch.Tensor, where: str) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(
            f"{where}: expected images [N, C, H, W], found a tensor of shape {tuple(x.shape)}"
        )
    if x.dtype == torch.uint8:  # the reference's storage format: 0..255
        return x.float() / 127.5 - 1
    if not torch.is_floating_point(x):
        raise ValueError(
            f"{where}: expected float images in [-1, 1] (or uint8 0..255), found dtype {x.dtype}"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{where}: images contain NaN or Inf")
    return x.float().contiguous()


def load_images(path: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A folder of images (`load_image_folder`) or a tensor file (`load_tensor_file`, [N, C, H, W]
    float in the model's range, or uint8 0..255 mapped to [-1, 1]).
    Returns (images float32 [N, C, H, W], ids int64 [N]; 0..N−1 for tensor files)."""
    s = os.fspath(path)
    if os.path.isdir(s):
        return load_image_folder(s)
    x = _as_images(load_tensor_file(s), s)
    return x, torch.arange(x.shape[0], dtype=torch.int64)


def load_labels(path: PathLike, n: int | None = None) -> torch.Tensor:
    """Labels from a tensor file: class ids int64 [N] or label vectors float32 [N, D] (e.g.
    one-hot). n: the number of images they belong to (checked when given)."""
    s = os.fspath(path)
    y = load_tensor_file(s)
    if y.ndim == 1:
        if torch.is_floating_point(y) or y.dtype == torch.bool or y.is_complex():
            raise ValueError(
                f"{s}: expected integer class ids [N] (or float label vectors [N, D]), "
                f"found dtype {y.dtype} of shape {tuple(y.shape)}"
            )
        y = y.long()
    elif y.ndim == 2:
        if y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"{s}: expected label vectors [N, D] of a real dtype, found {y.dtype}")
        y = y.float()
        if not torch.isfinite(y).all():
            raise ValueError(f"{s}: labels contain NaN or Inf")
    else:
        raise ValueError(
            f"{s}: expected class ids [N] or label vectors [N, D], found shape {tuple(y.shape)}"
        )
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{s}: expected {n} labels (one per image), found {y.shape[0]}")
    return y.contiguous()
