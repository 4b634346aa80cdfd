"""edm_loss forward and backward: reference vs torch.compile(reference) vs the op, and on a GPU its
Triton and CUDA C++ kernels (memory-bound).

pytest benches/bench_edm_loss.py [--benchmark-enable | --benchmark-disable]
"""

import pytest
import torch
from conftest import ACCELERATOR_PROVIDERS, accelerator_kernel
from shapes import EDM_LOSS_CPU, EDM_LOSS_GPU

from mucs_fast import ops, reference

PROVIDERS = ["reference", "compiled", "op", *ACCELERATOR_PROVIDERS]
_FNS = {
    ("forward", "reference"): reference.edm_loss,
    ("backward", "reference"): reference.edm_loss_backward,
    ("forward", "op"): ops.edm_loss,
    ("backward", "op"): ops.edm_loss_backward,
}


def _fn(direction, provider, device):
    if provider in ACCELERATOR_PROVIDERS:
        op = "edm_loss" if direction == "forward" else "edm_loss_backward"
        return accelerator_kernel(op, provider, device)
    if provider == "compiled":
        return torch.compile(_FNS[(direction, "reference")])
    return _FNS[(direction, provider)]


def _inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    B = shape[0]
    out, x, target = (torch.randn(*shape, generator=g).to(device, dtype) for _ in range(3))
    sigma = torch.exp(torch.randn(B, generator=g) * 1.2 - 1.2).to(device)
    c_skip = 0.25 / (sigma**2 + 0.25)
    c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    return out, x, target, c_skip, c_out, weight


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape_name", list(EDM_LOSS_GPU))
def test_edm_loss(benchmark, measure, device, shape_name, dtype, direction, provider):
    if device == "cpu" and shape_name not in EDM_LOSS_CPU:
        pytest.skip("accelerator shape")
    args = _inputs(EDM_LOSS_GPU[shape_name], dtype, device)
    if direction == "backward":
        args = (torch.rand(args[0].shape[0], device=device), *args)
    fn = _fn(direction, provider, device)
    expected = _FNS[(direction, "reference")](*args)
    torch.testing.assert_close(
        fn(*args), expected, rtol=1e-2 if dtype == torch.bfloat16 else 2e-5, atol=1e-5
    )

    elem = args[-6].element_size() if direction == "backward" else args[0].element_size()
    n = args[-6].numel()
    # forward: read out, x_noisy, target; backward: the same plus write the gradient.
    bytes_moved = n * elem * (3 if direction == "forward" else 4)
    benchmark.group = f"edm_loss {direction} {shape_name} {str(dtype).removeprefix('torch.')}"
    measure(lambda: fn(*args), bytes_moved)
