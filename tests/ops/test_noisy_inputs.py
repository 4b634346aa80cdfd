"""mucs_fast::noisy_inputs vs the reference (bit for bit), on every device and kernel family."""

import contextlib
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mucs_fast import ops, reference

from .conftest import ACCELERATOR, DEVICES, GPU_KERNELS, gpu_kernel, interpreted_triton

noisy_module = importlib.import_module("mucs_fast.ops.noisy_inputs")

# (x shape [n, *S], M): one image and one noise, odd everything, digits (n·M = 1600), CIFAR.
SHAPES = [((1, 1), 1), ((3, 1, 5, 7), 4), ((16, 1, 8, 8), 100), ((2, 3, 32, 32), 5), ((5, 33), 3)]
FORMS = ["edm", "edm_c_in", "vp"]


def make_inputs(x_shape, M, form, dtype=torch.float32, device="cpu", per_image=False, seed=0):
    """(x, eps, a, b, c) with EDM σ (log-normal) or VP ᾱ_t scalings."""
    g = torch.Generator().manual_seed(seed)
    n = x_shape[0]
    x = torch.randn(x_shape, generator=g).to(device, dtype)
    eps_shape = (M, n, *x_shape[1:]) if per_image else (M, *x_shape[1:])
    eps = torch.randn(eps_shape, generator=g).to(device, dtype)
    sigma = torch.exp(torch.randn(M, generator=g) * 1.2 - 1.2).to(device)
    if form == "vp":
        alpha_bar = torch.rand(M, generator=g).to(device) * 0.98 + 0.01
        return x, eps, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), None
    c = (1 / (sigma**2 + 0.25).sqrt()) if form == "edm_c_in" else None
    return x, eps, torch.ones_like(sigma), sigma, c


@pytest.mark.parametrize("per_image", [False, True], ids=["shared_eps", "per_image_eps"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_bitwise(device, shape, form, per_image):
    args = make_inputs(*shape, form, device=device, per_image=per_image)
    out = ops.noisy_inputs(*args)
    x_shape, M = shape
    assert out.shape == (M * x_shape[0], *x_shape[1:]) and out.dtype == torch.float32
    assert torch.equal(out, reference.noisy_inputs(*args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("form", ["edm_c_in", "vp"])
def test_dtypes_bitwise(device, form, dtype):
    """fp32 (fp64) arithmetic, one rounding to x's dtype at the end: the reference's bits."""
    args = make_inputs((3, 3, 9, 7), 5, form, dtype, device, per_image=True)
    out = ops.noisy_inputs(*args)
    assert out.dtype == dtype
    assert torch.equal(out, reference.noisy_inputs(*args))


def test_mixed_dtypes(device):
    """bf16 images with fp32 noise and fp64 scalings: every input converted to fp32 first."""
    x, eps, a, b, c = make_inputs((4, 2, 5, 5), 3, "edm_c_in", device=device)
    args = (x.bfloat16(), eps, a.double(), b, c.half())
    assert torch.equal(ops.noisy_inputs(*args), reference.noisy_inputs(*args))


def test_edm_and_vp_closed_forms(device):
    """EDM: x + σ·ε row by row (what the denoiser feeds the net); VP: √ᾱ·x + √(1 − ᾱ)·ε."""
    x, eps, a, sigma, _ = make_inputs((3, 1, 4, 4), 5, "edm", device=device)
    out = ops.noisy_inputs(x, eps, a, sigma, None).view(5, 3, 1, 4, 4)
    for m in range(5):
        assert torch.equal(out[m], x + sigma[m] * eps[m])
    x, eps, sa, sb, _ = make_inputs((3, 1, 4, 4), 5, "vp", device=device, per_image=True)
    out = ops.noisy_inputs(x, eps, sa, sb, None).view(5, 3, 1, 4, 4)
    for m in range(5):
        assert torch.equal(out[m], sa[m] * x + sb[m] * eps[m])


def test_zero_noise_and_unit_scale(device):
    x, eps, a, b, c = make_inputs((4, 6), 3, "edm_c_in", device=device)
    out = ops.noisy_inputs(x, eps, torch.ones_like(a), torch.zeros_like(b), None)
    assert torch.equal(out, x.repeat(3, 1))


def test_non_contiguous_inputs(device):
    """Strided rows, channels-last noise and strided scalings give the bits of contiguous inputs."""
    x, eps, a, b, c = make_inputs((6, 3, 5, 7), 4, "edm_c_in", device=device, per_image=True)
    big = torch.randn(12, 3, 5, 7, device=device)
    big[::2] = x
    nc = (
        big[::2],
        eps.transpose(3, 4).contiguous().transpose(3, 4),
        torch.stack([a, a], 1)[:, 0],
        b.expand(2, -1)[1],
        torch.stack([c, c], 1)[:, 1],
    )
    assert not nc[0].is_contiguous() and not nc[1].is_contiguous()
    assert torch.equal(ops.noisy_inputs(*nc), ops.noisy_inputs(x, eps, a, b, c))
    assert torch.equal(ops.noisy_inputs(*nc), reference.noisy_inputs(*nc))


def test_empty(device):
    x, eps, a, b, c = make_inputs((3, 2, 2), 4, "edm", device=device)
    assert ops.noisy_inputs(x[:0], eps, a, b, c).shape == (0, 2, 2)
    assert ops.noisy_inputs(x, eps[:0], a[:0], b[:0], None).shape == (0, 2, 2)


def test_deterministic(device):
    """Two runs, and 1 vs 2 CPU threads, give the same bits."""
    args = make_inputs((64, 3, 32, 32), 8, "edm_c_in", device=device)
    out = ops.noisy_inputs(*args)
    assert torch.equal(out, ops.noisy_inputs(*args))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1 = ops.noisy_inputs(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, out1)


def test_not_differentiable(device):
    x, eps, a, b, c = make_inputs((2, 5), 3, "edm_c_in", device=device)
    with pytest.raises(RuntimeError, match="not differentiable.*b requires grad"):
        ops.noisy_inputs(x, eps, a, b.requires_grad_(), c)
    with torch.no_grad():  # no graph is recorded: fine
        ops.noisy_inputs(x, eps, a, b, c)


@pytest.mark.parametrize("form", ["edm", "edm_c_in"])
def test_opcheck(device, form):
    args = make_inputs((3, 2, 5), 4, form, device=device)
    torch.library.opcheck(torch.ops.mucs_fast.noisy_inputs.default, args)
    args = make_inputs((3, 2, 5), 4, form, device=device, per_image=True)
    torch.library.opcheck(torch.ops.mucs_fast.noisy_inputs.default, args)


def test_compile_fullgraph(device):
    args = make_inputs((4, 3, 5, 5), 6, "edm_c_in", device=device)

    def f(x, eps, a, b, c):
        return ops.noisy_inputs(x, eps, a, b, c) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), f(*args))


def test_vmap_over_model_noises(device):
    """K models with their own noises (ε, σ batched; x shared) fold into one call of K·M noises."""
    K, M = 3, 4
    x, _, a, _, c = make_inputs((5, 2, 3), M, "edm_c_in", device=device)
    eps = torch.randn(K, M, 5, 2, 3, device=device)
    sigma = torch.rand(K, M, device=device) + 0.1
    vm = torch.func.vmap(ops.noisy_inputs, in_dims=(None, 0, None, 0, None))(x, eps, a, sigma, c)
    loop = torch.stack([ops.noisy_inputs(x, eps[k], a, sigma[k], c) for k in range(K)])
    assert torch.equal(vm, loop)
    vm = torch.func.vmap(ops.noisy_inputs, in_dims=(None, None, None, 0, None))(
        x, eps[0], a, sigma, c
    )
    assert torch.equal(
        vm, torch.stack([ops.noisy_inputs(x, eps[0], a, sigma[k], c) for k in range(K)])
    )


def test_vmap_over_images(device):
    K, M = 2, 3
    xs = torch.randn(K, 4, 6, device=device)
    _, eps, a, b, c = make_inputs((4, 6), M, "edm_c_in", device=device)
    vm = torch.func.vmap(ops.noisy_inputs, in_dims=(0, None, None, None, None))(xs, eps, a, b, c)
    assert torch.equal(vm, torch.stack([ops.noisy_inputs(xs[k], eps, a, b, c) for k in range(K)]))


def _bad_cases(device):
    x, eps, a, b, c = make_inputs((3, 2, 4), 5, "edm_c_in", device=device)
    cases = {
        "eps image shape": ((x, eps[..., :3], a, b, c), "eps"),
        "eps noise count": ((x, eps[:4], a, b, c), "eps"),
        "eps per-image n": ((x, torch.randn(5, 2, 2, 4, device=device), a, b, c), "eps"),
        "eps rank": ((x, eps[:, 0], a, b, c), "eps"),
        "b length": ((x, eps, a, b[:4], c), "b"),
        "c rank": ((x, eps, a, b, c[:, None]), "c"),
        "a rank": ((x, eps, a[:, None], b, c), "a"),
        "integer x": ((x.long(), eps, a, b, c), "x"),
        "integer a": ((x, eps, a.int(), b, c), "a"),
        "0-d x": ((x[0, 0, 0], eps, a, b, c), "x"),
    }
    if device != "cpu":
        cases["b on cpu"] = ((x, eps, a, b.cpu(), c), "b")
    return cases


@pytest.mark.parametrize("backend", ["dispatcher", "reference_kernel", "fake"])
@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_args_raise(device, backend, case):
    args, name = _bad_cases(device)[case]
    fn = (
        noisy_module._noisy_inputs_default
        if backend == "reference_kernel"
        else torch.ops.mucs_fast.noisy_inputs.default
    )
    mode = FakeTensorMode() if backend == "fake" else contextlib.nullcontext()
    if backend == "fake":
        args = tuple(None if a is None else mode.from_tensor(a) for a in args)
    with mode, pytest.raises(RuntimeError, match=name):
        fn(*args)


# Triton under the interpreter (CI) and both accelerator kernels (GPU): the reference's bits.
TRITON_CASES = [
    ((2, 1, 3, 5), 3, "edm_c_in", False),
    ((3, 7), 2, "vp", True),
    ((1, 1), 1, "edm", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_interpreted(case, dtype):
    x_shape, M, form, per_image = case
    args = make_inputs(x_shape, M, form, dtype, per_image=per_image)
    assert torch.equal(interpreted_triton("noisy_inputs")(*args), reference.noisy_inputs(*args))


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("per_image", [False, True], ids=["shared_eps", "per_image_eps"])
def test_gpu_kernels_match_cpu_bits(kernel, dtype, per_image):
    fn = gpu_kernel("noisy_inputs", kernel)
    args = make_inputs((5, 3, 33, 31), 7, "edm_c_in", dtype, per_image=per_image)
    on_gpu = tuple(None if t is None else t.to(ACCELERATOR) for t in args)
    assert torch.equal(fn(*on_gpu).cpu(), reference.noisy_inputs(*args))
    assert torch.equal(fn(*on_gpu).cpu(), ops.noisy_inputs(*args))


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_kernels_bad_args_raise(kernel):
    fn = gpu_kernel("noisy_inputs", kernel)
    for args, name in _bad_cases(ACCELERATOR).values():
        with pytest.raises(RuntimeError, match=name):
            fn(*args)


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs an accelerator")
def test_same_bits_on_cpu_and_accelerator():
    args = make_inputs((8, 3, 32, 32), 10, "edm_c_in", torch.bfloat16)
    on_acc = tuple(None if t is None else t.to(DEVICES[1]) for t in args)
    assert torch.equal(ops.noisy_inputs(*args), ops.noisy_inputs(*on_acc).cpu())
