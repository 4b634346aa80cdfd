"""Op tests run on every device this machine has: the CPU, and an accelerator if visible.

Each op has up to three kernel families besides its reference: C++ on the CPU (always live when
mucs_fast._C is built), and Triton and CUDA C++ on a CUDA device. `gpu_kernel` hands tests either
accelerator kernel by name, whichever serves the op's CUDA key; `interpreted_triton` hands them the
Triton kernel on CPU tensors under TRITON_INTERPRET=1 (how CI tests Triton).
"""

import importlib.util
import os

import pytest
import torch

import mucs_fast.ops
from mucs_fast.ops import _backend


def _devices():
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return ["cpu"] + ([acc.type] if acc is not None else [])


DEVICES = _devices()
ACCELERATOR = DEVICES[1] if len(DEVICES) > 1 else None
GPU_KERNELS = ["triton", "cuda"]  # the two kernel families of a CUDA device
INTERPRETED = (
    os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True, scope="session")
def _load_compiled_ops():
    """torch.ops.mucs_fast.* reach the compiled kernels once mucs_fast._C is loaded (lazily, on the
    first mucs_fast.ops call); tests that call torch.ops directly must see them too."""
    mucs_fast.ops.load()


def gpu_kernel(op: str, name: str):
    """The accelerator kernel `name` ("triton" or "cuda") of op; skips when it is absent here."""
    if ACCELERATOR is None:
        pytest.skip("needs an accelerator")
    fn, why = _backend.accelerator_kernel(op, name)
    if fn is None:
        pytest.skip(why)
    return fn


def interpreted_triton(op: str):
    """op's Triton kernel, run by the interpreter on CPU tensors; skips on a GPU machine (there
    the compiled kernel is tested against the CPU instead)."""
    if not INTERPRETED:
        pytest.skip("Triton interpreter not in use (TRITON_INTERPRET unset or triton missing)")
    return _backend.triton_kernel(op)
