"""mucs_fast::masked_adamw_step_ and the list form vs the reference (bit for bit in float32), on
every device and kernel family; and against torch.optim.AdamW."""

import contextlib
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mucs_fast import ops, reference

from .conftest import ACCELERATOR, DEVICES, GPU_KERNELS, gpu_kernel, interpreted_triton

adamw_module = importlib.import_module("mucs_fast.ops.masked_adamw_step")

HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
MUCS_HP = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)  # CIFAR unlearning
# [K, ...]: one row of one weight, odd shapes, a matrix per target, K = 16 targets.
SHAPES = [(1, 1), (3, 5, 7), (4, 33, 65), (16, 257), (2, 3, 1, 4)]


def make_state(shape, dtype=torch.float32, device="cpu", seed=0):
    """(param, grad, exp_avg, exp_avg_sq) as after some steps: v ≥ 0, m ~ g."""
    g = torch.Generator().manual_seed(seed)

    def rnd(scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return rnd(), rnd(), rnd(0.1), rnd(0.1).square()


def make_clock(K, device="cpu", seed=0):
    """step (the step after this update, ≥ 1) and active, with one target stopped when K > 1."""
    g = torch.Generator().manual_seed(seed)
    step = torch.randint(1, 2000, (K,), generator=g)
    step[0] = 1
    active = torch.ones(K, dtype=torch.bool)
    if K > 1:
        active[K // 2] = False
    return step.to(device), active.to(device)


def _clone(state):
    return tuple(t.clone() for t in state)


def _run_op(fn, state, step, active, hp):
    p, g, m, v = _clone(state)
    fn(p, g, m, v, step, active, *hp.values())
    return p, m, v


def _run_reference(state, step, active, hp):
    p, g, m, v = _clone(state)
    reference.masked_adamw_step([p], [g], [m], [v], step, active, *hp.values())
    return p, m, v


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("hp", [HP, MUCS_HP], ids=["lr1e-3", "lr1e-5"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_bitwise(device, shape, hp):
    state = make_state(shape, device=device)
    step, active = make_clock(shape[0], device)
    out = _run_op(torch.ops.mucs_fast.masked_adamw_step_.default, state, step, active, hp)
    _assert_same(out, _run_reference(state, step, active, hp))


def test_float64(device):
    """float64: the C++ kernel's IEEE √ vs torch.sqrt (within 1 ulp) — equal to rounding."""
    state = make_state((3, 101), torch.float64, device)
    step, active = make_clock(3, device)
    out = _run_op(torch.ops.mucs_fast.masked_adamw_step_.default, state, step, active, HP)
    for x, y in zip(out, _run_reference(state, step, active, HP)):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-16)


def test_inactive_rows_untouched(device):
    state = make_state((4, 50), device=device)
    step = torch.tensor([0, 3, 0, 1], device=device)  # a stopped target may hold any step
    active = torch.tensor([False, True, False, True], device=device)
    p, m, v = _run_op(torch.ops.mucs_fast.masked_adamw_step_.default, state, step, active, HP)
    for new, old in zip((p, m, v), (state[0], state[2], state[3])):
        assert torch.equal(new[0::2], old[0::2]) and not torch.equal(new[1::2], old[1::2])


def test_list_form_matches_reference(device):
    """The engine's call: lists of [K, ...] tensors, step and active on the CPU."""
    shapes = [(3, 4, 5), (3, 7), (3, 1)]
    states = [make_state(s, device=device, seed=i) for i, s in enumerate(shapes)]
    step, active = make_clock(3)
    lists = [[s[i].clone() for s in states] for i in range(4)]
    ref = [[s[i].clone() for s in states] for i in range(4)]
    ops.masked_adamw_step(*lists, step, active, **HP)
    reference.masked_adamw_step(*ref, step, active, **HP)
    for a, b in zip(lists, ref):
        _assert_same(a, b)


def test_list_lengths_must_match(device):
    p, g, m, v = make_state((2, 3), device=device)
    step, active = make_clock(2)
    with pytest.raises(ValueError, match="one entry per tensor"):
        ops.masked_adamw_step([p], [g], [m, m], [v], step, active, **HP)


def test_matches_torch_adamw(device):
    """K = 1 over several steps: the AdamW of torch.optim (foreach), to rounding."""
    p0 = torch.randn(1, 300, dtype=torch.float64, device=device)
    grads = [torch.randn(1, 300, dtype=torch.float64, device=device) for _ in range(5)]
    w = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, 1):
        w.grad = g.clone()
        opt.step()
        ops.masked_adamw_step(
            [p],
            [g],
            [m],
            [v],
            torch.tensor([t]),
            torch.tensor([True]),
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.1,
        )
    torch.testing.assert_close(p, w.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m, opt.state[w]["exp_avg"], rtol=1e-12, atol=1e-14)


def test_non_contiguous_state(device):
    """A transposed param and strided moments are updated in place, keeping their layout."""
    p, g, m, v = make_state((5, 40), device=device)
    step, active = make_clock(5, device)
    pt = p.t().contiguous().t()  # [K, P] stored P-major
    mv = torch.stack([m, m], -1)[..., 0]  # stride 2
    gs = torch.stack([g, g], 0)[1]
    assert not pt.is_contiguous() and not mv.is_contiguous()
    torch.ops.mucs_fast.masked_adamw_step_(pt, gs, mv, v.clone(), step, active, *HP.values())
    ref = _run_reference((p, g, m, v), step, active, HP)
    assert torch.equal(pt, ref[0]) and torch.equal(mv, ref[1])
    assert pt.stride() == (1, 5)


def test_deterministic(device):
    """Two runs, and 1 vs 2 CPU threads, give the same bits."""
    state = make_state((4, 50_000), device=device)
    step, active = make_clock(4, device)
    fn = torch.ops.mucs_fast.masked_adamw_step_.default
    out = _run_op(fn, state, step, active, HP)
    _assert_same(out, _run_op(fn, state, step, active, HP))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1 = _run_op(fn, state, step, active, HP)
    finally:
        torch.set_num_threads(threads)
    _assert_same(out, out1)


def test_opcheck(device):
    state = make_state((3, 4, 5), device=device)
    step, active = make_clock(3, device)
    torch.library.opcheck(
        torch.ops.mucs_fast.masked_adamw_step_.default,
        (*_clone(state), step, active, *HP.values()),
    )


def test_compile_fullgraph(device):
    state = make_state((3, 4, 5), device=device)
    step, active = make_clock(3, device)

    def f(p, g, m, v, step, active):
        torch.ops.mucs_fast.masked_adamw_step_(p, g, m, v, step, active, *HP.values())
        return p.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = _clone(state), _clone(state)
    compiled(*a, step, active)
    f(*b, step, active)
    _assert_same(a, b)


def _bad_cases(device):
    p, g, m, v = make_state((3, 4), device=device)
    step, active = make_clock(3, device)
    cases = {
        "grad shape": ((p, g[:, :3], m, v, step, active), "grad"),
        "exp_avg dtype": ((p, g, m.double(), v, step, active), "exp_avg"),
        "exp_avg_sq shape": ((p, g, m, v[:2], step, active), "exp_avg_sq"),
        "step length": ((p, g, m, v, step[:2], active), "step"),
        "step dtype": ((p, g, m, v, step.int(), active), "step"),
        "active dtype": ((p, g, m, v, step, active.long()), "active"),
        "bfloat16 param": (
            (p.bfloat16(), g.bfloat16(), m.bfloat16(), v.bfloat16(), step, active),
            "param",
        ),
        "0-d param": ((p[0, 0], g[0, 0], m[0, 0], v[0, 0], step, active), "param"),
    }
    if device != "cpu":
        cases["step on cpu"] = ((p, g, m, v, step.cpu(), active), "step")
    return cases


@pytest.mark.parametrize("backend", ["dispatcher", "reference_kernel", "fake"])
@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_args_raise(device, backend, case):
    args, name = _bad_cases(device)[case]
    fn = (
        adamw_module._masked_adamw_step_default
        if backend == "reference_kernel"
        else torch.ops.mucs_fast.masked_adamw_step_.default
    )
    mode = FakeTensorMode() if backend == "fake" else contextlib.nullcontext()
    if backend == "fake":
        args = tuple(mode.from_tensor(a) for a in args)
    with mode, pytest.raises(RuntimeError, match=name):
        fn(*args, *HP.values())


# Triton under the interpreter (CI) and both accelerator kernels (GPU). Their bias corrections
# use β^t by binary exponentiation (csrc/core/masked_adamw_step.h): it rounds to the float32 of
# the reference's pow for every step ≤ 200000, so float32 matches bit for bit.
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1)], ids=str)
def test_triton_interpreted(shape):
    fn = interpreted_triton("masked_adamw_step_")
    state = make_state(shape)
    step, active = make_clock(shape[0])
    _assert_same(_run_op(fn, state, step, active, HP), _run_reference(state, step, active, HP))


def test_triton_interpreted_float64():
    fn = interpreted_triton("masked_adamw_step_")
    state = make_state((2, 9), torch.float64)
    step, active = make_clock(2)
    for x, y in zip(_run_op(fn, state, step, active, HP), _run_reference(state, step, active, HP)):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("hp", [HP, MUCS_HP], ids=["lr1e-3", "lr1e-5"])
@pytest.mark.parametrize("shape", [(16, 4097), (3, 33, 65), (5, 1)], ids=str)
def test_gpu_kernels_match_cpu_bits(kernel, shape, hp):
    fn = gpu_kernel("masked_adamw_step_", kernel)
    state = make_state(shape)
    step, active = make_clock(shape[0])
    on_gpu = tuple(t.to(ACCELERATOR) for t in state)
    out = _run_op(fn, on_gpu, step.to(ACCELERATOR), active.to(ACCELERATOR), hp)
    _assert_same((t.cpu() for t in out), _run_reference(state, step, active, hp))


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_kernels_float64_and_layouts(kernel):
    fn = gpu_kernel("masked_adamw_step_", kernel)
    state = make_state((4, 1001), torch.float64)
    step, active = make_clock(4)
    on_gpu = tuple(t.to(ACCELERATOR) for t in state)
    out = _run_op(fn, on_gpu, step.to(ACCELERATOR), active.to(ACCELERATOR), HP)
    for x, y in zip(out, _run_reference(state, step, active, HP)):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-14, atol=1e-16)
    # A misaligned (offset) and a transposed param take the unvectorized / copy-back paths.
    p, g, m, v = (t.to(ACCELERATOR) for t in make_state((3, 130)))
    step, active = make_clock(3)
    pt, mo = p.t().contiguous().t(), torch.empty(3 * 130 + 1, device=ACCELERATOR)[1:].view(3, 130)
    mo.copy_(m)
    fn(pt, g, mo, v.clone(), step.to(ACCELERATOR), active.to(ACCELERATOR), *HP.values())
    ref = _run_reference(tuple(t.cpu() for t in (p, g, m, v)), step, active, HP)
    assert torch.equal(pt.cpu(), ref[0]) and torch.equal(mo.cpu(), ref[1])


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_kernels_bad_args_raise(kernel):
    fn = gpu_kernel("masked_adamw_step_", kernel)
    for args, name in _bad_cases(ACCELERATOR).values():
        with pytest.raises(RuntimeError, match=name):
            fn(*args, *HP.values())


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs an accelerator")
def test_list_form_on_accelerator_with_cpu_clock():
    states = [make_state(s) for s in [(4, 3, 3), (4, 10)]]
    step, active = make_clock(4)
    lists = [[s[i].to(DEVICES[1]) for s in states] for i in range(4)]
    ref = [[s[i].clone() for s in states] for i in range(4)]
    ops.masked_adamw_step(*lists, step, active, **HP)
    reference.masked_adamw_step(*ref, step, active, **HP)
    for a, b in zip(lists, ref):
        _assert_same((t.cpu() for t in a), b)
