"""The streamed training set: `Source`, N images C×H×W read by ranges and by positions.

The engine reads a Source by ranges (`chunks`, the scoring pass) and by positions (`take`, retain
batches); `read` and `gather` return float32 [n, C, H, W] on the CPU in the model's range. Storage
may be uint8 (v enters as v/127.5 − 1, `checks.to_model_range`), float16, bfloat16 or
float32/float64 (converted with `.float()`). A training set is a Source from `attribute` on: a
resident tensor is a `TensorSource`, whose chunks are slices of it on its own device (no copy);
file-backed sources (`npy`, `safetensors_source`, `shards`) read ahead with `prefetch`.

File-backed sources hold paths, not open maps: each read maps what it needs and unmaps it, so
pages read once do not stay in the process's resident memory, and a source pickles to another
process as its paths. The files must not change while a source is in use.

`fingerprint()` equals `_io.tensor_digest` of the float32 tensor the source reads as (dtype,
shape, values), computed in chunks whatever the storage; `source_digest` extends this to the
mappings `tensor_digest` takes. The pass that computes it also finds NaN/Inf (`check_finite`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import torch

from .._io import tensor_digest
from .checks import check_chw, check_ids, check_labels, to_model_range
from .prefetch import prefetch

# float32 bytes per chunk of the streaming passes (fingerprint, pack): bounds their memory
CHUNK_BYTES = 32 << 20


def images_per_chunk(chw, chunk_images: int | None = None) -> int:
    """Images per chunk of a streaming pass: `chunk_images`, or as many as CHUNK_BYTES of float32
    hold."""
    if chunk_images is not None:
        return max(1, int(chunk_images))
    return max(1, CHUNK_BYTES // (4 * chw[0] * chw[1] * chw[2]))


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
        self.labels = None if labels is None else check_labels(labels, self.N, where)
        self.ids = None if ids is None else check_ids(ids, self.N, where)
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
        return (
            f"{type(self).__name__}({where + ', ' if where else ''}N={self.N}, {C}×{H}×{W}, "
            f"{str(self.storage_dtype).removeprefix('torch.')})"
        )

    def _describe(self) -> str:
        return ""

    def check_range(self, start, stop) -> tuple[int, int]:
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
        start, stop = self.check_range(start, stop)
        return to_model_range(self.read_raw(start, stop))

    def _check_idx(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        if idx.ndim != 1 or idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
            raise ValueError(
                f"{self!r}: gather expects integer positions [n], got {idx.dtype} "
                f"of shape {tuple(idx.shape)}"
            )
        idx = idx.to("cpu", torch.int64)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.N:
                raise ValueError(
                    f"{self!r}: position {lo if lo < 0 else hi} is outside 0..{self.N - 1}"
                )
        return idx

    def gather(self, idx) -> torch.Tensor:
        """Images at positions idx (int64 [n], any order, repeats allowed): float32 [n, C, H, W]."""
        idx = self._check_idx(idx)
        if idx.numel() == 0:
            return torch.empty((0, *self.chw), dtype=torch.float32)
        u, inv = torch.unique(idx, sorted=True, return_inverse=True)
        x = to_model_range(self._raw_gather(u))
        if u.numel() == idx.numel() and torch.equal(u, idx):
            return x
        return x[inv]

    def check(self) -> None:
        """Cheap validation of the files behind the source (no image is read)."""

    # -- the engine's reads -----------------------------------------------------------------
    def chunks(self, ranges, device) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, images float32 [stop−start, C, H, W] on device) for each range, in
        order, read ahead on a background thread (`prefetch`). Ranges are checked first."""
        return prefetch(self, ranges, device)

    def take(self, idx: torch.Tensor, device) -> torch.Tensor:
        """Images at positions idx (int64 of any shape, any order): float32 [*idx.shape, C, H, W]
        on device (the engine's random access: retain batches)."""
        out = self.gather(idx.reshape(-1).cpu())
        return out.view(*idx.shape, *self.chw).to(device, non_blocking=True)

    # -- digests ----------------------------------------------------------------------------
    def _digest_chunks(self, chunk_images=None) -> Iterator[torch.Tensor]:
        n = images_per_chunk(self.chw, chunk_images)
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
        for x in self._digest_chunks(chunk_images):
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
            raise ValueError(
                f"{name}: image {self._first_nonfinite} of {self!r} contains NaN or Inf"
            )


def source_digest(x) -> str:
    """`_io.tensor_digest` where any value may be a Source (hashed as its float32 tensor)."""
    if isinstance(x, Source):
        return x.fingerprint()
    if not isinstance(x, Mapping):
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


class TensorSource(Source):
    """An in-memory tensor [N, C, H, W] (float, or uint8 0..255) on any device. float32
    contiguous storage is read by slicing (a view: do not modify what `read` returns); other
    dtypes convert per read. `chunks` and `take` read where the tensor lives (no prefetch, no
    host round trip for a tensor already on the device) and keep a float tensor's dtype."""

    _cache_fingerprint = False

    def __init__(self, x: torch.Tensor, labels=None, ids=None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"TensorSource: expected a torch.Tensor, got {type(x).__name__}")
        shape = check_chw(x.shape, "TensorSource")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(
                f"TensorSource: expected float images (or uint8 0..255), found {x.dtype}"
            )
        self.x = x.detach()
        self._init_meta(shape[0], shape[1:], x.dtype, labels, ids, "TensorSource")

    def read_raw(self, start, stop):
        start, stop = self.check_range(start, stop)
        return self.x[start:stop].cpu()

    def _raw_gather(self, idx):
        return self.x.index_select(0, idx.to(self.x.device)).cpu()

    def gather(self, idx):  # any order as it is: no sort, no second copy
        return to_model_range(self._raw_gather(self._check_idx(idx)))

    def _engine(self, x: torch.Tensor) -> torch.Tensor:
        # a float tensor keeps its dtype here (the fp64 oracle tests compute in float64; the
        # engine hands in float32): only uint8 storage is converted
        return to_model_range(x) if x.dtype == torch.uint8 else x

    def chunks(self, ranges, device):
        ranges = [self.check_range(a, b) for a, b in ranges]
        return ((a, b, self._engine(self.x[a:b]).to(device)) for a, b in ranges)

    def take(self, idx, device):
        return self._engine(self.x[idx.to(self.x.device)]).to(device)


class ConcatSource(Source):
    """Sources of one C×H×W shape read as one: rows of `parts[0]`, then of `parts[1]`, ... (a
    text model's condition table: the cached training captions, then the targets' prompts)."""

    _cache_fingerprint = False

    def __init__(self, *parts: Source):
        if not parts or not all(isinstance(p, Source) for p in parts):
            raise TypeError("ConcatSource: expected one or more Sources")
        if len({p.chw for p in parts}) != 1:
            raise ValueError(
                f"ConcatSource: parts differ in shape ({', '.join(repr(p) for p in parts)})"
            )
        self.parts = parts
        self._starts = [0]
        for p in parts:
            self._starts.append(self._starts[-1] + p.N)
        dtypes = {p.storage_dtype for p in parts}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self._init_meta(self._starts[-1], parts[0].chw, dtype, where="ConcatSource")

    def _describe(self):
        return " + ".join(repr(p) for p in self.parts)

    def _convert(self, raw: torch.Tensor) -> torch.Tensor:
        return raw if raw.dtype == self.storage_dtype else to_model_range(raw)

    def read_raw(self, start, stop):
        start, stop = self.check_range(start, stop)
        out = []
        for p, a in zip(self.parts, self._starts):
            lo, hi = max(start, a), min(stop, a + p.N)
            if lo < hi:
                out.append(self._convert(p.read_raw(lo - a, hi - a)))
        return torch.cat(out) if out else torch.empty((0, *self.chw), dtype=self.storage_dtype)

    def _raw_gather(self, idx):
        out = torch.empty((idx.numel(), *self.chw), dtype=self.storage_dtype)
        for p, a in zip(self.parts, self._starts):
            sel = ((idx >= a) & (idx < a + p.N)).nonzero().reshape(-1)
            if sel.numel():
                out[sel] = self._convert(p._raw_gather(idx[sel] - a))
        return out
