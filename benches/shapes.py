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
