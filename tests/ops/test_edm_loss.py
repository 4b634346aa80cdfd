"""mucs_fast::edm_loss and edm_loss_backward against the reference, on every device and backend."""

import contextlib
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mucs_fast import ops, reference

from .conftest import ACCELERATOR, DEVICES, GPU_KERNELS, gpu_kernel, interpreted_triton

# The module (mucs_fast.ops.edm_loss is also the name of the op's function).
edm_loss_module = importlib.import_module("mucs_fast.ops.edm_loss")

SIGMA_DATA = 0.5
# B = 1, D = 1, odd D, many rows (so at::parallel_for splits), large odd D (12261 = 3·61·67).
SHAPES = [(1, 1), (1, 3, 5, 7), (5, 3, 7, 9), (64, 3, 8, 8), (3, 4, 32, 32), (2, 3, 61, 67)]
# Which of x_noisy / c_skip / c_out are given: the F-form (all), the D-form and ε-prediction
# (none; weight = λ(σ) or 1), and c_out alone.
FORMS = ["f_form", "d_form", "vp", "c_out_only"]


def make_inputs(
    shape, form, dtype=torch.float32, device="cpu", in_dtype=None, vec_dtype=None, seed=0
):
    """(out, x_noisy, target, c_skip, c_out, weight) with EDM scalings of log-normal σ."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    vec_dtype = vec_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)

    def rnd(*s, dt):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dt)

    sigma = torch.exp(rnd(B, dt=torch.float64) * 1.2 - 1.2)
    sd2 = SIGMA_DATA**2
    c_skip = (sd2 / (sigma**2 + sd2)).to(vec_dtype)
    c_out = (sigma * SIGMA_DATA / (sigma**2 + sd2).sqrt()).to(vec_dtype)
    weight = ((sigma**2 + sd2) / (sigma * SIGMA_DATA) ** 2).to(vec_dtype)
    out, x, target = (
        rnd(*shape, dt=dtype),
        rnd(*shape, dt=in_dtype or dtype),
        rnd(*shape, dt=in_dtype or dtype),
    )
    if form == "f_form":
        return out, x, target, c_skip, c_out, weight
    if form == "d_form":
        return out, None, target, None, None, weight
    if form == "vp":
        return out, None, target, None, None, torch.ones_like(weight)
    return out, x, target, None, c_out, weight


def _to(args, dtype):
    return tuple(None if a is None else a.to(dtype) for a in args)


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, shape, form, dtype):
    args = make_inputs(shape, form, dtype, device)
    L = ops.edm_loss(*args)
    assert L.dtype == dtype and L.shape == (shape[0],) and L.device == args[0].device
    torch.testing.assert_close(L, reference.edm_loss(*args), **_tol(dtype))
    grad = torch.rand(shape[0], dtype=dtype, device=device)
    dout = ops.edm_loss_backward(grad, *args)
    assert dout.dtype == dtype and dout.shape == args[0].shape
    torch.testing.assert_close(dout, reference.edm_loss_backward(grad, *args), **_tol(dtype))


def _naive_low_precision(out, x_noisy, target, c_skip, c_out, weight):
    """The error-budget baseline: the same formula evaluated in the inputs' own low precision."""
    r = out * c_out.to(out.dtype)[:, None] if c_out is not None else out
    if c_skip is not None:
        r = r + c_skip.to(out.dtype)[:, None] * x_noisy
    r = r - target
    return weight.to(out.dtype) * r.square().mean(1)


def _naive_low_precision_grad(grad, out, x_noisy, target, c_skip, c_out, weight):
    r = out * c_out.to(out.dtype)[:, None] if c_out is not None else out
    if c_skip is not None:
        r = r + c_skip.to(out.dtype)[:, None] * x_noisy
    scale = grad.to(out.dtype) * weight.to(out.dtype) * (2.0 / out.shape[1])
    if c_out is not None:
        scale = scale * c_out.to(out.dtype)
    return scale[:, None] * (r - target)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("form", ["f_form", "d_form"])
@pytest.mark.parametrize("shape", [(8, 768), (4, 3 * 64 * 64)], ids=str)
def test_low_precision_error_budget(device, shape, form, dtype):
    """FlashAttention's budget: error vs an fp64 reference ≤ 2× naive low-precision torch's."""
    args = make_inputs(shape, form, dtype, device, vec_dtype=dtype)
    exact = reference.edm_loss(*_to(args, torch.float64))
    err = (ops.edm_loss(*args).double() - exact).abs().max()
    err_naive = (_naive_low_precision(*args).double() - exact).abs().max()
    assert err <= 2 * err_naive + 1e-6 * exact.abs().max(), (err, err_naive)

    grad = torch.rand(shape[0], device=device)
    exact = reference.edm_loss_backward(grad.double(), *_to(args, torch.float64))
    err = (ops.edm_loss_backward(grad, *args).double() - exact).abs().max()
    err_naive = (_naive_low_precision_grad(grad, *args).double() - exact).abs().max()
    assert err <= 2 * err_naive + 1e-6 * exact.abs().max(), (err, err_naive)


@pytest.mark.parametrize(
    "out_dtype,in_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float32, torch.bfloat16),
    ],
    ids=str,
)
def test_mixed_dtypes(device, out_dtype, in_dtype):
    """Autocast's case: a bf16 network output against fp32 data; inputs read at full precision."""
    args = make_inputs((6, 3, 9, 9), "f_form", out_dtype, device, in_dtype=in_dtype)
    torch.testing.assert_close(ops.edm_loss(*args), reference.edm_loss(*args), rtol=2e-6, atol=1e-6)
    grad = torch.rand(6, device=device)
    torch.testing.assert_close(
        ops.edm_loss_backward(grad, *args), reference.edm_loss_backward(grad, *args)
    )


@pytest.mark.parametrize("form", ["f_form", "c_out_only"])
def test_non_contiguous_inputs(device, form):
    """Strided rows, channels-last and transposed layouts give the bits of contiguous inputs."""
    out, x, target, c_skip, c_out, weight = make_inputs((10, 3, 7, 9), form, device=device)
    big = torch.randn(20, 3, 7, 9, device=device)
    big[::2] = out
    nc = (
        big[::2],  # row stride 2·D: a view, no copy
        None if x is None else x.transpose(2, 3).contiguous().transpose(2, 3),  # not mergeable
        target.to(memory_format=torch.channels_last),
        None if c_skip is None else torch.stack([c_skip, c_skip], 1)[:, 0],  # stride 2
        torch.stack([c_out, c_out], 1)[:, 1],
        weight.expand(2, -1)[1],
    )
    assert not nc[0].is_contiguous() and not nc[2].is_contiguous()
    args = (out, x, target, c_skip, c_out, weight)
    assert torch.equal(ops.edm_loss(*nc), ops.edm_loss(*args))
    grad = torch.rand(10, device=device).expand(2, -1)[0]
    assert torch.equal(
        ops.edm_loss_backward(grad, *nc), ops.edm_loss_backward(grad.contiguous(), *args)
    )
    # The stride-0 gradient of L.sum() is the usual caller.
    out_g = nc[0].clone().requires_grad_()
    ops.edm_loss(out_g, *nc[1:]).sum().backward()
    out_r = out.clone().requires_grad_()
    reference.edm_loss(out_r, *args[1:]).sum().backward()
    torch.testing.assert_close(out_g.grad, out_r.grad)


@pytest.mark.parametrize("form", ["f_form", "d_form"])
def test_gradcheck_fp64(device, form):
    out, *rest = make_inputs((3, 2, 3, 5), form, torch.float64, device)
    out.requires_grad_()
    assert torch.autograd.gradcheck(lambda o: torch.ops.mucs_fast.edm_loss(o, *rest), (out,))


def test_only_out_is_differentiable(device):
    out, x, target, c_skip, c_out, weight = make_inputs((2, 5), "f_form", device=device)
    with pytest.raises(RuntimeError, match="target requires grad"):
        ops.edm_loss(out, x, target.requires_grad_(), c_skip, c_out, weight)


@pytest.mark.parametrize("form", ["f_form", "d_form"])
def test_opcheck(device, form):
    out, *rest = make_inputs((3, 2, 5, 3), form, device=device)
    torch.library.opcheck(torch.ops.mucs_fast.edm_loss.default, (out.requires_grad_(), *rest))
    grad = torch.rand(3, device=device)
    torch.library.opcheck(
        torch.ops.mucs_fast.edm_loss_backward.default, (grad, out.detach(), *rest)
    )


def test_compile_fullgraph(device):
    out, *rest = make_inputs((4, 3, 5, 5), "f_form", device=device)

    def f(out, x, target, c_skip, c_out, weight):
        return ops.edm_loss(out, x, target, c_skip, c_out, weight).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    o1, o2 = out.clone().requires_grad_(), out.clone().requires_grad_()
    loss_c, loss_e = compiled(o1, *rest), f(o2, *rest)
    loss_c.backward()
    loss_e.backward()
    assert torch.equal(loss_c, loss_e) and torch.equal(o1.grad, o2.grad)


def _stacked(K, shape, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, *shape, generator=g).to(device)


def test_vmap_forward(device):
    """vmap over K stacked model outputs (shared data and σ) equals a loop, bit for bit."""
    K, shape = 3, (4, 3, 5, 5)
    out, x, target, c_skip, c_out, weight = make_inputs(shape, "f_form", device=device)
    outs = _stacked(K, shape, device)
    loop = torch.stack([ops.edm_loss(outs[k], x, target, c_skip, c_out, weight) for k in range(K)])
    shared = (None, None, None, None, None)
    assert torch.equal(
        torch.func.vmap(ops.edm_loss, in_dims=(0, *shared))(outs, x, target, c_skip, c_out, weight),
        loop,
    )
    # Vmapped dimension not in front, and batched targets/weights too.
    targets, weights = _stacked(K, shape, device, seed=2), torch.rand(K, shape[0], device=device)
    loop = torch.stack(
        [ops.edm_loss(outs[k], x, targets[k], c_skip, c_out, weights[k]) for k in range(K)]
    )
    vm = torch.func.vmap(ops.edm_loss, in_dims=(1, None, 0, None, None, 0))
    assert torch.equal(vm(outs.movedim(0, 1), x, targets, c_skip, c_out, weights), loop)


def test_vmap_autograd(device):
    """Plain autograd through a vmapped forward equals a loop (torch.func.grad of a torch.library
    op with register_autograd is not supported by torch itself, so the engine uses .backward())."""
    K, shape = 3, (4, 3, 5, 5)
    out, x, target, c_skip, c_out, weight = make_inputs(shape, "f_form", device=device)
    outs = _stacked(K, shape, device)
    scale = torch.arange(1.0, K + 1, device=device)[:, None]
    o = outs.clone().requires_grad_()
    vm = torch.func.vmap(ops.edm_loss, in_dims=(0, None, None, None, None, None))
    (vm(o, x, target, c_skip, c_out, weight) * scale).sum().backward()
    loop = []
    for k in range(K):
        ok = outs[k].clone().requires_grad_()
        (ops.edm_loss(ok, x, target, c_skip, c_out, weight) * scale[k]).sum().backward()
        loop.append(ok.grad)
    assert torch.equal(o.grad, torch.stack(loop))


def test_vmap_backward_op(device):
    K, shape = 3, (4, 3, 5, 5)
    out, x, target, c_skip, c_out, weight = make_inputs(shape, "f_form", device=device)
    outs, grads = _stacked(K, shape, device), torch.rand(K, shape[0], device=device)
    loop = torch.stack(
        [
            ops.edm_loss_backward(grads[k], outs[k], x, target, c_skip, c_out, weight)
            for k in range(K)
        ]
    )
    vm = torch.func.vmap(ops.edm_loss_backward, in_dims=(0, 0, None, None, None, None, None))
    assert torch.equal(vm(grads, outs, x, target, c_skip, c_out, weight), loop)
    vm = torch.func.vmap(ops.edm_loss_backward, in_dims=(None, 0, None, None, None, None, None))
    assert torch.equal(
        vm(grads[0], outs, x, target, c_skip, c_out, weight),
        torch.stack(
            [
                ops.edm_loss_backward(grads[0], outs[k], x, target, c_skip, c_out, weight)
                for k in range(K)
            ]
        ),
    )


def test_deterministic(device):
    """Two runs, and 1 vs 2 CPU threads, give the same bits."""
    args = make_inputs((96, 3, 32, 32), "f_form", device=device)
    grad = torch.rand(96, device=device)
    L, G = ops.edm_loss(*args), ops.edm_loss_backward(grad, *args)
    assert torch.equal(L, ops.edm_loss(*args)) and torch.equal(
        G, ops.edm_loss_backward(grad, *args)
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        L1, G1 = ops.edm_loss(*args), ops.edm_loss_backward(grad, *args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(L, L1) and torch.equal(G, G1)


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs an accelerator")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("form", ["f_form", "d_form"])
def test_same_bits_on_cpu_and_accelerator(form, dtype):
    """The CPU lanes and the GPU threads reduce in the same order (csrc/core/common.h)."""
    args = make_inputs((5, 3, 61, 67), form, dtype, "cpu")
    dev = _to_device(args, DEVICES[1])
    grad = torch.rand(5)
    assert torch.equal(ops.edm_loss(*args), ops.edm_loss(*dev).cpu())
    assert torch.equal(
        ops.edm_loss_backward(grad, *args), ops.edm_loss_backward(grad.to(DEVICES[1]), *dev).cpu()
    )


def _to_device(args, device):
    return tuple(None if a is None else a.to(device) for a in args)


def _bad_cases(device):
    out, x, target, c_skip, c_out, weight = make_inputs((3, 2, 4), "f_form", device=device)
    cases = {
        "target shape": ((out, x, target[:, :1], c_skip, c_out, weight), "target"),
        "x_noisy shape": ((out, x.reshape(3, 8), target, c_skip, c_out, weight), "x_noisy"),
        "weight length": ((out, x, target, c_skip, c_out, weight[:2]), "weight"),
        "c_out rank": ((out, x, target, c_skip, c_out[:, None], weight), "c_out"),
        "c_skip without x_noisy": ((out, None, target, c_skip, c_out, weight), "c_skip"),
        "integer out": ((out.long(), x, target, c_skip, c_out, weight), "out"),
        "integer weight": ((out, x, target, c_skip, c_out, weight.int()), "weight"),
        "0-d out": ((out[0, 0, 0], None, target[0, 0, 0], None, None, weight), "out"),
    }
    if device != "cpu":
        cases["weight on cpu"] = ((out, x, target, c_skip, c_out, weight.cpu()), "weight")
    return cases


BACKENDS = ["dispatcher", "reference_kernel", "fake"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_args_raise(device, backend, case):
    args, name = _bad_cases(device)[case]
    grad = torch.rand(3, device=device)
    forward = {
        "dispatcher": torch.ops.mucs_fast.edm_loss.default,
        "reference_kernel": edm_loss_module._edm_loss_default,
        "fake": torch.ops.mucs_fast.edm_loss.default,
    }[backend]
    backward = {
        "dispatcher": torch.ops.mucs_fast.edm_loss_backward.default,
        "reference_kernel": edm_loss_module._edm_loss_backward_default,
        "fake": torch.ops.mucs_fast.edm_loss_backward.default,
    }[backend]
    if backend == "fake":
        mode = FakeTensorMode()
        args = tuple(None if a is None else mode.from_tensor(a) for a in args)
        grad = mode.from_tensor(grad)
    else:
        mode = contextlib.nullcontext()
    with mode:
        with pytest.raises(RuntimeError, match=name):
            forward(*args)
        with pytest.raises(RuntimeError, match=name):
            backward(grad, *args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_grad_raises(device, backend):
    args = make_inputs((3, 4), "f_form", device=device)
    grad = torch.rand(4, device=device)
    fn = (
        edm_loss_module._edm_loss_backward_default
        if backend == "reference_kernel"
        else torch.ops.mucs_fast.edm_loss_backward.default
    )
    if backend == "fake":
        with FakeTensorMode() as mode:
            with pytest.raises(RuntimeError, match="grad"):
                fn(
                    mode.from_tensor(grad),
                    *(None if a is None else mode.from_tensor(a) for a in args),
                )
    else:
        with pytest.raises(RuntimeError, match="grad"):
            fn(grad, *args)


# Triton under the interpreter (CI) and both accelerator kernels (GPU): the CPU kernel's lanes and
# tree, so the same bits.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1), (2, 300)], ids=str)
def test_triton_interpreted(shape, form, dtype):
    args = make_inputs(shape, form, dtype)
    grad = torch.rand(shape[0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    forward, backward = interpreted_triton("edm_loss"), interpreted_triton("edm_loss_backward")
    assert torch.equal(forward(*args), ops.edm_loss(*args))
    assert torch.equal(backward(grad, *args), ops.edm_loss_backward(grad, *args))


def test_triton_interpreted_mixed_dtypes_and_strides():
    out, x, target, c_skip, c_out, weight = make_inputs(
        (3, 2, 5, 7), "f_form", torch.bfloat16, in_dtype=torch.float32
    )
    args = (
        out[::2],
        x[::2].transpose(2, 3).contiguous().transpose(2, 3),
        target[::2],
        c_skip[::2].double(),
        c_out[::2],
        weight[::2],
    )
    grad = torch.rand(2)
    assert torch.equal(interpreted_triton("edm_loss")(*args), ops.edm_loss(*args))
    assert torch.equal(
        interpreted_triton("edm_loss_backward")(grad, *args), ops.edm_loss_backward(grad, *args)
    )


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_gpu_kernels_match_cpu_bits(kernel, form, dtype):
    forward = gpu_kernel("edm_loss", kernel)
    backward = gpu_kernel("edm_loss_backward", kernel)
    args = make_inputs((5, 3, 61, 67), form, dtype)
    dev = _to_device(args, ACCELERATOR)
    grad = torch.rand(5, dtype=args[-1].dtype)
    assert torch.equal(forward(*dev).cpu(), ops.edm_loss(*args))
    assert torch.equal(
        backward(grad.to(ACCELERATOR), *dev).cpu(), ops.edm_loss_backward(grad, *args)
    )
    torch.testing.assert_close(
        forward(*dev).cpu(), reference.edm_loss(*args), **_tol(args[-1].dtype)
    )


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_kernels_mixed_dtypes_and_strides(kernel):
    forward = gpu_kernel("edm_loss", kernel)
    backward = gpu_kernel("edm_loss_backward", kernel)
    out, x, target, c_skip, c_out, weight = make_inputs(
        (6, 3, 9, 9), "f_form", torch.bfloat16, in_dtype=torch.float32
    )
    args = (
        out[::2],
        x[::2].transpose(2, 3).contiguous().transpose(2, 3),
        target[::2],
        c_skip[::2].double(),
        c_out[::2],
        weight[::2],
    )
    grad = torch.rand(3)
    dev = _to_device(args, ACCELERATOR)
    assert torch.equal(forward(*dev).cpu(), ops.edm_loss(*args))
    assert torch.equal(
        backward(grad.to(ACCELERATOR), *dev).cpu(), ops.edm_loss_backward(grad, *args)
    )


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_kernels_bad_args_raise(kernel):
    forward = gpu_kernel("edm_loss", kernel)
    backward = gpu_kernel("edm_loss_backward", kernel)
    grad = torch.rand(3, device=ACCELERATOR)
    for args, name in _bad_cases(ACCELERATOR).values():
        with pytest.raises(RuntimeError, match=name):
            forward(*args)
        with pytest.raises(RuntimeError, match=name):
            backward(grad, *args)
