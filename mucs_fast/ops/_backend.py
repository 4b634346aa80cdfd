"""Which implementation serves each op: loading the compiled kernels and reporting what is live.

Every op's default implementation is its plain-PyTorch reference (registered for every device).
Faster kernels override it per device, once `load()` ran (on the first call of a mucs_fast.ops
function):
- CPU: the C++ kernels of mucs_fast._C. Importing it runs the C++ TORCH_LIBRARY_IMPL blocks that
  register them.
- CUDA: each op has two kernels, Triton (mucs_fast.kernels.<op>, launched from Python) and CUDA C++
  (mucs_fast._C when built with CUDA; always callable as mucs_fast_cuda::<op>). `CUDA_KERNEL`
  picks the one registered for the op's CUDA dispatch key (the C++ one straight into the
  dispatcher, csrc/registry.h); the other one serves if the chosen one is absent. The Triton module
  (and triton itself) is imported on the first CUDA call of an op it serves, never at import time.
If mucs_fast._C is missing or broken, the references keep serving and `extension_error()` says why.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Callable, Optional

import torch

OPS = ("edm_loss", "edm_loss_backward", "skew_accumulate", "noisy_inputs", "masked_adamw_step_")
DEVICE_TYPES = ("cpu", "cuda")
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
CUDA_NAMESPACE = "mucs_fast_cuda"  # the CUDA C++ kernels, whichever kernel serves mucs_fast::<op>

# The kernel registered for each op's CUDA dispatch key: "triton" or "cuda" (C++). A static table,
# set from side-by-side H200 measurements (benches/bench_<op>.py, providers triton and cuda; the
# numbers are in BENCHMARKS.md): the C++ kernels win where launch overhead dominates (the ops'
# tensors are small) and the two are on par at the bandwidth-bound sizes.
CUDA_KERNEL = {
    "edm_loss": "cuda",
    "edm_loss_backward": "cuda",
    "skew_accumulate": "cuda",
    "noisy_inputs": "cuda",
    "masked_adamw_step_": "cuda",
}


class _State:
    attempted = False
    error: Optional[str] = None
    sources: dict[tuple[str, str], str] = {}  # (op, device type) -> "triton" | "cuda", if set here
    triton_kernels: dict[str, tuple[Callable, object]] = {}  # op -> (Python kernel, its Library)


def add_triton_kernel(op: str, fn: Callable, lib) -> None:
    """Offer `fn` (checks + Triton launcher; imports triton only when called) for op's CUDA key."""
    _State.triton_kernels[op] = (fn, lib)


def triton_kernel(op: str) -> Callable:
    """The Triton implementation of op (argument checks + launcher), whatever CUDA_KERNEL says."""
    return _State.triton_kernels[op][0]


def cuda_kernel(op: str) -> Optional[Callable]:
    """The CUDA C++ implementation of op (mucs_fast_cuda::<op>), or None when not built."""
    load()
    name = f"{CUDA_NAMESPACE}::{op}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
        return None
    return getattr(getattr(torch.ops, CUDA_NAMESPACE), op).default


def accelerator_kernel(op: str, provider: str) -> tuple[Optional[Callable], Optional[str]]:
    """(kernel, None) for provider "triton" or "cuda", or (None, why it is absent here)."""
    if provider == "triton":
        if not triton_available():
            return None, "triton is not installed"
        return triton_kernel(op), None
    fn = cuda_kernel(op)
    return (fn, None) if fn is not None else (None, "mucs_fast._C was built without CUDA")


def triton_module(op: str) -> ModuleType:
    """mucs_fast.kernels.<op> (imports triton)."""
    return importlib.import_module(f"mucs_fast.kernels.{op}")


def triton_available() -> bool:
    """Triton and mucs_fast.kernels are installed (found without importing either)."""
    return (
        importlib.util.find_spec("triton") is not None
        and importlib.util.find_spec("mucs_fast.kernels") is not None
    )


def load() -> bool:
    """Import mucs_fast._C once (its kernels register on import) and register the CUDA kernels;
    True when mucs_fast._C is loaded."""
    # Under torch.compile the graph holds the op itself; it dispatches to whatever is registered
    # when the compiled code runs, so there is nothing to load while tracing.
    if not torch.compiler.is_compiling() and not _State.attempted:
        _State.attempted = True
        try:
            importlib.import_module("mucs_fast._C")
        except Exception as e:  # a missing, stale or ABI-incompatible build: keep the references
            _State.error = f"{type(e).__name__}: {e}"
        _register_cuda_kernels()
    return _State.attempted and _State.error is None


def _register_cuda_kernels() -> None:
    # Only a CUDA build of torch can hold CUDA tensors; the toolchain decides, not a visible GPU.
    if not torch.version.cuda:
        return
    has_triton = triton_available()
    for op, (fn, lib) in _State.triton_kernels.items():
        has_cpp = torch._C._dispatch_has_kernel_for_dispatch_key(f"{CUDA_NAMESPACE}::{op}", "CUDA")
        if has_cpp and (CUDA_KERNEL[op] == "cuda" or not has_triton):
            if importlib.import_module("mucs_fast._C").register_cuda_kernel(op):
                _State.sources[(op, "cuda")] = "cuda"
                continue
        if has_triton:
            register_kernel(op, "cuda", fn, "triton", lib)


def extension_error() -> Optional[str]:
    """Why mucs_fast._C could not be loaded (None when it loaded). Attempts the load first."""
    load()
    return _State.error


def register_kernel(op: str, device_type: str, fn: Callable, source: str, lib) -> None:
    """Register a Python kernel (e.g. a Triton launcher) for one device type; record its source."""
    torch.library.register_kernel(f"mucs_fast::{op}", device_type, fn, lib=lib)
    _State.sources[(op, device_type)] = source


def backends() -> dict[str, dict[str, str]]:
    """{op: {device type: "cpp" | "cuda" | "triton" | "reference"}}: what serves each op now."""
    load()
    report = {}
    for op in OPS:
        report[op] = {}
        for dt in DEVICE_TYPES:
            if (op, dt) in _State.sources:
                report[op][dt] = _State.sources[(op, dt)]
            elif torch._C._dispatch_has_kernel_for_dispatch_key(
                f"mucs_fast::{op}", _DISPATCH_KEY[dt]
            ):
                report[op][dt] = "cpp" if dt == "cpu" else "cuda"
            else:
                report[op][dt] = "reference"
    return report
