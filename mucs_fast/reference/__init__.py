"""Plain-PyTorch references of every op: the default implementation and the ground truth of tests."""

from .edm_loss import edm_loss, edm_loss_backward
from .skew_accumulate import skew_accumulate

__all__ = ["edm_loss", "edm_loss_backward", "skew_accumulate"]
