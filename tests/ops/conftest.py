"""Op tests run on every device this machine has: the CPU, and an accelerator if visible."""

import pytest
import torch

import mucs_fast.ops


def _devices():
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return ["cpu"] + ([acc.type] if acc is not None else [])


DEVICES = _devices()


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True, scope="session")
def _load_compiled_ops():
    """torch.ops.mucs_fast.* reach the compiled kernels once mucs_fast._C is loaded (lazily, on the
    first mucs_fast.ops call); tests that call torch.ops directly must see them too."""
    mucs_fast.ops.load()
