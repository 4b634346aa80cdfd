"""Plain-PyTorch references of every op: the default implementation and the ground truth of
tests."""

from .bounded_adamw_step import bounded_adamw_step
from .edm_loss import edm_loss, edm_loss_backward
from .noisy_inputs import noisy_inputs
from .skew_accumulate import skew_accumulate

__all__ = [
    "bounded_adamw_step",
    "edm_loss",
    "edm_loss_backward",
    "noisy_inputs",
    "skew_accumulate",
]
