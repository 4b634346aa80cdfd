"""`pack`: write the packed folder (`shards`, format 1) from an image folder, a tensor file, the
reference's dataset folder, another packed folder or a Source — in chunks, so the dataset never
needs to fit in memory (except a .pt file, which torch.load reads whole).

Every file is written to a temporary and moved into place; index.json is removed first and
written last, so a folder without it is an incomplete pack. A failed pack removes the pack files
of OUT (its own and a previous pack's).
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import atomic_path, atomic_write, atomic_write_json, is_temp_name
from .._version import __version__
from ..safe_load import omegaconf_safe_globals
from .checks import check_labels, to_model_range
from .files import (
    IMAGE_EXTENSIONS,
    TENSOR_EXTENSIONS,
    check_image_tensor,
    check_same_image,
    folder_ids,
    image_array,
    image_files,
    load_labels,
    load_tensor_file,
    split_key,
)
from .npy import NUMPY_DTYPES
from .reference_folder import center_crop, label_row, load_metadata, read_item, split_filenames
from .shards import FORMAT, IDS_FILE, INDEX, LABELS_FILE, SHARD_NAME, ShardSource
from .source import Source, TensorSource, images_per_chunk
from .stream import open_source


class _Input:
    """What `pack` reads: N, chw, the stored dtype, ids/labels (None when collected from the
    items), and `items(start, stop)` → (raw [n, C, H, W], ids [n] or None, labels or None)."""

    def __init__(self, N, chw, dtype, items, ids=None, labels=None, describe=None):
        self.N, self.chw, self.dtype, self.items = N, tuple(chw), dtype, items
        self.ids, self.labels, self.describe = ids, labels, describe or {}


def _source_input(src: Source, describe: dict) -> _Input:
    return _Input(
        src.N,
        src.chw,
        src.storage_dtype,
        lambda a, b: (src.read_raw(a, b), None, None),
        ids=src.ids if src.ids is not None else torch.arange(src.N, dtype=torch.int64),
        labels=src.labels,
        describe=describe,
    )


def _image_folder_input(folder: Path, threads: int) -> _Input:
    files = image_files(folder)  # the file order and ids of files.load_image_folder
    if not files:
        raise ValueError(
            f"{folder}: expected image files ({', '.join(IMAGE_EXTENSIONS)}), found none "
            f"(nor {INDEX} of a packed folder, nor metadata.pt of a reference dataset folder)"
        )
    first = image_array(files[0])

    def items(a, b):
        with ThreadPoolExecutor(max_workers=threads) as pool:
            got = list(pool.map(image_array, files[a:b]))
        for f, arr in zip(files[a:b], got):
            check_same_image(f, arr, files[0], first)
        x = torch.from_numpy(np.stack([a for a, _ in got])).permute(0, 3, 1, 2).contiguous()
        return x, None, None

    H, W, C = first[0].shape
    return _Input(
        len(files),
        (C, H, W),
        torch.uint8,
        items,
        ids=folder_ids(files),
        describe={"kind": "image folder", "path": os.path.abspath(folder)},
    )


def _reference_input(folder: Path, split: str, threads: int) -> _Input:
    meta = load_metadata(folder)
    fns = [os.path.join(folder, f) for f in split_filenames(meta, split)]
    if not fns:
        raise ValueError(f"{folder}: split {split!r} is empty")
    missing = [f for f in fns if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"{folder}: {len(missing)} image files of split {split!r} are missing, "
            f"e.g. {missing[0]}"
        )

    def read(fn):
        item = read_item(fn)
        return fn, int(item[0]), center_crop(torch.as_tensor(item[1])), label_row(item[2])

    with omegaconf_safe_globals():
        first = read(fns[0])
    x0 = first[2]
    if x0.ndim != 3:
        raise ValueError(f"{fns[0]}: expected an image [C, H, W], found shape {tuple(x0.shape)}")
    if first[3].ndim != 1:
        raise ValueError(
            f"{fns[0]}: expected a label vector [label_dim], found shape {tuple(first[3].shape)}"
        )
    dtype = torch.uint8 if x0.dtype == torch.uint8 else torch.float32

    def items(a, b):
        with omegaconf_safe_globals(), ThreadPoolExecutor(max_workers=threads) as pool:
            got = list(pool.map(read, fns[a:b]))
        for fn, _, x, y in got:
            if x.shape != x0.shape or (x.dtype == torch.uint8) != (dtype == torch.uint8):
                raise ValueError(
                    f"{fn}: image {x.dtype} {tuple(x.shape)} (after the center crop), "
                    f"expected {x0.dtype} {tuple(x0.shape)} like {fns[0]}"
                )
            if y.shape != first[3].shape:
                raise ValueError(
                    f"{fn}: label of shape {tuple(y.shape)}, expected "
                    f"{tuple(first[3].shape)} like {fns[0]}"
                )
        x = torch.stack([g[2] for g in got])
        x = x if dtype == torch.uint8 else x.float()
        ids = torch.tensor([g[1] for g in got], dtype=torch.int64)
        return x.contiguous(), ids, torch.stack([g[3] for g in got]).float()

    return _Input(
        len(fns),
        tuple(x0.shape),
        dtype,
        items,
        describe={
            "kind": "reference dataset folder",
            "path": os.path.abspath(folder),
            "split": split,
        },
    )


def _pack_input(src, split, labels, threads) -> _Input:
    """SRC as a pack input, its labels merged; every check that reads SRC happens here."""
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        folder = Path(s)
        if (
            folder.is_dir()
            and not (folder / INDEX).is_file()
            and (folder / "metadata.pt").is_file()
        ):
            if labels is not None:
                raise ValueError(
                    f"{s}: a reference dataset folder carries its labels; give no labels file"
                )
            return _reference_input(folder, split or "train", threads)
        if split is not None:
            raise ValueError(
                f"{s}: a split applies only to a reference dataset folder (metadata.pt + pt_files/)"
            )
        if folder.is_dir():
            inp = (
                _source_input(ShardSource(folder), {"kind": "packed folder"})
                if (folder / INDEX).is_file()
                else _image_folder_input(folder, threads)
            )
            inp.describe["path"] = os.path.abspath(folder)
        else:
            p, _ = split_key(s)
            ext = p.suffix.lower()
            if ext in (".pt", ".pth"):  # torch.load reads it whole
                src_ = TensorSource(check_image_tensor(load_tensor_file(s), s))
            elif ext in TENSOR_EXTENSIONS:
                src_ = open_source(s)
            else:
                raise ValueError(
                    f"{s}: expected an image folder, a reference dataset folder "
                    f"(metadata.pt + pt_files/), a packed folder or a tensor file "
                    f"({', '.join(TENSOR_EXTENSIONS)}), found a {ext or 'extensionless'} file"
                )
            inp = _source_input(src_, {"kind": f"{ext} file", "path": os.path.abspath(p)})
    else:
        if split is not None:
            raise ValueError("pack: a split applies only to a reference dataset folder")
        src_ = open_source(src)
        inp = _source_input(src_, {"kind": type(src_).__name__})
        if getattr(src_, "path", None) is not None:
            inp.describe["path"] = os.path.abspath(src_.path)
    if labels is not None:
        if inp.labels is not None:
            raise ValueError("pack: the source carries labels already; give no labels")
        if isinstance(labels, (str, os.PathLike)):
            inp.labels = load_labels(labels, inp.N)
        else:
            inp.labels = check_labels(labels, inp.N, "labels")
    return inp


def _is_pack_file(name: str) -> bool:
    return (
        name in (INDEX, IDS_FILE, LABELS_FILE)
        or bool(SHARD_NAME.fullmatch(name))
        or is_temp_name(name)
    )


def _prepare_out(out: Path, inp: _Input) -> None:
    """OUT: new, empty, or a previous (or interrupted) pack; its index.json goes first."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    root = inp.describe.get("path")
    if root and out.exists() and os.path.samefile(root, out):
        raise ValueError(f"{out}: cannot pack a folder onto itself; give another OUT")
    out.mkdir(parents=True, exist_ok=True)
    names = os.listdir(out)
    if INDEX not in names:
        foreign = sorted(n for n in names if not _is_pack_file(n))
        if foreign:
            raise ValueError(
                f"{out}: not empty and not a packed folder (holds {foreign[0]!r}"
                f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
                "give a new or empty folder"
            )
    else:
        os.unlink(out / INDEX)  # from here on the old pack reads as incomplete
    for n in names:
        if is_temp_name(n):
            os.unlink(out / n)


class _HashingWriter:
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> None:
        b = memoryview(b).cast("B")
        self.f.write(b)
        self.h.update(b)
        self.n += b.nbytes


def _npy_header_bytes(dtype: np.dtype, shape) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        b,
        {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": tuple(shape),
        },
    )
    return b.getvalue()


def _stored(inp: _Input) -> torch.dtype:
    if inp.dtype in (torch.uint8, torch.float16):
        return inp.dtype
    return torch.float32


def pack(
    src,
    out,
    shard_images: int = 65536,
    progress: bool = True,
    *,
    labels=None,
    split: str | None = None,
    threads: int = 8,
) -> dict:
    """Write the packed folder OUT (`shards` docstring) from SRC: an image folder (the files and
    ids of `files.load_image_folder`), a tensor file (.npy / .safetensors streamed; .pt read whole
    by `files.load_tensor_file`), a reference dataset folder (metadata.pt + pt_files/; `split`,
    default "train"; its ids and labels), a packed folder (to reshard it), or a Source / tensor.
    labels: a labels file (`files.load_labels`) or tensor, for sources without their own.
    Reads and writes in chunks of at most `shard_images` images and CHUNK_BYTES of float32, so
    the dataset never needs to fit in memory (except a .pt file). uint8 and float16 stay as they
    are; other dtypes are stored as float32. Images with NaN/Inf are refused.
    Returns the index it wrote."""
    if not (isinstance(shard_images, int) and shard_images >= 1):
        raise ValueError(f"pack: shard_images must be a positive int, got {shard_images!r}")
    inp = _pack_input(
        src, split, labels, threads
    )  # everything about SRC checked before OUT changes
    out = Path(out)
    _prepare_out(out, inp)
    w = _Writer(inp, min(shard_images, images_per_chunk(inp.chw)))
    S = -(-inp.N // shard_images)
    width = max(5, len(str(S - 1)))
    bar = tqdm(
        total=inp.N,
        desc="pack",
        unit="img",
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
        disable=not progress,
    )
    try:
        shards = [
            w.shard(
                out / f"shard-{k:0{width}d}.npy",
                k * shard_images,
                min(shard_images, inp.N - k * shard_images),
                bar,
            )
            for k in range(S)
        ]
        index = w.finish(out, shards)
    except BaseException:
        for n in os.listdir(out):  # no index.json: an incomplete folder; leave no shards behind
            if _is_pack_file(n):
                os.unlink(out / n)
        raise
    finally:
        bar.close()
    keep = {
        INDEX,
        IDS_FILE,
        *(s["file"] for s in shards),
        *([LABELS_FILE] if index["labels"] else []),
    }
    for n in os.listdir(out):  # a previous, larger pack's shards
        if _is_pack_file(n) and n not in keep:
            os.unlink(out / n)
    return index


class _Writer:
    """One pass over the input: its shards written chunk by chunk, the float32 fingerprint of what
    the packed folder reads as, and the ids and labels the items carry, collected on the way."""

    def __init__(self, inp: _Input, chunk: int):
        self.inp, self.chunk = inp, chunk
        self.stored = _stored(inp)
        self.npd = np.dtype(NUMPY_DTYPES[self.stored])
        self.fp = hashlib.sha256(f"{torch.float32}{(inp.N, *inp.chw)}".encode())
        self.ids, self.labels = [], []

    def shard(self, path: Path, start: int, count: int, bar) -> dict:
        """Images start..start+count−1 into the shard file `path`; its index entry."""
        inp = self.inp
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            w = _HashingWriter(f)
            w.write(_npy_header_bytes(self.npd, (count, *inp.chw)))
            for a in range(start, start + count, self.chunk):
                b = min(a + self.chunk, start + count)
                raw, ids, lab = inp.items(a, b)
                x = to_model_range(raw)
                if self.stored != torch.uint8:
                    ok = torch.isfinite(x).reshape(x.shape[0], -1).all(1)
                    if not bool(ok.all()):
                        raise ValueError(
                            f"{inp.describe.get('path', 'pack')}: image "
                            f"{a + int((~ok).nonzero()[0])} contains NaN or Inf"
                        )
                self.fp.update(x.reshape(-1).view(torch.uint8).numpy())
                data = raw if raw.dtype == self.stored else x
                w.write(data.contiguous().reshape(-1).view(torch.uint8).numpy())
                self.ids += [] if ids is None else [ids]
                self.labels += [] if lab is None else [lab]
                bar.update(b - a)
        return {
            "file": path.name,
            "start": start,
            "count": count,
            "bytes": w.n,
            "sha256": w.h.hexdigest(),
        }

    def finish(self, out: Path, shards: list) -> dict:
        """ids.npy, labels.npy and, last, index.json (what makes the folder a pack)."""
        inp, stored = self.inp, self.stored
        ids = inp.ids if inp.ids is not None else torch.cat(self.ids)
        ylab = (
            inp.labels
            if inp.labels is not None
            else (torch.cat(self.labels) if self.labels else None)
        )
        atomic_write(out / IDS_FILE, lambda tmp: _save_npy(tmp, ids.long()))
        if ylab is not None:
            ylab = check_labels(ylab, inp.N, "labels")
            atomic_write(out / LABELS_FILE, lambda tmp: _save_npy(tmp, ylab))
        index = {
            "format": FORMAT,
            "N": inp.N,
            "C": inp.chw[0],
            "H": inp.chw[1],
            "W": inp.chw[2],
            "dtype": str(stored).removeprefix("torch."),
            "values": "v/127.5 - 1" if stored == torch.uint8 else "float32(v)",
            "shards": shards,
            "labels": LABELS_FILE if ylab is not None else None,
            "ids": IDS_FILE,
            "fingerprint": self.fp.hexdigest()[:32],
            "source": inp.describe,
            "writer": f"mucs_fast {__version__}",
        }
        atomic_write_json(out / INDEX, index)
        return index


def _save_npy(tmp: str, t: torch.Tensor) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the name
        np.save(f, t.contiguous().numpy(), allow_pickle=False)
