"""The mucs_fast ops (torch.library, namespace mucs_fast): one module per op.

Each op's default implementation is its plain-PyTorch reference (mucs_fast.reference), on every
device; faster kernels (mucs_fast._C: C++ CPU and CUDA; mucs_fast.kernels: Triton) override it per
device once loaded, which happens on the first call of a function of this module (or `load()`);
torch.ops.mucs_fast.* calls reach them from then on. `backends()` says what serves each op,
`extension_error()` why the compiled module is absent, if it is.
"""

from ._backend import backends, extension_error, load
from .edm_loss import edm_loss, edm_loss_backward
from .masked_adamw_step import masked_adamw_step
from .noisy_inputs import noisy_inputs
from .skew_accumulate import skew_accumulate

__all__ = [
    "masked_adamw_step",
    "edm_loss",
    "edm_loss_backward",
    "noisy_inputs",
    "skew_accumulate",
    "backends",
    "extension_error",
    "load",
]
