"""Tiny diffusers models for tests and benches (a few ten thousand parameters, CPU-friendly).

diffusers is an optional dependency: it is imported when a helper is called, not at import time.
"""

from __future__ import annotations


def tiny_unet(C: int, H: int, num_classes: int | None = None):
    """A 2-level `UNet2DModel` (16/32 channels, one resnet per level, self-attention at the low
    resolution, diffusers' default mid block) for C×H×H images; class-conditional through
    `num_class_embeds` when num_classes is given. The attention + mid-block layout is the one in
    which vmap over stacked weights meets diffusers' GroupNorm (mucs_fast.functional.vmap_safe)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=H,
        in_channels=C,
        out_channels=C,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=num_classes,
    )


def tiny_dit(C: int, H: int, num_classes: int):
    """A 2-layer `DiTTransformer2DModel` (2 heads × 16, patch 2) for C×H×H images, conditioned on
    `num_classes` class ids through adaLN-Zero (diffusers' DiT always takes class labels)."""
    from diffusers import DiTTransformer2DModel

    if not num_classes:
        raise ValueError("tiny_dit: diffusers' DiT is class-conditional; pass num_classes >= 1")
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=C,
        out_channels=C,
        num_layers=2,
        sample_size=H,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )


def ddpm_scheduler(T: int = 1000):
    """The standard DDPM scheduler (linear β from 1e-4 to 0.02, ε-prediction) with T steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T)
