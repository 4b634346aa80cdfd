"""Ops (placeholder until the torch.library registration lands): the plain-PyTorch references."""

from ..reference import edm_loss, skew_accumulate

__all__ = ["edm_loss", "skew_accumulate"]
