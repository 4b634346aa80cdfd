"""noisy_inputs: reference vs torch.compile(reference) vs the op, and on a GPU its Triton and
CUDA C++ kernels (memory-bound: the [M·n, ...] output dominates).

pytest benches/bench_noisy_inputs.py [--benchmark-enable | --benchmark-disable]
"""

import pytest
import torch
from conftest import ACCELERATOR_PROVIDERS, accelerator_kernel
from shapes import NOISY_INPUTS_CPU, NOISY_INPUTS_GPU

from mucs_fast import ops, reference

PROVIDERS = ["reference", "compiled", "op", *ACCELERATOR_PROVIDERS]


def _fn(provider, device):
    if provider in ACCELERATOR_PROVIDERS:
        return accelerator_kernel("noisy_inputs", provider, device)
    return {
        "reference": reference.noisy_inputs,
        "compiled": torch.compile(reference.noisy_inputs),
        "op": ops.noisy_inputs,
    }[provider]


def _inputs(x_shape, M, dtype, device):
    """EDM F-form input: c_in·(x + σ·ε) with the shared noise bank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g).to(device, dtype)
    eps = torch.randn(M, *x_shape[1:], generator=g).to(device, dtype)
    sigma = torch.exp(torch.randn(M, generator=g) * 1.2 - 1.2).to(device)
    return x, eps, torch.ones_like(sigma), sigma, 1 / (sigma**2 + 0.25).sqrt()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape_name", list(NOISY_INPUTS_GPU))
def test_noisy_inputs(benchmark, measure, device, shape_name, dtype, provider):
    if device == "cpu" and shape_name not in NOISY_INPUTS_CPU:
        pytest.skip("accelerator shape")
    x_shape, M = NOISY_INPUTS_GPU[shape_name]
    args = _inputs(x_shape, M, dtype, device)
    fn = _fn(provider, device)
    torch.testing.assert_close(fn(*args), reference.noisy_inputs(*args), rtol=1e-6, atol=1e-6)

    x, eps = args[:2]
    # read x and the bank once, write the [M·n, ...] batch
    bytes_moved = (x.numel() + eps.numel()) * eps.element_size() + M * x.numel() * x.element_size()
    benchmark.group = f"noisy_inputs {shape_name} {str(dtype).removeprefix('torch.')}"
    measure(lambda: fn(*args), bytes_moved)
