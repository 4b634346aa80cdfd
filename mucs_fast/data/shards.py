"""The packed folder (format 1, written by `pack.pack`) as a streamed training set.

    OUT/index.json   {"format": 1, "N", "C", "H", "W", "dtype": "uint8"|"float16"|"float32",
                      "values": how stored values map to the model's range,
                      "shards": [{"file", "start", "count", "bytes", "sha256"}, ...],
                      "labels": "labels.npy" or null, "ids": "ids.npy",
                      "fingerprint": the float32 digest, "source": what was packed, "writer"}
    OUT/shard-00000.npy, ...  C-order arrays [count, C, H, W] of dtype, images start..start+count−1
    OUT/ids.npy      int64 [N] dataset ids
    OUT/labels.npy   int64 [N] class ids or float32 [N, D] label vectors (when the source has them)

A folder without index.json is an incomplete pack and no reader takes it for one.
`ShardSource.check()` compares every file with the index (presence, size, npy header) before any
compute; `verify()` also compares sha256 digests.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .npy import NUMPY_DTYPES, check_file_size, npy_header, read_error
from .source import Source

INDEX = "index.json"
FORMAT = 1
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
STORAGE = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
SHARD_NAME = re.compile(r"shard-[0-9]+\.npy")


def _bad_index(path, what: str) -> ValueError:
    return ValueError(
        f"{path}: corrupted index ({what}); re-run `mucs-fast pack` to rewrite the folder"
    )


def read_index(folder: Path) -> dict:
    path = folder / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: no {INDEX}: not a packed folder (or an interrupted "
            "`mucs-fast pack`: re-run it)"
        )
    try:
        idx = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad_index(path, f"not valid JSON: {e}") from e
    if not isinstance(idx, dict):
        raise _bad_index(path, f"expected an object, found {type(idx).__name__}")
    if idx.get("format") != FORMAT:
        raise _bad_index(
            path, f"format {idx.get('format')!r}, this mucs_fast reads format {FORMAT}"
        )

    def pos_int(d, k, where, zero=False):
        v = d.get(k)
        if not (isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or (zero and v == 0))):
            raise _bad_index(
                path, f"{where}{k} = {v!r}, expected a {'non-negative' if zero else 'positive'} int"
            )
        return v

    for k in ("N", "C", "H", "W"):
        pos_int(idx, k, "")
    if idx.get("dtype") not in STORAGE:
        raise _bad_index(path, f"dtype {idx.get('dtype')!r}, expected one of {sorted(STORAGE)}")
    shards = idx.get("shards")
    if not isinstance(shards, list) or not shards:
        raise _bad_index(path, "no shards")
    pos = 0
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise _bad_index(path, f"shards[{i}] is not an object")
        f = s.get("file")
        if not (isinstance(f, str) and SHARD_NAME.fullmatch(f)):
            raise _bad_index(path, f"shards[{i}].file = {f!r}, expected shard-<n>.npy")
        if pos_int(s, "start", f"shards[{i}].", zero=True) != pos:
            raise _bad_index(path, f"shards[{i}] starts at {s['start']}, expected {pos}")
        pos += pos_int(s, "count", f"shards[{i}].")
        pos_int(s, "bytes", f"shards[{i}].")
        if not isinstance(s.get("sha256"), str):
            raise _bad_index(path, f"shards[{i}] has no sha256")
    if pos != idx["N"]:
        raise _bad_index(path, f"the shards hold {pos} images, N = {idx['N']}")
    for k, name in (("ids", IDS_FILE), ("labels", LABELS_FILE)):
        if idx.get(k) not in ((name,) if k == "ids" else (name, None)):
            raise _bad_index(path, f"{k} = {idx.get(k)!r}, expected {name!r}")
    return idx


def _load_small(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing ({what} of the packed folder {path.parent}); re-run `mucs-fast pack`"
        )
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from e


class ShardSource(Source):
    """A folder written by `pack` (module docstring): its shards memory-mapped per read; ids and
    labels in memory. trust_index: `fingerprint()` returns the digest recorded by `pack` instead
    of reading every image (a corrupted shard of the right size then goes unnoticed)."""

    def __init__(self, path, trust_index: bool = False):
        self.path = Path(path)
        self.index = idx = read_index(self.path)
        self.shards = idx["shards"]
        self._starts = [s["start"] for s in self.shards]
        self._offsets: dict[int, int] = {}
        storage = STORAGE[idx["dtype"]]
        self._np = np.dtype(NUMPY_DTYPES[storage])
        chw = (idx["C"], idx["H"], idx["W"])
        self._row = int(np.prod(chw)) * self._np.itemsize
        ids = _load_small(self.path / idx["ids"], "ids")
        if ids.dtype != np.int64 or ids.shape != (idx["N"],):
            raise ValueError(
                f"{self.path / idx['ids']}: expected int64 [{idx['N']}], found {ids.dtype} "
                f"{ids.shape}"
            )
        labels = None
        if idx["labels"] is not None:
            labels = _load_small(self.path / idx["labels"], "labels")
            if labels.dtype not in (np.int64, np.float32):
                raise ValueError(
                    f"{self.path / idx['labels']}: expected int64 or float32 labels, "
                    f"found {labels.dtype}"
                )
            labels = torch.from_numpy(labels)
        self._init_meta(idx["N"], chw, storage, labels, torch.from_numpy(ids), os.fspath(self.path))
        if trust_index and isinstance(idx.get("fingerprint"), str):
            self._fingerprint = idx["fingerprint"]

    def _describe(self):
        return repr(os.fspath(self.path))

    def _shard_header(self, k: int) -> int:
        """Offset of shard k's data, after checking its header against the index."""
        if k in self._offsets:
            return self._offsets[k]
        s = self.shards[k]
        f = self.path / s["file"]
        if not f.is_file():
            raise FileNotFoundError(
                f"{f}: missing shard {k + 1} of {len(self.shards)} (images {s['start']}.."
                f"{s['start'] + s['count'] - 1}) of the packed folder {self.path}; re-run "
                "`mucs-fast pack`"
            )
        shape, fortran, dtype, offset = npy_header(f)
        want = (s["count"], *self.chw)
        if tuple(shape) != want or dtype != self._np or fortran:
            raise ValueError(
                f"{f}: holds {dtype} {tuple(shape)}{' (Fortran order)' if fortran else ''}, "
                f"the index says {self._np} {want}"
            )
        if offset + s["count"] * self._row != s["bytes"]:
            raise ValueError(
                f"{f}: header and index disagree on its size ({offset} + "
                f"{s['count']} × {self._row} bytes ≠ {s['bytes']})"
            )
        self._offsets[k] = offset
        return offset

    def check(self):
        for k, s in enumerate(self.shards):
            self._offsets.pop(k, None)
            self._shard_header(k)
            check_file_size(
                self.path / s["file"],
                s["bytes"],
                f"shard {k + 1} of {len(self.shards)}: {s['count']} images, as index.json says",
            )

    def verify(self) -> None:
        """`check`, then the sha256 of every shard against the index (reads every byte)."""
        self.check()
        for s in self.shards:
            f = self.path / s["file"]
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            if h.hexdigest() != s["sha256"]:
                raise ValueError(
                    f"{f}: sha256 differs from index.json (the shard was changed or damaged)"
                )

    def _copy_rows(self, k, a, b, dst: np.ndarray) -> None:
        s = self.shards[k]
        f = self.path / s["file"]
        try:
            m = np.memmap(
                f, self._np, "r", self._shard_header(k) + a * self._row, (b - a, *self.chw)
            )
            dst[...] = m
            del m
        except (ValueError, OSError) as e:
            if isinstance(e, FileNotFoundError) or "index says" in str(e) or "disagree" in str(e):
                raise
            raise read_error(f, s["start"] + a, s["start"] + b, e) from e

    def read_raw(self, start, stop):
        start, stop = self.check_range(start, stop)
        out = torch.empty((stop - start, *self.chw), dtype=self.storage_dtype)
        dst, pos = out.numpy(), start
        k = bisect.bisect_right(self._starts, start) - 1
        while pos < stop:
            s = self.shards[k]
            end = min(stop, s["start"] + s["count"])
            self._copy_rows(k, pos - s["start"], end - s["start"], dst[pos - start : end - start])
            pos, k = end, k + 1
        return out

    def _raw_gather(self, idx):
        out = torch.empty((idx.numel(), *self.chw), dtype=self.storage_dtype)
        dst = out.numpy()
        shard = torch.searchsorted(torch.tensor(self._starts), idx, right=True) - 1
        for k in torch.unique(shard).tolist():
            sel = (shard == k).nonzero().reshape(-1).numpy()
            s = self.shards[k]
            f = self.path / s["file"]
            try:
                m = np.memmap(f, self._np, "r", self._shard_header(k), (s["count"], *self.chw))
                dst[sel] = m[idx.numpy()[sel] - s["start"]]
                del m
            except (ValueError, OSError) as e:
                if isinstance(e, FileNotFoundError) or "index says" in str(e):
                    raise
                raise read_error(f, s["start"], s["start"] + s["count"], e) from e
        return out
