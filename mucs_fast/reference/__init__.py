"""Plain-PyTorch references of every op: the default implementation and the ground truth of
tests."""

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
]
