"""Atomic file writes and content digests.

Every file mucs_fast writes goes through `atomic_write`: the bytes land in a temporary file in the
same folder, are flushed to disk, and replace the destination in one `os.replace`. A crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping

import torch

TMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    """True for the `.<name>.<random>.tmp` files `atomic_path` writes (left behind only by a
    crash)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX) and name.count(".") >= 3


def _create_temp(folder: str, base: str) -> tuple[str, int]:
    """A new empty file `.<base>.<random>.tmp` in `folder`, and the mode it got.

    Created with mode 0o666, so the kernel applies the umask (and any default ACL) as to any other
    new file: that mode is the umask read without touching it (os.umask would change it for every
    thread while it is read). mkstemp would force 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"cannot create a temporary file for {base} in {folder}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    The result gets the mode an ordinary new file would (0o666 less the umask), even when the
    writer recreated the temporary file with its own mode (safetensors writes 0600)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp, mode = _create_temp(folder, os.path.basename(path))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            if stat.S_IMODE(os.fstat(f.fileno()).st_mode) != mode:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path, data: bytes | str | Callable[[str], None]) -> None:
    """Write bytes/str, or call `data(tmp_path)` to produce the file, then move it into place."""
    with atomic_path(path) as tmp:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_digest(x: torch.Tensor | Mapping[str, torch.Tensor] | None) -> str:
    """sha256 over names, dtypes, shapes and bytes (order-independent for mappings)."""
    h = hashlib.sha256()
    if x is None:
        h.update(b"none")
    elif isinstance(x, torch.Tensor):
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        h.update(_tensor_bytes(x))
    else:
        for k in sorted(x):
            v = x[k]
            h.update(k.encode())
            if isinstance(v, torch.Tensor):
                h.update(f"{v.dtype}{tuple(v.shape)}".encode())
                h.update(_tensor_bytes(v))
            else:
                h.update(repr(v).encode())
    return h.hexdigest()[:32]


def key_digest(*parts) -> str:
    """sha256 of a JSON-able key (dicts sorted): names cache entries and runs."""
    return hashlib.sha256(
        json.dumps(parts, sort_keys=True, default=_json_default).encode()
    ).hexdigest()[:32]


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def derive_seed(*parts) -> int:
    """A 63-bit seed derived from (seed, tag, index, ...): independent, reproducible streams."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
