"""mucs_fast::skew_accumulate vs the reference and closed forms, on every device and backend."""

import contextlib
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mucs_fast import ops, reference

from .conftest import ACCELERATOR, DEVICES, GPU_KERNELS, gpu_kernel, interpreted_triton

# The module (mucs_fast.ops.skew_accumulate is also the name of the op's function).
skew_module = importlib.import_module("mucs_fast.ops.skew_accumulate")

# [K, n, M]: one cell, M = 1, odd everything, the MUCS default M = 100, M above a GPU tile.
SHAPES = [(1, 1, 1), (2, 3, 1), (3, 5, 7), (2, 17, 100), (4, 33, 257)]


def make_losses(shape, dtype=torch.float32, device="cpu", t_dtype=None, seed=0):
    """Positive per-sample losses, L_u = L_t·(1 + small skew), as in a scoring pass."""
    g = torch.Generator().manual_seed(seed)
    K, n, M = shape
    loss_t = torch.rand(n, M, generator=g, dtype=torch.float64) * 2 + 0.05
    loss_u = loss_t * (1 + 0.1 * torch.randn(K, n, M, generator=g, dtype=torch.float64))
    return loss_u.to(device, dtype), loss_t.to(device, t_dtype or dtype)


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_ratio", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, shape, dtype, use_ratio):
    loss_u, loss_t = make_losses(shape, dtype, device)
    S = ops.skew_accumulate(loss_u, loss_t, 1e-3, use_ratio)
    assert S.dtype == dtype and S.shape == shape[:2] and S.device == loss_u.device
    torch.testing.assert_close(
        S, reference.skew_accumulate(loss_u, loss_t, 1e-3, use_ratio), **_tol(dtype)
    )


def test_defaults_and_eps(device):
    loss_u, loss_t = make_losses((2, 4, 9), device=device)
    assert torch.equal(
        ops.skew_accumulate(loss_u, loss_t), ops.skew_accumulate(loss_u, loss_t, 1e-3, True)
    )
    torch.testing.assert_close(
        ops.skew_accumulate(loss_u, loss_t, eps=0.25),
        reference.skew_accumulate(loss_u, loss_t, eps=0.25),
    )


def test_closed_forms(device):
    M = 100
    loss_t = torch.rand(6, M, device=device) + 0.1
    # Equal losses skew by exactly 0; L_u = 3·L_t, eps = 0 gives (3 − 1)/(3 + 1) = 1/2 per noise.
    assert torch.equal(
        ops.skew_accumulate(loss_t.expand(2, -1, -1), loss_t), torch.zeros(2, 6, device=device)
    )
    ones = torch.ones(6, M, device=device)
    assert torch.equal(
        ops.skew_accumulate((3 * ones).expand(1, -1, -1), ones, eps=0.0),
        torch.full((1, 6), M / 2, device=device),
    )
    # The difference ablation of integers is exact.
    assert torch.equal(
        ops.skew_accumulate((4 * ones).expand(1, -1, -1), ones, use_ratio=False),
        torch.full((1, 6), 3.0 * M, device=device),
    )


def _naive_low_precision(loss_u, loss_t, eps, use_ratio):
    """The error-budget baseline: the same formula evaluated in the inputs' own low precision."""
    u, t = loss_u, loss_t.unsqueeze(0)
    return ((u - t) / (u + t + eps) if use_ratio else u - t).sum(-1)


@pytest.mark.parametrize("use_ratio", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_budget(device, dtype, use_ratio):
    """FlashAttention's budget: error vs an fp64 reference ≤ 2× naive low-precision torch's."""
    loss_u, loss_t = make_losses((4, 64, 100), dtype, device)
    exact = reference.skew_accumulate(loss_u.double(), loss_t.double(), 1e-3, use_ratio)
    err = (ops.skew_accumulate(loss_u, loss_t, 1e-3, use_ratio).double() - exact).abs().max()
    err_naive = (_naive_low_precision(loss_u, loss_t, 1e-3, use_ratio).double() - exact).abs().max()
    assert err <= 2 * err_naive + 1e-6 * exact.abs().max(), (err, err_naive)


@pytest.mark.parametrize(
    "u_dtype,t_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float32, torch.float16),
    ],
    ids=str,
)
def test_mixed_dtypes(device, u_dtype, t_dtype):
    loss_u, loss_t = make_losses((3, 7, 100), u_dtype, device, t_dtype=t_dtype)
    torch.testing.assert_close(
        ops.skew_accumulate(loss_u, loss_t), reference.skew_accumulate(loss_u, loss_t)
    )


def test_non_contiguous_inputs(device):
    """Transposed [n, K, M] storage, strided m and strided rows give the bits of contiguous ones."""
    loss_u, loss_t = make_losses((3, 7, 100), device=device)
    nk = loss_u.transpose(0, 1).contiguous().transpose(0, 1)  # a view with K and n swapped
    strided_m = torch.stack([loss_u, loss_u], -1)[..., 1]  # m stride 2: copied
    rows = torch.stack([loss_t, loss_t], 1)[:, 0]  # row stride 2·M: a view
    assert not (nk.is_contiguous() or strided_m.is_contiguous() or rows.is_contiguous())
    S = ops.skew_accumulate(loss_u, loss_t)
    assert torch.equal(ops.skew_accumulate(nk, rows), S)
    assert torch.equal(ops.skew_accumulate(strided_m, loss_t), S)
    assert torch.equal(ops.skew_accumulate(loss_u.expand(3, -1, -1)[..., :], loss_t), S)


def test_chunks_accumulate(device):
    """Summing over chunks of noises is the sum over all of them (what the engine streams)."""
    loss_u, loss_t = make_losses((2, 9, 100), torch.float64, device)
    chunks = sum(
        ops.skew_accumulate(loss_u[..., m : m + 30], loss_t[:, m : m + 30])
        for m in range(0, 100, 30)
    )
    torch.testing.assert_close(chunks, ops.skew_accumulate(loss_u, loss_t), rtol=1e-13, atol=1e-13)


def test_deterministic(device):
    """Two runs, and 1 vs 2 CPU threads, give the same bits."""
    loss_u, loss_t = make_losses((8, 1000, 100), device=device)
    S = ops.skew_accumulate(loss_u, loss_t)
    assert torch.equal(S, ops.skew_accumulate(loss_u, loss_t))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        S1 = ops.skew_accumulate(loss_u, loss_t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(S, S1)


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs an accelerator")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("use_ratio", [True, False])
def test_same_bits_on_cpu_and_accelerator(dtype, use_ratio):
    """One thread per row, ascending m, on both (csrc/core/skew_accumulate.h)."""
    loss_u, loss_t = make_losses((5, 77, 100), dtype)
    S = ops.skew_accumulate(loss_u, loss_t, 1e-3, use_ratio)
    assert torch.equal(
        S, ops.skew_accumulate(loss_u.to(DEVICES[1]), loss_t.to(DEVICES[1]), 1e-3, use_ratio).cpu()
    )


def test_opcheck(device):
    loss_u, loss_t = make_losses((3, 5, 7), device=device)
    torch.library.opcheck(torch.ops.mucs_fast.skew_accumulate.default, (loss_u, loss_t))
    torch.library.opcheck(torch.ops.mucs_fast.skew_accumulate.default, (loss_u, loss_t, 0.5, False))


def test_compile_fullgraph(device):
    loss_u, loss_t = make_losses((3, 5, 100), device=device)

    def score(loss_u, loss_t):
        return ops.skew_accumulate(loss_u, loss_t) / loss_u.shape[-1]

    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(loss_u, loss_t), score(loss_u, loss_t))


def _bad_cases(device):
    loss_u, loss_t = make_losses((2, 3, 5), device=device)
    cases = {
        "loss_u rank": ((loss_u[0], loss_t), "loss_u"),
        "loss_t n": ((loss_u, loss_t[:2]), "loss_t"),
        "loss_t M": ((loss_u, loss_t[:, :4]), "loss_t"),
        "loss_t rank": ((loss_u, loss_t[None]), "loss_t"),
        "integer loss_u": ((loss_u.long(), loss_t), "loss_u"),
        "integer loss_t": ((loss_u, loss_t.int()), "loss_t"),
    }
    if device != "cpu":
        cases["loss_t on cpu"] = ((loss_u, loss_t.cpu()), "loss_t")
    return cases


@pytest.mark.parametrize("backend", ["dispatcher", "reference_kernel", "fake"])
@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_args_raise(device, backend, case):
    args, name = _bad_cases(device)[case]
    fn = (
        skew_module._skew_accumulate_default
        if backend == "reference_kernel"
        else torch.ops.mucs_fast.skew_accumulate.default
    )
    mode = FakeTensorMode() if backend == "fake" else contextlib.nullcontext()
    if backend == "fake":
        args = tuple(mode.from_tensor(a) for a in args)
    with mode, pytest.raises(RuntimeError, match=name):
        fn(*args)


# Triton under the interpreter (CI) and both accelerator kernels (GPU): ascending m, the same bits.
@pytest.mark.parametrize("use_ratio", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 7), (1, 130, 5)], ids=str)
def test_triton_interpreted(shape, dtype, use_ratio):
    loss_u, loss_t = make_losses(shape, dtype)
    S = interpreted_triton("skew_accumulate")(loss_u, loss_t, 1e-3, use_ratio)
    assert torch.equal(S, ops.skew_accumulate(loss_u, loss_t, 1e-3, use_ratio))


def test_triton_interpreted_mixed_dtypes_and_strides():
    loss_u, loss_t = make_losses((3, 7, 9), torch.bfloat16, t_dtype=torch.float32)
    nk = loss_u.transpose(0, 1).contiguous().transpose(0, 1)
    strided_m = torch.stack([loss_t, loss_t], -1)[..., 1]
    S = interpreted_triton("skew_accumulate")(nk, strided_m, 0.25, True)
    assert torch.equal(S, ops.skew_accumulate(loss_u, loss_t, 0.25, True))


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("use_ratio", [True, False])
def test_gpu_kernels_match_cpu_bits(kernel, dtype, use_ratio):
    fn = gpu_kernel("skew_accumulate", kernel)
    loss_u, loss_t = make_losses((5, 277, 100), dtype)
    S = fn(loss_u.to(ACCELERATOR), loss_t.to(ACCELERATOR), 1e-3, use_ratio).cpu()
    assert torch.equal(S, ops.skew_accumulate(loss_u, loss_t, 1e-3, use_ratio))


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_kernels_mixed_dtypes_and_strides(kernel):
    fn = gpu_kernel("skew_accumulate", kernel)
    loss_u, loss_t = make_losses((3, 70, 33), torch.bfloat16, t_dtype=torch.float32)
    nk = loss_u.to(ACCELERATOR).transpose(0, 1).contiguous().transpose(0, 1)
    strided_m = torch.stack([loss_t, loss_t], -1)[..., 1].to(ACCELERATOR)
    assert torch.equal(
        fn(nk, strided_m, 0.25, True).cpu(), ops.skew_accumulate(loss_u, loss_t, 0.25, True)
    )


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_kernels_bad_args_raise(kernel):
    fn = gpu_kernel("skew_accumulate", kernel)
    for args, name in _bad_cases(ACCELERATOR).values():
        with pytest.raises(RuntimeError, match=name):
            fn(*args)
