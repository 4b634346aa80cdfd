"""skew_accumulate: reference vs torch.compile(reference) vs the op, and on a GPU its Triton and
CUDA C++ kernels (memory-bound).

pytest benches/bench_skew_accumulate.py [--benchmark-enable | --benchmark-disable]
"""

import pytest
import torch
from conftest import ACCELERATOR_PROVIDERS, accelerator_kernel
from shapes import SKEW_ACCUMULATE_CPU, SKEW_ACCUMULATE_GPU

from mucs_fast import ops, reference

PROVIDERS = ["reference", "compiled", "op", *ACCELERATOR_PROVIDERS]


def _fn(provider, device):
    if provider in ACCELERATOR_PROVIDERS:
        return accelerator_kernel("skew_accumulate", provider, device)
    return {
        "reference": reference.skew_accumulate,
        "compiled": torch.compile(reference.skew_accumulate),
        "op": ops.skew_accumulate,
    }[provider]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(SKEW_ACCUMULATE_GPU))
def test_skew_accumulate(benchmark, measure, device, shape_name, provider):
    if device == "cpu" and shape_name not in SKEW_ACCUMULATE_CPU:
        pytest.skip("accelerator shape")
    K, n, M = SKEW_ACCUMULATE_GPU[shape_name]
    g = torch.Generator().manual_seed(0)
    loss_t = (torch.rand(n, M, generator=g) + 0.1).to(device)
    loss_u = loss_t * (1 + 0.1 * torch.randn(K, n, M, generator=g).to(device))
    fn = _fn(provider, device)
    torch.testing.assert_close(
        fn(loss_u, loss_t), reference.skew_accumulate(loss_u, loss_t), rtol=1e-5, atol=1e-4
    )

    bytes_moved = (loss_u.numel() + loss_t.numel()) * 4 + K * n * 4
    benchmark.group = f"skew_accumulate {shape_name}"
    measure(lambda: fn(loss_u, loss_t), bytes_moved)
