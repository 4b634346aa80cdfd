"""Training sets read in chunks instead of held whole: streamed sources, a prefetcher, `pack`.

A `Source` is N images C×H×W that the engine reads by ranges (`read`, the scoring pass) and by
positions (`gather`, retain batches), always as float32 [n, C, H, W] on the CPU in the model's
range. Storage may be uint8 (value v enters as v/127.5 − 1, exactly as `data.load_images`),
float16, bfloat16 or float32/float64 (converted with `.float()`).

- `TensorSource`: an in-memory tensor (reads of float32 storage are views, no copy).
- `NpySource`: a `.npy` file, memory-mapped per call (`np.memmap` of the rows asked for).
- `SafetensorsSource`: one tensor of a `.safetensors` file (`path` or `path:key`), read by slices.
- `ShardSource`: a packed folder (below), memory-mapped per shard per call.

File-backed sources hold paths, not open maps: each read maps what it needs and unmaps it, so
pages read once do not stay in the process's resident memory, and a source pickles to another
process as its paths. The files must not change while a source is in use.

`fingerprint()` equals `_io.tensor_digest` of the float32 tensor the source reads as (dtype,
shape, values), computed in chunks whatever the storage; `source_digest` extends this to the
mappings `tensor_digest` takes. The pass that computes it also finds NaN/Inf (`check_finite`).

Packed folder (`pack`, `mucs-fast pack SRC OUT`), format 1::

    OUT/index.json   {"format": 1, "N", "C", "H", "W", "dtype": "uint8"|"float16"|"float32",
                      "values": how stored values map to the model's range,
                      "shards": [{"file", "start", "count", "bytes", "sha256"}, ...],
                      "labels": "labels.npy" or null, "ids": "ids.npy",
                      "fingerprint": the float32 digest, "source": what was packed, "writer"}
    OUT/shard-00000.npy, ...  C-order arrays [count, C, H, W] of dtype, images start..start+count−1
    OUT/ids.npy      int64 [N] dataset ids
    OUT/labels.npy   int64 [N] class ids or float32 [N, D] label vectors (when the source has them)

Every file is written to a temporary and moved into place; index.json is removed first and
written last, so a folder without it is an incomplete pack and no reader takes it for one. A
failed pack removes the pack files of OUT (its own and a previous pack's). `ShardSource.check()` compares every file with the
index (presence, size, npy header) before any compute; `verify()` also compares sha256 digests.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import os
import queue
import re
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_path, atomic_write, atomic_write_json, is_temp_name

__all__ = [
    "INDEX",
    "NpySource",
    "SafetensorsSource",
    "ShardSource",
    "Source",
    "TensorSource",
    "open_source",
    "pack",
    "prefetch",
    "source_digest",
    "streamable",
    "take",
    "chunks",
]

INDEX = "index.json"
FORMAT = 1
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
# float32 bytes per chunk of the streaming passes (fingerprint, pack): bounds their memory
CHUNK_BYTES = 32 << 20
_STORAGE = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
_NUMPY = {torch.uint8: np.uint8, torch.float16: np.float16, torch.float32: np.float32,
          torch.float64: np.float64}
_SAFETENSORS = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16,
                "F32": torch.float32, "F64": torch.float64}
_SHARD_NAME = re.compile(r"shard-[0-9]+\.npy")
_FORMATS = ("a .npy file, a .safetensors file (path or path:key), a folder packed by "
            "`mucs-fast pack` (with index.json), or an in-memory tensor")


def _to_model(raw: torch.Tensor) -> torch.Tensor:
    """Stored values → float32 in the model's range (uint8: v/127.5 − 1, as data._as_images)."""
    if raw.dtype == torch.uint8:
        return raw.float().div_(127.5).sub_(1).contiguous()
    return raw.float().contiguous()


def _chunk_images(chw, chunk_images: int | None = None) -> int:
    if chunk_images is not None:
        return max(1, int(chunk_images))
    return max(1, CHUNK_BYTES // (4 * chw[0] * chw[1] * chw[2]))


def _check_chw(shape, where: str) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"{where}: expected images [N, C, H, W], found shape {tuple(shape)}")
    if min(shape[1:]) < 1:
        raise ValueError(f"{where}: images of shape {tuple(shape[1:])} hold no pixels")
    return tuple(int(s) for s in shape)


# ------------------------------------------------------------------------------------------------
# Source
# ------------------------------------------------------------------------------------------------
class Source:
    """N training images C×H×W, read in pieces. Subclasses implement `read_raw` and `_raw_gather`
    (stored dtype) and `check`; reads, digests and the finiteness scan are shared here."""

    N: int
    chw: tuple[int, int, int]
    storage_dtype: torch.dtype  # how the values are stored (uint8, float16, float32, ...)
    labels: torch.Tensor | None = None  # int64 [N] or float32 [N, D]
    ids: torch.Tensor | None = None  # int64 [N] dataset ids
    _cache_fingerprint = True  # file-backed sources; a tensor may be changed in place

    def _init_meta(self, N, chw, storage_dtype, labels=None, ids=None, where="source"):
        self.N, self.chw, self.storage_dtype = int(N), tuple(int(s) for s in chw), storage_dtype
        if self.N < 1:
            raise ValueError(f"{where}: empty (0 images)")
        self.labels = None if labels is None else _check_labels(labels, self.N, where)
        self.ids = None if ids is None else _check_ids(ids, self.N, where)
        self._fingerprint: str | None = None
        self._first_nonfinite: int | None | bool = False  # False: not scanned yet

    # -- reads ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.N, *self.chw)

    def __len__(self) -> int:
        return self.N

    def __repr__(self) -> str:
        C, H, W = self.chw
        where = self._describe()
        return (f"{type(self).__name__}({where + ', ' if where else ''}N={self.N}, {C}×{H}×{W}, "
                f"{str(self.storage_dtype).removeprefix('torch.')})")

    def _describe(self) -> str:
        return ""

    def _check_range(self, start, stop) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.N:
            raise ValueError(f"{self!r}: range {start}..{stop} is outside 0..{self.N}")
        return start, stop

    def read_raw(self, start: int, stop: int) -> torch.Tensor:
        """Images start..stop−1 as stored: [stop−start, C, H, W] of `storage_dtype`, CPU."""
        raise NotImplementedError

    def _raw_gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Stored values at sorted, distinct positions idx (int64, in range)."""
        raise NotImplementedError

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Images start..stop−1: float32 [stop−start, C, H, W], CPU, contiguous, model range."""
        start, stop = self._check_range(start, stop)
        return _to_model(self.read_raw(start, stop))

    def _check_idx(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        if idx.ndim != 1 or idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
            raise ValueError(f"{self!r}: gather expects integer positions [n], got {idx.dtype} "
                             f"of shape {tuple(idx.shape)}")
        idx = idx.to("cpu", torch.int64)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.N:
                raise ValueError(f"{self!r}: position {lo if lo < 0 else hi} is outside 0..{self.N - 1}")
        return idx

    def gather(self, idx) -> torch.Tensor:
        """Images at positions idx (int64 [n], any order, repeats allowed): float32 [n, C, H, W]."""
        idx = self._check_idx(idx)
        if idx.numel() == 0:
            return torch.empty((0, *self.chw), dtype=torch.float32)
        u, inv = torch.unique(idx, sorted=True, return_inverse=True)
        x = _to_model(self._raw_gather(u))
        if u.numel() == idx.numel() and torch.equal(u, idx):
            return x
        return x[inv]

    def check(self) -> None:
        """Cheap validation of the files behind the source (no image is read)."""

    # -- digests ----------------------------------------------------------------------------
    def _chunks(self, chunk_images=None) -> Iterator[torch.Tensor]:
        n = _chunk_images(self.chw, chunk_images)
        ranges = [(a, min(a + n, self.N)) for a in range(0, self.N, n)]
        it = prefetch(self, ranges, "cpu", depth=1)
        try:
            for _, _, x in it:
                yield x
        finally:
            it.close()

    def update_digest(self, h, chunk_images: int | None = None) -> None:
        """Feed hashlib object h with what `_io.tensor_digest` hashes for the float32 tensor this
        source reads as: "torch.float32(N, C, H, W)" then the values' bytes, chunk by chunk.
        Also records the first image holding NaN/Inf (`check_finite`)."""
        h.update(f"{torch.float32}{self.shape}".encode())
        bad, pos = None, 0
        scan = self.storage_dtype != torch.uint8  # uint8 storage is finite by construction
        for x in self._chunks(chunk_images):
            if scan and bad is None:
                ok = torch.isfinite(x).reshape(x.shape[0], -1).all(1)
                if not bool(ok.all()):
                    bad = pos + int((~ok).nonzero()[0])
            h.update(x.reshape(-1).view(torch.uint8).numpy())
            pos += x.shape[0]
        self._first_nonfinite = bad

    def fingerprint(self, chunk_images: int | None = None) -> str:
        """`_io.tensor_digest(x)` of the float32 images x this source reads as, whatever the
        storage, computed streaming (file-backed sources cache it)."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        self.update_digest(h, chunk_images)
        fp = h.hexdigest()[:32]
        if self._cache_fingerprint:
            self._fingerprint = fp
        return fp

    def check_finite(self, name: str = "train") -> None:
        """ValueError naming the first image with NaN or Inf (a streaming pass, shared with
        `fingerprint` when that ran first)."""
        if self._first_nonfinite is False or not self._cache_fingerprint:
            h = hashlib.sha256()
            self.update_digest(h)
            if self._cache_fingerprint:
                self._fingerprint = h.hexdigest()[:32]
        if self._first_nonfinite is not None:
            raise ValueError(f"{name}: image {self._first_nonfinite} of {self!r} contains NaN or Inf")


def source_digest(x) -> str:
    """`_io.tensor_digest` where any value may be a Source (hashed as its float32 tensor)."""
    if isinstance(x, Source):
        return x.fingerprint()
    if not isinstance(x, Mapping):
        from ._io import tensor_digest

        return tensor_digest(x)
    h = hashlib.sha256()
    for k in sorted(x):
        v = x[k]
        h.update(k.encode())
        if isinstance(v, Source):
            v.update_digest(h)
        elif isinstance(v, torch.Tensor):
            t = v.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:32]


def _check_labels(y, N: int, where: str) -> torch.Tensor:
    y = torch.as_tensor(y).detach().cpu()
    if y.shape[:1] != (N,) or y.ndim not in (1, 2):
        raise ValueError(f"{where}: expected labels [N={N}] or [N={N}, D], found shape {tuple(y.shape)}")
    if y.ndim == 1:
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"{where}: expected integer class ids [N] (or float label vectors "
                             f"[N, D]), found {y.dtype}")
        return y.long().contiguous()
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{where}: expected label vectors [N, D] of a real dtype, found {y.dtype}")
    return y.float().contiguous()


def _check_ids(ids, N: int, where: str) -> torch.Tensor:
    ids = torch.as_tensor(ids).detach().cpu()
    if ids.shape != (N,) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{where}: expected int64 ids [N={N}], found {ids.dtype} of shape "
                         f"{tuple(ids.shape)}")
    return ids.long().contiguous()


# ------------------------------------------------------------------------------------------------
# in memory
# ------------------------------------------------------------------------------------------------
class TensorSource(Source):
    """An in-memory tensor [N, C, H, W] (float, or uint8 0..255). float32 contiguous storage is
    read by slicing (a view: do not modify what `read` returns); other dtypes convert per read."""

    _cache_fingerprint = False

    def __init__(self, x: torch.Tensor, labels=None, ids=None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"TensorSource: expected a torch.Tensor, got {type(x).__name__}")
        shape = _check_chw(x.shape, "TensorSource")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"TensorSource: expected float images (or uint8 0..255), found {x.dtype}")
        self.x = x.detach()
        self._init_meta(shape[0], shape[1:], x.dtype, labels, ids, "TensorSource")

    def read_raw(self, start, stop):
        start, stop = self._check_range(start, stop)
        return self.x[start:stop].cpu()

    def _raw_gather(self, idx):
        return self.x.index_select(0, idx.to(self.x.device)).cpu()

    def gather(self, idx):  # any order as it is: no sort, no second copy
        return _to_model(self._raw_gather(self._check_idx(idx)))


# ------------------------------------------------------------------------------------------------
# .npy
# ------------------------------------------------------------------------------------------------
def _npy_header(path) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a .npy file, reading only its header."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                f.close()
                m = np.load(path, mmap_mode="r", allow_pickle=False)
                return m.shape, bool(m.flags.f_contiguous and not m.flags.c_contiguous), m.dtype, m.offset
            return shape, fortran, dtype, f.tell()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from e


def _check_file_size(path, expected: int, what: str) -> None:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if size < expected:
        raise ValueError(f"{path}: truncated: {size} bytes, expected {expected} ({what})")
    if size > expected:
        raise ValueError(f"{path}: {size} bytes, expected {expected} ({what}); the file was changed "
                         "or is not what it claims")


def _read_error(path, start, stop, e: Exception) -> ValueError:
    return ValueError(f"{path}: cannot read images {start}..{stop} ({type(e).__name__}: {e}); "
                      "is the file truncated or changed? (check() compares it with its header)")


class NpySource(Source):
    """A .npy array [N, C, H, W] of uint8, float16, float32 or float64, memory-mapped per read."""

    def __init__(self, path, labels=None, ids=None):
        self.path = os.fspath(path)
        shape, fortran, dtype, offset = _npy_header(self.path)
        shape = _check_chw(shape, self.path)
        storage = next((t for t, n in _NUMPY.items() if np.dtype(n) == dtype.newbyteorder("=")), None)
        if storage is None:
            raise ValueError(f"{self.path}: expected uint8, float16, float32 or float64 images, "
                             f"found dtype {dtype}")
        self._dtype, self._fortran, self._offset = dtype, fortran, offset
        self._native = dtype.newbyteorder("=")
        self._row = int(np.prod(shape[1:])) * dtype.itemsize
        self._init_meta(shape[0], shape[1:], storage, labels, ids, self.path)

    def _describe(self):
        return repr(self.path)

    def check(self):
        shape, _, dtype, offset = _npy_header(self.path)
        if (shape, dtype, offset) != (self.shape, self._dtype, self._offset):
            raise ValueError(f"{self.path}: changed since it was opened (now {dtype} {shape})")
        _check_file_size(self.path, offset + self.N * self._row,
                         f"{self.N} images {'×'.join(map(str, self.chw))} of {dtype}")

    def _map(self, start, stop):
        if self._fortran:
            m = np.memmap(self.path, self._dtype, "r", self._offset, self.shape, order="F")
            return m[start:stop]
        return np.memmap(self.path, self._dtype, "r", self._offset + start * self._row,
                         (stop - start, *self.chw))

    def read_raw(self, start, stop):
        start, stop = self._check_range(start, stop)
        if start == stop:
            return torch.empty((0, *self.chw), dtype=self.storage_dtype)
        try:
            a = self._map(start, stop).astype(self._native, order="C")  # a copy; the map goes
        except (ValueError, OSError) as e:
            raise _read_error(self.path, start, stop, e) from e
        return torch.from_numpy(a)

    def _raw_gather(self, idx):
        try:
            m = self._map(0, self.N)
            a = np.ascontiguousarray(m[idx.numpy()], dtype=self._native)
            del m
        except (ValueError, OSError) as e:
            raise _read_error(self.path, int(idx[0]), int(idx[-1]) + 1, e) from e
        return torch.from_numpy(a)


# ------------------------------------------------------------------------------------------------
# .safetensors
# ------------------------------------------------------------------------------------------------
class SafetensorsSource(Source):
    """One tensor [N, C, H, W] of a .safetensors file (`path`, when it holds one tensor, or
    `path:key`), read with `safe_open(...).get_slice` (the file is opened per read)."""

    def __init__(self, path, key: str | None = None, labels=None, ids=None):
        from .data import _split_key

        p, k = _split_key(path) if key is None else (Path(path), key)
        self.path, self.key = os.fspath(p), k
        with self._open() as f:
            keys = list(f.keys())
            if self.key is None:
                if len(keys) != 1:
                    raise ValueError(f"{self.path}: expected exactly one tensor (or name one as "
                                     f"'{self.path}:<key>'), found {len(keys)}: {sorted(keys)}")
                self.key = keys[0]
            elif self.key not in keys:
                raise ValueError(f"{self.path}: no tensor named {self.key!r}; found {sorted(keys)}")
            sl = f.get_slice(self.key)
            shape, dt = tuple(sl.get_shape()), sl.get_dtype()
        shape = _check_chw(shape, f"{self.path}:{self.key}")
        if dt not in _SAFETENSORS:
            raise ValueError(f"{self.path}:{self.key}: expected uint8 or float images, found dtype {dt}")
        self._init_meta(shape[0], shape[1:], _SAFETENSORS[dt], labels, ids, f"{self.path}:{self.key}")

    def _describe(self):
        return repr(f"{self.path}:{self.key}")

    def _open(self):
        from safetensors import safe_open

        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            return safe_open(self.path, framework="pt")
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise ValueError(f"{self.path}: not a readable .safetensors file ({type(e).__name__}: "
                             f"{e})") from e

    def check(self):
        with self._open() as f:
            keys = f.keys()
            if self.key not in keys:
                raise ValueError(f"{self.path}: no tensor named {self.key!r} any more")
            sl = f.get_slice(self.key)
            if (tuple(sl.get_shape()), _SAFETENSORS.get(sl.get_dtype())) != (self.shape, self.storage_dtype):
                raise ValueError(f"{self.path}:{self.key}: changed since it was opened")

    def read_raw(self, start, stop):
        start, stop = self._check_range(start, stop)
        with self._open() as f:
            return f.get_slice(self.key)[start:stop].contiguous()

    def _raw_gather(self, idx):
        # consecutive positions are read as one slice
        cut = (torch.nonzero(idx[1:] - idx[:-1] != 1).reshape(-1) + 1).tolist()
        bounds = [0, *cut, idx.numel()]
        with self._open() as f:
            sl = f.get_slice(self.key)
            parts = [sl[int(idx[a]) : int(idx[b - 1]) + 1] for a, b in itertools.pairwise(bounds)]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


# ------------------------------------------------------------------------------------------------
# packed folder
# ------------------------------------------------------------------------------------------------
def _bad_index(path, what: str) -> ValueError:
    return ValueError(f"{path}: corrupted index ({what}); re-run `mucs-fast pack` to rewrite the folder")


def _read_index(folder: Path) -> dict:
    path = folder / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {INDEX}: not a packed folder (or an interrupted "
                                "`mucs-fast pack`: re-run it)")
    try:
        idx = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad_index(path, f"not valid JSON: {e}") from e
    if not isinstance(idx, dict):
        raise _bad_index(path, f"expected an object, found {type(idx).__name__}")
    if idx.get("format") != FORMAT:
        raise _bad_index(path, f"format {idx.get('format')!r}, this mucs_fast reads format {FORMAT}")

    def pos_int(d, k, where, zero=False):
        v = d.get(k)
        if not (isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or (zero and v == 0))):
            raise _bad_index(path, f"{where}{k} = {v!r}, expected a {'non-negative' if zero else 'positive'} int")
        return v

    for k in ("N", "C", "H", "W"):
        pos_int(idx, k, "")
    if idx.get("dtype") not in _STORAGE:
        raise _bad_index(path, f"dtype {idx.get('dtype')!r}, expected one of {sorted(_STORAGE)}")
    shards = idx.get("shards")
    if not isinstance(shards, list) or not shards:
        raise _bad_index(path, "no shards")
    pos = 0
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise _bad_index(path, f"shards[{i}] is not an object")
        f = s.get("file")
        if not (isinstance(f, str) and _SHARD_NAME.fullmatch(f)):
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
        raise FileNotFoundError(f"{path}: missing ({what} of the packed folder {path.parent}); re-run "
                                "`mucs-fast pack`")
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
        self.index = idx = _read_index(self.path)
        self.shards = idx["shards"]
        self._starts = [s["start"] for s in self.shards]
        self._offsets: dict[int, int] = {}
        storage = _STORAGE[idx["dtype"]]
        self._np = np.dtype(_NUMPY[storage])
        chw = (idx["C"], idx["H"], idx["W"])
        self._row = int(np.prod(chw)) * self._np.itemsize
        ids = _load_small(self.path / idx["ids"], "ids")
        if ids.dtype != np.int64 or ids.shape != (idx["N"],):
            raise ValueError(f"{self.path / idx['ids']}: expected int64 [{idx['N']}], found {ids.dtype} "
                             f"{ids.shape}")
        labels = None
        if idx["labels"] is not None:
            labels = _load_small(self.path / idx["labels"], "labels")
            if labels.dtype not in (np.int64, np.float32):
                raise ValueError(f"{self.path / idx['labels']}: expected int64 or float32 labels, "
                                 f"found {labels.dtype}")
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
                f"{s['start'] + s['count'] - 1}) of the packed folder {self.path}; re-run `mucs-fast pack`")
        shape, fortran, dtype, offset = _npy_header(f)
        want = (s["count"], *self.chw)
        if tuple(shape) != want or dtype != self._np or fortran:
            raise ValueError(f"{f}: holds {dtype} {tuple(shape)}{' (Fortran order)' if fortran else ''}, "
                             f"the index says {self._np} {want}")
        if offset + s["count"] * self._row != s["bytes"]:
            raise ValueError(f"{f}: header and index disagree on its size ({offset} + "
                             f"{s['count']} × {self._row} bytes ≠ {s['bytes']})")
        self._offsets[k] = offset
        return offset

    def check(self):
        for k, s in enumerate(self.shards):
            self._offsets.pop(k, None)
            self._shard_header(k)
            _check_file_size(self.path / s["file"], s["bytes"],
                             f"shard {k + 1} of {len(self.shards)}: {s['count']} images, as index.json says")

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
                raise ValueError(f"{f}: sha256 differs from index.json (the shard was changed or damaged)")

    def _copy_rows(self, k, a, b, dst: np.ndarray) -> None:
        s = self.shards[k]
        f = self.path / s["file"]
        try:
            m = np.memmap(f, self._np, "r", self._shard_header(k) + a * self._row, (b - a, *self.chw))
            dst[...] = m
            del m
        except (ValueError, OSError) as e:
            if isinstance(e, FileNotFoundError) or "index says" in str(e) or "disagree" in str(e):
                raise
            raise _read_error(f, s["start"] + a, s["start"] + b, e) from e

    def read_raw(self, start, stop):
        start, stop = self._check_range(start, stop)
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
                raise _read_error(f, s["start"], s["start"] + s["count"], e) from e
        return out


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------
def streamable(path) -> bool:
    """Whether `open_source` streams this path (.npy, .safetensors [path or path:key], a packed
    folder) — the formats the CLI does not load whole."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return os.path.isfile(os.path.join(p, INDEX))
    from .data import _split_key

    try:
        f, key = _split_key(p)
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
        raise ValueError(f"{s}: a folder without {INDEX} is not a packed folder (an image folder or a "
                         f"reference dataset folder is packed first: mucs-fast pack {s} OUT); expected "
                         f"{_FORMATS}")
    from .data import _split_key

    p, key = _split_key(s)  # FileNotFoundError when there is no such file
    ext = p.suffix.lower()
    if ext == ".npy" and key is None:
        return NpySource(p)
    if ext == ".safetensors":
        return SafetensorsSource(p, key)
    raise ValueError(f"{s}: cannot stream a {ext or 'extensionless'} file; expected {_FORMATS} "
                     "(.pt files are read whole by mucs_fast.data.load_images, or packed first with "
                     "mucs-fast pack)")


def take(x, idx: torch.Tensor, device) -> torch.Tensor:
    """Images at positions idx (int64 of any shape) of a resident tensor x [N, C, H, W] or a
    Source: float32 [*idx.shape, C, H, W] on device (the engine's random access: retain batches)."""
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)].to(device)
    out = x.gather(idx.reshape(-1).cpu())
    return out.view(*idx.shape, *x.chw).to(device, non_blocking=True)


def chunks(x, ranges, device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, images on device) for each range of a resident tensor (slices: no copy when it
    lives on device) or a Source (read ahead by `prefetch`)."""
    if isinstance(x, torch.Tensor):
        return ((a, b, x[a:b].to(device)) for a, b in ranges)
    return prefetch(x, ranges, device)


# ------------------------------------------------------------------------------------------------
# prefetch
# ------------------------------------------------------------------------------------------------
class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def prefetch(source, ranges, device, depth: int = 2) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, images float32 [stop−start, C, H, W] on device) for each range, in
    order, while a background thread reads up to `depth` ranges ahead. On CUDA the host tensor
    is pinned and copied with non_blocking=True (on the current stream). An error in the reader
    re-raises here; closing the iterator (break + close(), garbage collection, an exception in
    the caller) stops and joins the thread. Ranges are checked before anything is read."""
    source = open_source(source)
    ranges = [source._check_range(a, b) for a, b in ranges]
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"prefetch: depth must be a positive int, got {depth!r}")
    return _prefetch(source, ranges, torch.device(device), depth)


def _prefetch(source: Source, ranges, device: torch.device, depth: int):
    pin = device.type == "cuda"
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def reader():
        try:
            for a, b in ranges:
                if stop.is_set():
                    return
                x = source.read(a, b)
                if pin:
                    x = x.pin_memory()
                if not put((a, b, x)):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
            put(_Failure(e))

    t = threading.Thread(target=reader, name=f"mucs_fast-prefetch-{id(q):x}", daemon=True)
    t.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if not t.is_alive() and q.empty():
                    raise RuntimeError("prefetch: the reader thread stopped without a result") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            a, b, x = item
            yield a, b, x.to(device, non_blocking=pin)
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)


# ------------------------------------------------------------------------------------------------
# pack
# ------------------------------------------------------------------------------------------------
class _Input:
    """What `pack` reads: N, chw, the stored dtype, ids/labels (None when collected from the
    items), and `items(start, stop)` → (raw [n, C, H, W], ids [n] or None, labels or None)."""

    def __init__(self, N, chw, dtype, items, ids=None, labels=None, describe=None):
        self.N, self.chw, self.dtype, self.items = N, tuple(chw), dtype, items
        self.ids, self.labels, self.describe = ids, labels, describe or {}


def _source_input(src: Source, describe: dict) -> _Input:
    return _Input(src.N, src.chw, src.storage_dtype, lambda a, b: (src.read_raw(a, b), None, None),
                  ids=src.ids if src.ids is not None else torch.arange(src.N, dtype=torch.int64),
                  labels=src.labels, describe=describe)


def _image_folder_input(folder: Path, threads: int) -> _Input:
    from .data import _MODES, IMAGE_EXTENSIONS, _read_image, folder_ids

    # the file order and ids of data.load_image_folder
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: expected image files ({', '.join(IMAGE_EXTENSIONS)}), found none "
                         f"(nor {INDEX} of a packed folder, nor metadata.pt of a reference dataset folder)")
    ids = folder_ids(files)

    def array(f):
        im = _read_image(f)
        if im.mode not in _MODES:
            raise ValueError(f"{f}: unsupported image mode {im.mode!r}; expected one of "
                             f"{', '.join(_MODES)} (8 bits per band)")
        a = np.asarray(im, dtype=np.uint8)
        return f, im.size, im.mode, (a[:, :, None] if a.ndim == 2 else a)

    first = array(files[0])

    def items(a, b):
        with ThreadPoolExecutor(max_workers=threads) as pool:
            got = list(pool.map(array, files[a:b]))
        for f, size, mode, _ in got:
            if (size, mode) != first[1:3]:
                raise ValueError(f"{f}: expected {first[1][0]}×{first[1][1]} {first[2]} like "
                                 f"{first[0].name}, found {size[0]}×{size[1]} {mode}; all images must "
                                 "share size and mode")
        x = torch.from_numpy(np.stack([g[3] for g in got])).permute(0, 3, 1, 2).contiguous()
        return x, None, None

    H, W, C = first[3].shape
    return _Input(len(files), (C, H, W), torch.uint8, items, ids=ids,
                  describe={"kind": "image folder", "path": os.path.abspath(folder)})


def _reference_input(folder: Path, split: str, threads: int) -> _Input:
    from .compat.reference_files import (
        _label_row,
        _read_item,
        center_crop,
        load_metadata,
        omegaconf_safe_globals,
        split_filenames,
    )

    meta = load_metadata(folder)
    fns = [os.path.join(folder, f) for f in split_filenames(meta, split)]
    if not fns:
        raise ValueError(f"{folder}: split {split!r} is empty")
    missing = [f for f in fns if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} image files of split {split!r} are missing, "
                                f"e.g. {missing[0]}")

    def read(fn):
        item = _read_item(fn)
        return fn, int(item[0]), center_crop(torch.as_tensor(item[1])), _label_row(item[2])

    with omegaconf_safe_globals():
        first = read(fns[0])
    x0 = first[2]
    if x0.ndim != 3:
        raise ValueError(f"{fns[0]}: expected an image [C, H, W], found shape {tuple(x0.shape)}")
    if first[3].ndim != 1:
        raise ValueError(f"{fns[0]}: expected a label vector [label_dim], found shape "
                         f"{tuple(first[3].shape)}")
    dtype = torch.uint8 if x0.dtype == torch.uint8 else torch.float32

    def items(a, b):
        with omegaconf_safe_globals(), ThreadPoolExecutor(max_workers=threads) as pool:
            got = list(pool.map(read, fns[a:b]))
        for fn, _, x, y in got:
            if x.shape != x0.shape or (x.dtype == torch.uint8) != (dtype == torch.uint8):
                raise ValueError(f"{fn}: image {x.dtype} {tuple(x.shape)} (after the center crop), "
                                 f"expected {x0.dtype} {tuple(x0.shape)} like {fns[0]}")
            if y.shape != first[3].shape:
                raise ValueError(f"{fn}: label of shape {tuple(y.shape)}, expected "
                                 f"{tuple(first[3].shape)} like {fns[0]}")
        x = torch.stack([g[2] for g in got])
        x = x if dtype == torch.uint8 else x.float()
        ids = torch.tensor([g[1] for g in got], dtype=torch.int64)
        return x.contiguous(), ids, torch.stack([g[3] for g in got]).float()

    return _Input(len(fns), tuple(x0.shape), dtype, items,
                  describe={"kind": "reference dataset folder", "path": os.path.abspath(folder),
                            "split": split})


def _pack_input(src, split, labels, threads) -> _Input:
    """SRC as a pack input, its labels merged; every check that reads SRC happens here."""
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        folder = Path(s)
        if folder.is_dir() and not (folder / INDEX).is_file() and (folder / "metadata.pt").is_file():
            if labels is not None:
                raise ValueError(f"{s}: a reference dataset folder carries its labels; give no labels file")
            return _reference_input(folder, split or "train", threads)
        if split is not None:
            raise ValueError(f"{s}: a split applies only to a reference dataset folder "
                             "(metadata.pt + pt_files/)")
        if folder.is_dir():
            inp = (_source_input(ShardSource(folder), {"kind": "packed folder"}) if (folder / INDEX).is_file()
                   else _image_folder_input(folder, threads))
            inp.describe["path"] = os.path.abspath(folder)
        else:
            from .data import TENSOR_EXTENSIONS, _split_key, load_tensor_file

            p, _ = _split_key(s)
            ext = p.suffix.lower()
            if ext in (".pt", ".pth"):  # torch.load reads it whole
                src_ = TensorSource(_as_tensor_images(load_tensor_file(s), s))
            elif ext in TENSOR_EXTENSIONS:
                src_ = open_source(s)
            else:
                raise ValueError(f"{s}: expected an image folder, a reference dataset folder "
                                 f"(metadata.pt + pt_files/), a packed folder or a tensor file "
                                 f"({', '.join(TENSOR_EXTENSIONS)}), found a {ext or 'extensionless'} file")
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
            from .data import load_labels

            inp.labels = load_labels(labels, inp.N)
        else:
            inp.labels = _check_labels(labels, inp.N, "labels")
    return inp


def _as_tensor_images(x: torch.Tensor, where: str) -> torch.Tensor:
    _check_chw(x.shape, where)
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"{where}: expected float images in [-1, 1] (or uint8 0..255), found {x.dtype}")
    return x


def _is_pack_file(name: str) -> bool:
    return (name in (INDEX, IDS_FILE, LABELS_FILE) or bool(_SHARD_NAME.fullmatch(name))
            or is_temp_name(name))


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
            raise ValueError(f"{out}: not empty and not a packed folder (holds {foreign[0]!r}"
                             f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
                             "give a new or empty folder")
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
        b, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    return b.getvalue()


def _stored(inp: _Input) -> torch.dtype:
    if inp.dtype in (torch.uint8, torch.float16):
        return inp.dtype
    return torch.float32


def pack(src, out, shard_images: int = 65536, progress: bool = True, *, labels=None,
         split: str | None = None, threads: int = 8) -> dict:
    """Write the packed folder OUT (module docstring) from SRC: an image folder (the files and
    ids of `data.load_image_folder`), a tensor file (.npy / .safetensors streamed; .pt read whole
    by `data.load_tensor_file`), a reference dataset folder (metadata.pt + pt_files/; `split`,
    default "train"; its ids and labels), a packed folder (to reshard it), or a Source / tensor.
    labels: a labels file (`data.load_labels`) or tensor, for sources without their own.
    Reads and writes in chunks of at most `shard_images` images and CHUNK_BYTES of float32, so
    the dataset never needs to fit in memory (except a .pt file). uint8 and float16 stay as they
    are; other dtypes are stored as float32. Images with NaN/Inf are refused.
    Returns the index it wrote."""
    if not (isinstance(shard_images, int) and shard_images >= 1):
        raise ValueError(f"pack: shard_images must be a positive int, got {shard_images!r}")
    inp = _pack_input(src, split, labels, threads)  # everything about SRC checked before OUT changes
    out = Path(out)
    _prepare_out(out, inp)
    stored = _stored(inp)
    npd = np.dtype(_NUMPY[stored])
    chunk = min(shard_images, _chunk_images(inp.chw))
    S = -(-inp.N // shard_images)
    width = max(5, len(str(S - 1)))
    fp = hashlib.sha256(f"{torch.float32}{(inp.N, *inp.chw)}".encode())
    ids_parts, label_parts = [], []
    shards = []
    from tqdm.auto import tqdm

    bar = tqdm(total=inp.N, desc="pack", unit="img", unit_scale=True, leave=False, dynamic_ncols=True,
               disable=not progress)
    try:
        for k in range(S):
            start, count = k * shard_images, min(shard_images, inp.N - k * shard_images)
            name = f"shard-{k:0{width}d}.npy"
            with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
                w = _HashingWriter(f)
                w.write(_npy_header_bytes(npd, (count, *inp.chw)))
                for a in range(start, start + count, chunk):
                    b = min(a + chunk, start + count)
                    raw, ids, lab = inp.items(a, b)
                    x = _to_model(raw)
                    if stored != torch.uint8:
                        ok = torch.isfinite(x).reshape(x.shape[0], -1).all(1)
                        if not bool(ok.all()):
                            raise ValueError(f"{inp.describe.get('path', 'pack')}: image "
                                             f"{a + int((~ok).nonzero()[0])} contains NaN or Inf")
                    fp.update(x.reshape(-1).view(torch.uint8).numpy())
                    data = raw if raw.dtype == stored else x
                    w.write(data.contiguous().reshape(-1).view(torch.uint8).numpy())
                    if ids is not None:
                        ids_parts.append(ids)
                    if lab is not None:
                        label_parts.append(lab)
                    bar.update(b - a)
            shards.append({"file": name, "start": start, "count": count, "bytes": w.n,
                           "sha256": w.h.hexdigest()})
        ids = inp.ids if inp.ids is not None else torch.cat(ids_parts)
        ylab = inp.labels if inp.labels is not None else (torch.cat(label_parts) if label_parts else None)
        atomic_write(out / IDS_FILE, lambda tmp: _save_npy(tmp, ids.long()))
        if ylab is not None:
            ylab = _check_labels(ylab, inp.N, "labels")
            atomic_write(out / LABELS_FILE, lambda tmp: _save_npy(tmp, ylab))
        from . import __version__

        index = {"format": FORMAT, "N": inp.N, "C": inp.chw[0], "H": inp.chw[1], "W": inp.chw[2],
                 "dtype": str(stored).removeprefix("torch."),
                 "values": "v/127.5 - 1" if stored == torch.uint8 else "float32(v)",
                 "shards": shards, "labels": LABELS_FILE if ylab is not None else None, "ids": IDS_FILE,
                 "fingerprint": fp.hexdigest()[:32], "source": inp.describe,
                 "writer": f"mucs_fast {__version__}"}
        atomic_write_json(out / INDEX, index)
    except BaseException:
        for n in os.listdir(out):  # no index.json: an incomplete folder; leave no shards behind
            if _is_pack_file(n):
                os.unlink(out / n)
        raise
    finally:
        bar.close()
    keep = {INDEX, IDS_FILE, *(s["file"] for s in shards), *([LABELS_FILE] if ylab is not None else [])}
    for n in os.listdir(out):  # a previous, larger pack's shards
        if _is_pack_file(n) and n not in keep:
            os.unlink(out / n)
    return index


def _save_npy(tmp: str, t: torch.Tensor) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the name
        np.save(f, t.contiguous().numpy(), allow_pickle=False)
