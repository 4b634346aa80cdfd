"""A `.npy` array [N, C, H, W] as a streamed training set, memory-mapped per read; and the `.npy`
header and size checks the packed shards share."""

from __future__ import annotations

import os

import numpy as np
import torch

from .checks import check_chw
from .source import Source

NUMPY_DTYPES = {
    torch.uint8: np.uint8,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def npy_header(path) -> tuple[tuple, bool, np.dtype, int]:
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
                return (
                    m.shape,
                    bool(m.flags.f_contiguous and not m.flags.c_contiguous),
                    m.dtype,
                    m.offset,
                )
            return shape, fortran, dtype, f.tell()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from e


def check_file_size(path, expected: int, what: str) -> None:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if size < expected:
        raise ValueError(f"{path}: truncated: {size} bytes, expected {expected} ({what})")
    if size > expected:
        raise ValueError(
            f"{path}: {size} bytes, expected {expected} ({what}); the file was changed "
            "or is not what it claims"
        )


def read_error(path, start, stop, e: Exception) -> ValueError:
    return ValueError(
        f"{path}: cannot read images {start}..{stop} ({type(e).__name__}: {e}); "
        "is the file truncated or changed? (check() compares it with its header)"
    )


class NpySource(Source):
    """A .npy array [N, C, H, W] of uint8, float16, float32 or float64, memory-mapped per read."""

    def __init__(self, path, labels=None, ids=None):
        self.path = os.fspath(path)
        shape, fortran, dtype, offset = npy_header(self.path)
        shape = check_chw(shape, self.path)
        storage = next(
            (t for t, n in NUMPY_DTYPES.items() if np.dtype(n) == dtype.newbyteorder("=")), None
        )
        if storage is None:
            raise ValueError(
                f"{self.path}: expected uint8, float16, float32 or float64 images, "
                f"found dtype {dtype}"
            )
        self._dtype, self._fortran, self._offset = dtype, fortran, offset
        self._native = dtype.newbyteorder("=")
        self._row = int(np.prod(shape[1:])) * dtype.itemsize
        self._init_meta(shape[0], shape[1:], storage, labels, ids, self.path)

    def _describe(self):
        return repr(self.path)

    def check(self):
        shape, _, dtype, offset = npy_header(self.path)
        if (shape, dtype, offset) != (self.shape, self._dtype, self._offset):
            raise ValueError(f"{self.path}: changed since it was opened (now {dtype} {shape})")
        check_file_size(
            self.path,
            offset + self.N * self._row,
            f"{self.N} images {'×'.join(map(str, self.chw))} of {dtype}",
        )

    def _map(self, start, stop):
        if self._fortran:
            m = np.memmap(self.path, self._dtype, "r", self._offset, self.shape, order="F")
            return m[start:stop]
        return np.memmap(
            self.path, self._dtype, "r", self._offset + start * self._row, (stop - start, *self.chw)
        )

    def read_raw(self, start, stop):
        start, stop = self.check_range(start, stop)
        if start == stop:
            return torch.empty((0, *self.chw), dtype=self.storage_dtype)
        try:
            a = self._map(start, stop).astype(self._native, order="C")  # a copy; the map goes
        except (ValueError, OSError) as e:
            raise read_error(self.path, start, stop, e) from e
        return torch.from_numpy(a)

    def _raw_gather(self, idx):
        try:
            m = self._map(0, self.N)
            a = np.ascontiguousarray(m[idx.numpy()], dtype=self._native)
            del m
        except (ValueError, OSError) as e:
            raise read_error(self.path, int(idx[0]), int(idx[-1]) + 1, e) from e
        return torch.from_numpy(a)
