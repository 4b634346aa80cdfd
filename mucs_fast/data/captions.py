"""Captioned image folders, as diffusers' text-to-image scripts read them (train_text_to_image.py,
train_text_to_image_lora.py): an imagefolder whose `metadata.jsonl` holds one JSON object per
line with the image's `file_name` and its caption (column `text` by default).

`read_captioned_folder` checks the whole folder before anything heavy runs: every line parses,
every caption is a string (a list of captions: its first, as the scripts do outside training),
every file exists once, opens and decodes as an image, and, without a `resolution`, all share one
size. Errors are one line naming the file (and the metadata line).

`preprocess` is the scripts' image transform without its random parts: RGB, `Resize(resolution)`
(shorter side, bilinear with antialiasing, as torchvision resizes PIL images), `CenterCrop`.
A random crop or flip cannot be replayed, so the center crop stands for the scripts' RandomCrop;
README says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import read_image

METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class CaptionedFolder:
    """The images of a captioned folder, in metadata order (their ids are positions 0..N−1)."""

    folder: Path
    files: tuple[Path, ...]  # absolute paths
    names: tuple[str, ...]  # `file_name` as metadata.jsonl writes it
    captions: tuple[str, ...]
    size: tuple[int, int] | None  # (W, H) shared by every image, None when sizes differ

    def __len__(self) -> int:
        return len(self.files)


def _caption(value, where: str) -> str:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0]
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a caption string, found {type(value).__name__}")
    return value


def read_captioned_folder(
    folder,
    image_column: str = "image",
    caption_column: str = "text",
    resolution: int | None = None,
) -> CaptionedFolder:
    """The checked contents of a captioned folder (module docstring).

    image_column: "image" (the scripts' default) reads each line's `file_name`, as the
    datasets library builds the image column of an imagefolder; another name reads that key.
    resolution: the size images are resized and cropped to; None: images must share one size.
    """
    root = Path(folder)
    meta = root / METADATA
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if not meta.is_file():
        raise FileNotFoundError(
            f"{root}: no {METADATA} (one JSON object per line: file_name and a caption)"
        )
    key = "file_name" if image_column == "image" else image_column
    files, names, captions, seen = [], [], [], {}
    with open(meta, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{meta}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(row).__name__}")
            for k, flag in ((key, "--image-column"), (caption_column, "--caption-column")):
                if k not in row:
                    raise ValueError(f"{where}: no {k!r} ({flag}); the line has {sorted(row)}")
            name = row[key]
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: {key!r} must be a file name, found {name!r}")
            if name in seen:
                raise ValueError(f"{where}: {name!r} is listed twice (first on line {seen[name]})")
            seen[name] = lineno
            files.append((root / name).resolve())
            names.append(name)
            captions.append(_caption(row[caption_column], f"{where}: {caption_column!r}"))
    if not files:
        raise ValueError(f"{meta}: lists no images")
    size = _check_images(files, resolution)
    return CaptionedFolder(root, tuple(files), tuple(names), tuple(captions), size)


def _check_images(files, resolution) -> tuple[int, int] | None:
    """Every file opens and decodes (a truncated or corrupt file fails here, not mid-run); the
    shared size, which must exist without a resolution."""
    sizes = []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such image (listed in {METADATA})")
        sizes.append(read_image(f).size)
    if all(s == sizes[0] for s in sizes):
        return sizes[0]
    if resolution is None:
        i = next(i for i, s in enumerate(sizes) if s != sizes[0])
        raise ValueError(
            f"{files[i]}: {sizes[i][0]}×{sizes[i][1]}, but {files[0].name} is "
            f"{sizes[0][0]}×{sizes[0][1]}; images of different sizes need --resolution"
        )
    return None


def preprocess(f, resolution: int | None = None) -> np.ndarray:
    """uint8 [3, R, R] (or [3, H, W] without a resolution) of an image file: RGB, the shorter
    side resized to R (bilinear, antialiased), center-cropped to R×R."""
    from PIL import Image

    im = read_image(Path(f)).convert("RGB")
    if resolution is not None:
        R = int(resolution)
        w, h = im.size
        if (w, h) != (R, R):
            # torchvision's Resize(int) of a PIL image: the shorter side becomes R
            nw, nh = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BILINEAR)
            w, h = im.size
            top, left = int(round((h - R) / 2.0)), int(round((w - R) / 2.0))
            im = im.crop((left, top, left + R, top + R))
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def distinct_captions(captions) -> tuple[list[str], torch.Tensor]:
    """(the distinct captions in first-appearance order, each caption's index among them
    int64 [n]): a text model's caption table and its condition ids."""
    index: dict[str, int] = {}
    ids = [index.setdefault(c, len(index)) for c in captions]
    return list(index), torch.tensor(ids, dtype=torch.int64)


def read_prompts(path) -> list[str]:
    """Prompts from a file: a .json list of strings, or one prompt per non-empty line."""
    p = Path(os.fspath(path))
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such prompts file")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not JSON ({e.msg})") from None
        if not (isinstance(prompts, list) and all(isinstance(s, str) for s in prompts)):
            raise ValueError(f"{p}: expected a JSON list of prompt strings")
    else:
        prompts = [s.strip() for s in text.splitlines() if s.strip()]
    if not prompts:
        raise ValueError(f"{p}: holds no prompts")
    return prompts


def stack_images(files, resolution: int | None = None) -> torch.Tensor:
    """uint8 [n, 3, R, R] of `preprocess`ed files (a chunk of an encoding pass)."""
    return torch.from_numpy(np.stack([preprocess(f, resolution) for f in files]))
