"""masked_adamw_step over one flat [K, P] buffer: reference vs torch.compile(reference) vs the op,
and on a GPU its Triton and CUDA C++ kernels (memory-bound: read p, g, m, v; write p, m, v).

pytest benches/bench_masked_adamw_step.py [--benchmark-enable | --benchmark-disable]
"""

import pytest
import torch
from conftest import ACCELERATOR_PROVIDERS, accelerator_kernel
from shapes import MASKED_ADAMW_STEP_CPU, MASKED_ADAMW_STEP_GPU

from mucs_fast import ops, reference

PROVIDERS = ["reference", "compiled", "op", *ACCELERATOR_PROVIDERS]
HP = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)  # CIFAR-10 unlearning


def _fn(provider, device):
    """fn(p, g, m, v, step, active) in place on the [K, P] tensors."""
    if provider in ACCELERATOR_PROVIDERS:
        kernel = accelerator_kernel("masked_adamw_step_", provider, device)
        return lambda p, g, m, v, step, active: kernel(p, g, m, v, step, active, *HP.values())
    lists = {
        "reference": reference.masked_adamw_step,
        "compiled": torch.compile(reference.masked_adamw_step),
        "op": ops.masked_adamw_step,
    }[provider]
    return lambda p, g, m, v, step, active: lists([p], [g], [m], [v], step, active, **HP)


def _state(K, P, device):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(K, P, generator=g).to(device)
    grad = torch.randn(K, P, generator=g).to(device)
    m = 0.1 * torch.randn(K, P, generator=g).to(device)
    v = m.square()
    step = torch.arange(1, K + 1, device=device) * 3
    return p, grad, m, v, step, torch.ones(K, dtype=torch.bool, device=device)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(MASKED_ADAMW_STEP_GPU))
def test_masked_adamw_step(benchmark, measure, device, shape_name, provider):
    if device == "cpu" and shape_name not in MASKED_ADAMW_STEP_CPU:
        pytest.skip("accelerator shape")
    K, P = MASKED_ADAMW_STEP_GPU[shape_name]
    p, g, m, v, step, active = _state(K, P, device)
    fn = _fn(provider, device)
    ours = [p.clone(), g, m.clone(), v.clone(), step, active]
    ref = [p, g, m.clone(), v.clone(), step, active]
    fn(*ours)
    reference.masked_adamw_step(*([t] for t in ref[:4]), step, active, **HP)
    for a, b in zip(ours[:4], ref[:4]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    del ref

    bytes_moved = 7 * K * P * p.element_size()
    benchmark.group = f"masked_adamw_step {shape_name}"
    big = K * P > 10**8
    measure(lambda: fn(*ours), bytes_moved, rounds=5 if big else 20, iterations=2 if big else 5)
