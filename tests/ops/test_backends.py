"""Which implementation serves each op: the compiled kernels must be live, never silently absent."""

import os
import subprocess
import sys
import textwrap

import pytest

from mucs_fast import ops

from .conftest import DEVICES

OPS = ["edm_loss", "edm_loss_backward", "skew_accumulate"]


def test_backends_report_every_op_and_device():
    report = ops.backends()
    assert sorted(report) == sorted(OPS)
    for op in OPS:
        assert set(report[op]) >= {"cpu", "cuda"}
        assert set(report[op].values()) <= {"cpp", "cuda", "triton", "reference"}


@pytest.mark.parametrize("op", OPS)
def test_cpp_cpu_backend_is_live(op):
    """A broken or missing build of mucs_fast._C fails here, not silently."""
    assert ops.extension_error() is None, ops.extension_error()
    assert ops.backends()[op]["cpu"] == "cpp"


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs an accelerator")
@pytest.mark.parametrize("op", OPS)
def test_accelerator_backend_is_live(op):
    assert ops.backends()[op][DEVICES[1]] != "reference", ops.extension_error()


def _run(code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_import_loads_nothing_compiled():
    _run("""
        import sys
        import mucs_fast.ops
        assert "mucs_fast._C" not in sys.modules
        mucs_fast.ops.skew_accumulate  # attribute access is not a call
        assert "mucs_fast._C" not in sys.modules
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
        assert "mucs_fast._C" in ops.extension_error(), ops.extension_error()
        assert all(b["cpu"] == "reference" for b in ops.backends().values()), ops.backends()
    """)
