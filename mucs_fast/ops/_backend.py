"""Which implementation serves each op: loading the compiled kernels and reporting what is live.

Every op's default implementation is its plain-PyTorch reference (registered for every device).
The compiled module mucs_fast._C overrides it per device: importing it runs the C++
TORCH_LIBRARY_IMPL blocks that register the CPU kernels (and the CUDA kernels when it was built
with CUDA). It is imported on the first call of an op, not at import time; if it is missing or
broken, the references keep serving and `extension_error()` says why.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

OPS = ("edm_loss", "edm_loss_backward", "skew_accumulate")
DEVICE_TYPES = ("cpu", "cuda")
_COMPILED_NAME = {"cpu": "cpp", "cuda": "cuda"}
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


class _State:
    attempted = False
    error: Optional[str] = None
    python_kernels: dict[tuple[str, str], str] = {}  # (op, device type) -> "triton", ...


def load() -> bool:
    """Import mucs_fast._C once (its kernels register on import); True when it is loaded."""
    # Under torch.compile the graph holds the op itself; it dispatches to whatever is registered
    # when the compiled code runs, so there is nothing to load while tracing.
    if not torch.compiler.is_compiling() and not _State.attempted:
        _State.attempted = True
        try:
            importlib.import_module("mucs_fast._C")
        except Exception as e:  # a missing, stale or ABI-incompatible build: keep the references
            _State.error = f"{type(e).__name__}: {e}"
    return _State.attempted and _State.error is None


def extension_error() -> Optional[str]:
    """Why mucs_fast._C could not be loaded (None when it loaded). Attempts the load first."""
    load()
    return _State.error


def register_kernel(op: str, device_type: str, fn: Callable, source: str, lib) -> None:
    """Register a Python kernel (e.g. a Triton launcher) for one device type; record its source."""
    torch.library.register_kernel(f"mucs_fast::{op}", device_type, fn, lib=lib)
    _State.python_kernels[(op, device_type)] = source


def backends() -> dict[str, dict[str, str]]:
    """{op: {device type: "cpp" | "cuda" | "triton" | "reference"}}: what serves each op now."""
    load()
    report = {}
    for op in OPS:
        report[op] = {}
        for dt in DEVICE_TYPES:
            if (op, dt) in _State.python_kernels:
                report[op][dt] = _State.python_kernels[(op, dt)]
            elif torch._C._dispatch_has_kernel_for_dispatch_key(
                f"mucs_fast::{op}", _DISPATCH_KEY[dt]
            ):
                report[op][dt] = _COMPILED_NAME[dt]
            else:
                report[op][dt] = "reference"
    return report
