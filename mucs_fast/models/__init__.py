"""Models: our EDM DiT (reference layout and names) and tiny diffusers builders for tests."""

from .dit import DiT
from .unet import ddpm_scheduler, tiny_dit, tiny_unet

__all__ = ["DiT", "ddpm_scheduler", "tiny_dit", "tiny_unet"]
