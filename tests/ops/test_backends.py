"""Which implementation serves each op: the fast kernels must be live, never silently absent."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mucs_fast import ops
from mucs_fast.ops import _backend

from .conftest import ACCELERATOR, INTERPRETED

OPS = ["edm_loss", "edm_loss_backward", "skew_accumulate", "noisy_inputs", "masked_adamw_step_"]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_backends_report_every_op_and_device():
    report = ops.backends()
    assert sorted(report) == sorted(OPS)
    for op in OPS:
        assert set(report[op]) >= {"cpu", "cuda"}
        assert set(report[op].values()) <= {"cpp", "cuda", "triton", "reference"}
    assert sorted(_backend.CUDA_KERNEL) == sorted(OPS)
    assert set(_backend.CUDA_KERNEL.values()) <= {"triton", "cuda"}


@pytest.mark.parametrize("op", OPS)
def test_cpp_cpu_backend_is_live(op):
    """A broken or missing build of mucs_fast._C fails here, not silently."""
    assert ops.extension_error() is None, ops.extension_error()
    assert ops.backends()[op]["cpu"] == "cpp"


@pytest.mark.skipif(ACCELERATOR is None, reason="needs an accelerator")
@pytest.mark.parametrize("op", OPS)
def test_accelerator_backend_is_live(op):
    """On a GPU: the kernel family the table picks serves the op (both are installed there)."""
    assert ops.backends()[op][ACCELERATOR] == _backend.CUDA_KERNEL[op], ops.extension_error()


@pytest.mark.skipif(ACCELERATOR is None or not torch.version.cuda, reason="needs a CUDA device")
@pytest.mark.parametrize("op", OPS)
def test_both_cuda_kernel_families_are_built(op):
    assert _backend.cuda_kernel(op) is not None, "mucs_fast._C was built without CUDA"
    assert _backend.triton_available()


@pytest.mark.skipif(not INTERPRETED, reason="Triton interpreter not in use")
@pytest.mark.parametrize("op", OPS)
def test_triton_kernels_run_under_the_interpreter(op):
    """CI has no GPU: the Triton kernels are live there as interpreted programs on CPU tensors."""
    x, w = torch.randn(2, 3), torch.rand(2)
    args = {
        "edm_loss": (x, None, x + 1, None, None, w),
        "edm_loss_backward": (w, x, None, x + 1, None, None, w),
        "skew_accumulate": (x.exp()[None], x.exp() + 1, 1e-3, True),
        "noisy_inputs": (x, x[:1] * 2, w[:1], w[:1], None),
    }.get(op)
    fn = _backend.triton_kernel(op)
    if op == "masked_adamw_step_":
        p, g, m, v = x.clone(), x.flip(0), torch.zeros_like(x), torch.zeros_like(x)
        state = (
            p.clone(),
            g,
            m.clone(),
            v.clone(),
            torch.tensor([1, 2]),
            torch.tensor([True, True]),
        )
        fn(*state, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        ref = (p.clone(), g, m.clone(), v.clone(), *state[4:])
        torch.ops.mucs_fast.masked_adamw_step_(*ref, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        assert torch.equal(state[0], ref[0]) and not torch.equal(state[0], p)
    else:
        assert torch.equal(fn(*args), getattr(torch.ops.mucs_fast, op)(*args))
    module = {"edm_loss_backward": "edm_loss", "masked_adamw_step_": "masked_adamw_step"}
    assert f"mucs_fast.kernels.{module.get(op, op)}" in sys.modules


def _run(code, **env):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_compile_to_ieee_ptx():
    """Every Triton kernel compiles for sm_90 (H100/H200) with this triton, without a GPU, and its
    PTX holds no fused multiply-add and no approximate division, square root or exponential: the
    rounding that makes Triton, CUDA C++ and CPU agree bit for bit."""
    _run(
        """
        import re
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from mucs_fast.kernels import masked_adamw_step, edm_loss, noisy_inputs, skew_accumulate

        def source(fn, types, constexprs):
            sig = {n: "constexpr" if n in constexprs else types.get(n, "i64") for n in fn.arg_names}
            return ASTSource(fn=fn, signature=sig, constexprs=constexprs)

        cases = []
        for acc, ty, TL in (("*fp32", "*bf16", tl.float32), ("*fp64", "*fp64", tl.float64)):
            edm = dict(loss_ptr=acc, grad_out_ptr=ty, grad_ptr=acc, out_ptr=ty, x_ptr=ty,
                       target_ptr=ty, c_skip_ptr=acc, c_out_ptr=acc, weight_ptr=acc)
            meta = dict(SKIP=True, HAS_C_OUT=True, ACC=TL)
            cases += [
                source(edm_loss._edm_loss_kernel, edm, dict(meta, LANES=256)),
                source(edm_loss._edm_loss_backward_kernel, edm, dict(meta, BLOCK=1024)),
                source(skew_accumulate._skew_accumulate_kernel,
                       dict(S_ptr=acc, u_ptr=ty, t_ptr=ty, eps="fp64"),
                       dict(RATIO=True, ACC=TL, ROWS=128)),
                source(noisy_inputs._noisy_inputs_kernel,
                       dict(out_ptr=ty, x_ptr=ty, eps_ptr="*fp32", a_ptr=acc, b_ptr=acc, c_ptr=acc),
                       dict(HAS_C=True, ACC=TL, BLOCK=1024)),
                source(masked_adamw_step._masked_adamw_step_kernel,
                       dict(p_ptr=acc, g_ptr=acc, m_ptr=acc, v_ptr=acc, step_ptr="*i64",
                            active_ptr="*u8", **{n: "fp64" for n in ("lr", "beta1", "beta2",
                            "decay", "one_m_b1", "one_m_b2", "eps")}),
                       dict(BLOCK=1024)),
            ]
        inexact = re.compile(r"\\b(fma|div\\.full|div\\.approx|sqrt\\.approx|rcp\\.approx)")
        for src in cases:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"enable_fp_fusion": False})
            hits = sorted(set(inexact.findall(k.asm["ptx"])))
            assert not hits, (src.fn.__name__, hits)
        """,
        TRITON_INTERPRET="0",
    )


def test_import_loads_nothing_compiled():
    _run("""
        import sys
        import torch
        import mucs_fast.ops
        assert "mucs_fast._C" not in sys.modules
        mucs_fast.ops.skew_accumulate  # attribute access is not a call
        assert "mucs_fast._C" not in sys.modules
        # CPU calls never import Triton (it is loaded on the first CUDA call only)
        x, s = torch.randn(2, 3), torch.ones(1)
        mucs_fast.ops.noisy_inputs(x, x[:1], s, s)
        assert "mucs_fast._C" in sys.modules
        assert "triton" not in sys.modules and "mucs_fast.kernels.noisy_inputs" not in sys.modules
    """)


def test_missing_extension_falls_back_to_reference():
    _run("""
        import sys
        import torch
        sys.modules["mucs_fast._C"] = None  # makes `import mucs_fast._C` fail
        from mucs_fast import ops, reference
        out, target, weight = torch.randn(3, 2, 5), torch.randn(3, 2, 5), torch.rand(3)
        assert torch.equal(ops.edm_loss(out, None, target, None, None, weight),
                           reference.edm_loss(out, None, target, None, None, weight))
        loss_u, loss_t = torch.rand(2, 3, 10), torch.rand(3, 10)
        S = ops.skew_accumulate(loss_u, loss_t)
        assert torch.equal(S, reference.skew_accumulate(loss_u, loss_t))
        x, eps, s = torch.randn(3, 4), torch.randn(2, 4), torch.rand(2)
        assert torch.equal(ops.noisy_inputs(x, eps, s, s, None),
                           reference.noisy_inputs(x, eps, s, s, None))
        p, g = torch.randn(2, 5), torch.randn(2, 5)
        state = [p.clone(), g, torch.zeros(2, 5), torch.zeros(2, 5)]
        ref = [p.clone(), g, torch.zeros(2, 5), torch.zeros(2, 5)]
        clock = (torch.tensor([1, 1]), torch.tensor([True, False]))
        ops.masked_adamw_step(*([t] for t in state), *clock, 1e-3, 0.9, 0.999, 1e-8, 0.0)
        reference.masked_adamw_step(*([t] for t in ref), *clock, 1e-3, 0.9, 0.999, 1e-8, 0.0)
        assert all(torch.equal(a, b) for a, b in zip(state, ref))
        assert "mucs_fast._C" in ops.extension_error(), ops.extension_error()
        assert all(b["cpu"] == "reference" for b in ops.backends().values()), ops.backends()
    """)
