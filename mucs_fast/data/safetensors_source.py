"""One tensor [N, C, H, W] of a `.safetensors` file as a streamed training set, read by slices."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .checks import check_chw
from .files import split_key
from .source import Source

_SAFETENSORS = {
    "U8": torch.uint8,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


class SafetensorsSource(Source):
    """One tensor [N, C, H, W] of a .safetensors file (`path`, when it holds one tensor, or
    `path:key`), read with `safe_open(...).get_slice` (the file is opened per read)."""

    def __init__(self, path, key: str | None = None, labels=None, ids=None):
        p, k = split_key(path) if key is None else (Path(path), key)
        self.path, self.key = os.fspath(p), k
        with self._open() as f:
            keys = list(f.keys())
            if self.key is None:
                if len(keys) != 1:
                    raise ValueError(
                        f"{self.path}: expected exactly one tensor (or name one as "
                        f"'{self.path}:<key>'), found {len(keys)}: {sorted(keys)}"
                    )
                self.key = keys[0]
            elif self.key not in keys:
                raise ValueError(f"{self.path}: no tensor named {self.key!r}; found {sorted(keys)}")
            sl = f.get_slice(self.key)
            shape, dt = tuple(sl.get_shape()), sl.get_dtype()
        shape = check_chw(shape, f"{self.path}:{self.key}")
        if dt not in _SAFETENSORS:
            raise ValueError(
                f"{self.path}:{self.key}: expected uint8 or float images, found dtype {dt}"
            )
        self._init_meta(
            shape[0], shape[1:], _SAFETENSORS[dt], labels, ids, f"{self.path}:{self.key}"
        )

    def _describe(self):
        return repr(f"{self.path}:{self.key}")

    def _open(self):
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            return safe_open(self.path, framework="pt")
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise ValueError(
                f"{self.path}: not a readable .safetensors file ({type(e).__name__}: {e})"
            ) from e

    def check(self):
        with self._open() as f:
            keys = f.keys()
            if self.key not in keys:
                raise ValueError(f"{self.path}: no tensor named {self.key!r} any more")
            sl = f.get_slice(self.key)
            if (tuple(sl.get_shape()), _SAFETENSORS.get(sl.get_dtype())) != (
                self.shape,
                self.storage_dtype,
            ):
                raise ValueError(f"{self.path}:{self.key}: changed since it was opened")

    def read_raw(self, start, stop):
        start, stop = self.check_range(start, stop)
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
