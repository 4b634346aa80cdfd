"""Bench shapes of every op, in one place (names say where each shape comes from).

CPU runs the small set; an accelerator runs the large one as well (spec/PERFORMANCE.md).
"""

# edm_loss: out/x_noisy/target [B, C, H, W].
EDM_LOSS_CPU = {
    "digits_B100": (100, 1, 8, 8),  # the demo: sklearn digits, batch = num_noises = 100
    "cifar_B128": (128, 3, 32, 32),  # CIFAR-10 images, training batch 128
}
EDM_LOSS_GPU = {
    **EDM_LOSS_CPU,
    "dit_latent_B1024": (1024, 4, 32, 32),  # reference DiT latent (4×32×32), a scoring chunk
}

# skew_accumulate: loss_u [K, n, M] (loss_t [n, M]).
SKEW_ACCUMULATE_CPU = {
    "digits_K8": (8, 1797, 100),  # the demo: K = 8 targets, all 1797 digits, M = 100
}
SKEW_ACCUMULATE_GPU = {
    **SKEW_ACCUMULATE_CPU,
    "cifar_chunk_K16": (16, 8192, 100),  # CIFAR-10 scoring, K = 16 targets, a chunk of 8192 images
}

# noisy_inputs: x [n, C, H, W] under M noises (eps [M, C, H, W], shared by the images) → [M·n, ...].
NOISY_INPUTS_CPU = {
    "digits_n16_M100": ((16, 1, 16, 16), 100),  # the demo: 16×16×1 digits, n·M = 1600
}
NOISY_INPUTS_GPU = {
    **NOISY_INPUTS_CPU,
    "cifar_n64_M128": ((64, 3, 32, 32), 128),  # CIFAR-10 scoring chunk, n·M = 8192
}

# masked_adamw_step: K targets × P trainable weights, one flat [K, P] buffer per tensor.
MASKED_ADAMW_STEP_CPU = {
    "small_K1": (1, 262_144),  # a small DiT's trainable block-MLP weights
    "small_K16": (16, 262_144),
}
MASKED_ADAMW_STEP_GPU = {
    **MASKED_ADAMW_STEP_CPU,
    "cifar_dit_K1": (1, 56_623_104),  # CIFAR-10 reference DiT: 24 block-MLP matrices 768×3072
    "cifar_dit_K16": (16, 56_623_104),
}
