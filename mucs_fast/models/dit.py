"""A small EDM-preconditioned DiT with the reference's module layout and parameter names.

D(x; σ, y) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), y)            (Karras et al. 2022)
c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ln(σ+1e-6)/4.

F is a DiT (Peebles & Xie 2023) with adaLN-Zero conditioning on c = s_embedder(c_noise) +
y_embedder(y) + a_embedder(a). Parameter names mirror the reference's `models/dit_edm.py` (without
its optional conv frontend), so `REFERENCE_FROZEN` leaves exactly the block-MLP weights — and the
label embedder's weights of conditional models — trainable. The adaLN adapters and the output
projection `last` start at zero: a fresh model has F ≡ 0, hence D = c_skip·x.

Written for `torch.func`: no in-place ops on inputs, no host syncs, no data-dependent control flow,
so the engine can `vmap` a `functional_call` over K stacked weight sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(u) for u in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {v!r}")
    return v


def sincos_2d(num_cha: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sine/cosine position code [gh·gw, num_cha]: first half encodes the row, second
    half the column; each half is [sin(p·ω_k), cos(p·ω_k)] with ω_k = 10000^(−k/(num_cha/4))."""
    if num_cha % 4:
        raise ValueError(f"sincos2d position code needs width divisible by 4, got {num_cha}")
    quarter = num_cha // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )

    def code(pos: Tensor) -> Tensor:
        ang = pos.reshape(-1, 1) * omega
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([code(rows), code(cols)], dim=1).float()


class PatchEmbedder(nn.Module):
    """[B, C, H, W] → [B, T, width] tokens; zero-pads H, W up to multiples of the patch."""

    def __init__(self, patch: tuple[int, int], image_size: Sequence[int], width: int):
        super().__init__()
        C, H, W = image_size
        self.pad_h, self.pad_w = -H % patch[0], -W % patch[1]
        self.grid_size = ((H + self.pad_h) // patch[0], (W + self.pad_w) // patch[1])
        self.proj = nn.Conv2d(C, width, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad_h or self.pad_w:
            x = F.pad(x, (0, self.pad_w, 0, self.pad_h))
        return self.proj(x).flatten(2).transpose(1, 2)


class PatchRecoverer(nn.Module):
    """[B, T, width] → [B, C, H, W] (transposed patch projection, padding cropped)."""

    def __init__(
        self,
        width: int,
        patch: tuple[int, int],
        grid_size: tuple[int, int],
        image_size: Sequence[int],
    ):
        super().__init__()
        self.grid_size = grid_size
        self.image_size = tuple(image_size)
        self.proj = nn.ConvTranspose2d(width, image_size[0], kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid_size)
        x = self.proj(x)
        return x[:, :, : self.image_size[1], : self.image_size[2]]


class PosEncoder(nn.Module):
    """Adds the fixed sincos code, then prepends `extra_tokens` learned register tokens."""

    def __init__(self, width: int, grid_size: tuple[int, int], extra_tokens: int = 0):
        super().__init__()
        self.register_buffer("emb", sincos_2d(width, grid_size)[None])
        self.extra = nn.Parameter(torch.zeros(extra_tokens, width)) if extra_tokens > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.emb
        if self.extra is not None:
            x = torch.cat([self.extra.expand(x.shape[0], -1, -1), x], dim=1)
        return x


class SigmaEmbedder(nn.Module):
    """c_noise [B] → [B, 1, cond_width]: Fourier features (frequencies 2π·(e^u − 1)/(e − 1),
    u ∈ (0, 1]) followed by an MLP."""

    def __init__(self, cond_width: int, num_fourier: int = 256):
        super().__init__()
        u = torch.linspace(0, 1, num_fourier // 2 + 1)[1:]
        self.register_buffer("freq", 2 * math.pi * (u.exp() - 1) / (math.e - 1))
        self.mlp = nn.Sequential(
            nn.Linear(num_fourier, cond_width), nn.SiLU(), nn.Linear(cond_width, cond_width)
        )

    def forward(self, c_noise: Tensor) -> Tensor:
        ang = c_noise[:, None] * self.freq
        return self.mlp(torch.cat([ang.sin(), ang.cos()], dim=-1))[:, None]


class VectorEmbedder(nn.Module):
    """Label vectors y [B, label_dim] → [B, 1, cond_width]. An all-zero y (no label) is replaced
    by the learned null vector `xdrop` (classifier-free style). Unconditional: no parameters,
    contributes 0."""

    def __init__(self, label_dim: int, cond_width: int, unconditional: bool, eps: float = 1e-8):
        super().__init__()
        self.unconditional = unconditional
        self.eps = eps
        if not unconditional:
            self.xdrop = nn.Parameter(torch.zeros(label_dim))
            self.emb_mlp = nn.Sequential(
                nn.Linear(label_dim, cond_width),
                nn.SiLU(),
                nn.Dropout(0.0),
                nn.Linear(cond_width, cond_width),
            )

    def forward(self, y: Tensor):
        if self.unconditional:
            return 0
        empty = y.square().sum(-1, keepdim=True) < self.eps
        y = torch.where(empty, self.xdrop.to(y.dtype), y)
        return self.emb_mlp(y)[:, None]


class LabelEmbedder(nn.Module):
    """Integer labels a [B] (the reference's augmentation flag) → [B, 1, cond_width]."""

    def __init__(self, num_classes: int, cond_width: int):
        super().__init__()
        self.emb = nn.Embedding(num_classes, cond_width)

    def forward(self, a: Tensor) -> Tensor:
        return self.emb(a)[:, None]


class ConditionAdapter(nn.Module):
    """adaLN modulation: c → `expand` vectors of `width`, zero-initialized (adaLN-Zero)."""

    def __init__(self, cond_width: int, width: int, expand: int):
        super().__init__()
        self.adapter = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, expand * width))
        nn.init.zeros_(self.adapter[1].weight)
        nn.init.zeros_(self.adapter[1].bias)

    def forward(self, c: Tensor) -> Tensor:
        return self.adapter(c)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, W = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, W))


class DiTBlock(nn.Module):
    """x += g1·Attn(mod(LN(x); s1, b1)); x += g2·MLP(mod(LN(x); s2, b2)), mod(h; s, b) = (1+s)·h +
    b."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cond_width: int):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attention = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(0.0),
            nn.Linear(hidden, width),
        )
        self.adapter = ConditionAdapter(cond_width, width, expand=6)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        g1, s1, b1, g2, s2, b2 = self.adapter(c).chunk(6, dim=-1)
        x = x + g1 * self.attention((1 + s1) * self.norm1(x) + b1)
        return x + g2 * self.mlp((1 + s2) * self.norm2(x) + b2)


class DiTFinal(nn.Module):
    def __init__(self, width: int, cond_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adapter = ConditionAdapter(cond_width, width, expand=2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s, b = self.adapter(c).chunk(2, dim=-1)
        return (1 + s) * self.norm(x) + b


class ChannelLinear(nn.Module):
    """A bias-free linear map over the channel dimension of [B, C, H, W]."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.proj = nn.Linear(c_in, c_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.transpose(1, -1)).transpose(1, -1)


class DiT(nn.Module):
    """EDM-preconditioned DiT, called like the reference: `net(x_noisy, sigma [B], y=None, a=None)`.

    image_size: (C, H, W). label_dim: 0 for unconditional, else the width of the label vectors y
    (one-hot class ids; an all-zero row means "no label"). patch_size: int or (ph, pw).
    width / depth / heads / mlp_ratio: the transformer; cond_width: adaLN conditioning width;
    extra_tokens: learned register tokens prepended to the patch tokens.
    sigma_data, P_mean, P_std: EDM σ_d and the log-normal training σ distribution.

    The defaults are the demo model for 16×16 digits (patch 4 → 16 tokens, 334 k parameters with
    10 classes): small enough to train to recognizable class-conditional samples on 2 CPU cores
    (times: BENCHMARKS.md). The reference CIFAR-10 DiT is patch 2, width
    768, depth 12, heads 12, cond_width 256, extra_tokens 32 (behind a conv frontend not built
    here).

    `args` holds the constructor arguments as plain Python values: `type(net)(*net.args)` builds a
    fresh, untrained copy (used for loss_null="auto" and by checkpoints).
    """

    def __init__(
        self,
        image_size: Sequence[int] = (1, 16, 16),
        label_dim: int = 0,
        patch_size: int | Sequence[int] = 4,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4,
        cond_width: int = 64,
        extra_tokens: int = 0,
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
    ):
        super().__init__()
        image_size = tuple(int(v) for v in image_size)
        if len(image_size) != 3:
            raise ValueError(f"DiT: image_size must be (C, H, W), got {image_size!r}")
        patch = _pair(patch_size)
        self.args = (
            image_size,
            int(label_dim),
            patch if patch[0] != patch[1] else patch[0],
            int(width),
            int(depth),
            int(heads),
            float(mlp_ratio),
            int(cond_width),
            int(extra_tokens),
            float(sigma_data),
            float(P_mean),
            float(P_std),
        )
        self.image_size = image_size
        self.cond_dim = int(label_dim)
        self.unconditional = self.cond_dim == 0
        self.extra_tokens = int(extra_tokens)
        self.sigma_data = float(sigma_data)
        self.sigma_P_mean, self.sigma_P_std = float(P_mean), float(P_std)

        self.last = ChannelLinear(image_size[0], image_size[0])
        nn.init.zeros_(self.last.proj.weight)
        self.x_embedder = PatchEmbedder(patch, image_size, width)
        self.pos_enc = PosEncoder(width, self.x_embedder.grid_size, extra_tokens)
        self.s_embedder = SigmaEmbedder(cond_width)
        self.y_embedder = VectorEmbedder(max(self.cond_dim, 1), cond_width, self.unconditional)
        self.a_embedder = LabelEmbedder(2, cond_width)
        self.dit_backbone = nn.ModuleList(
            DiTBlock(width, heads, mlp_ratio, cond_width) for _ in range(depth)
        )
        self.dit_final = DiTFinal(width, cond_width)
        self.unpatchify = PatchRecoverer(width, patch, self.x_embedder.grid_size, image_size)

    def forward_flops(self) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward of one image, attention (QKᵀ and AV)
        included — the analytic count MFU is held against (a FLOP counter can miss fused attention
        kernels). Elementwise work (norms, modulation, activations) is not counted."""
        C, H, W = self.image_size
        ph, pw = _pair(self.args[2])
        (gh, gw), w = self.x_embedder.grid_size, self.args[3]
        tp = gh * gw
        T, cw, h = tp + self.extra_tokens, self.args[7], int(w * self.args[6])
        lin = lambda a, b, rows=1: 2 * rows * a * b  # noqa: E731 — [rows, a] @ [a, b]
        f = lin(self.s_embedder.mlp[0].in_features, cw) + lin(cw, cw)
        if not self.unconditional:
            f += lin(self.cond_dim, cw) + lin(cw, cw)
        f += lin(C * ph * pw, w, tp)  # patch embedding
        per_block = (
            lin(cw, 6 * w)
            + lin(w, 3 * w, T)
            + 2 * (2 * T * T * w)
            + lin(w, w, T)
            + lin(w, h, T)
            + lin(h, w, T)
        )
        f += len(self.dit_backbone) * per_block
        f += (
            lin(cw, 2 * w) + lin(w, C * ph * pw, tp) + lin(C, C, H * W)
        )  # final adaLN, unpatchify, last
        return int(f)

    def forward(
        self, x: Tensor, sigma: Tensor, y: Tensor | None = None, a: Tensor | None = None
    ) -> Tensor:
        if sigma.ndim != 1:
            raise ValueError(f"DiT: sigma must be [B], got shape {tuple(sigma.shape)}")
        sd = self.sigma_data
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + s**2).sqrt()
        c_noise = (s + 1e-6).log().reshape(-1) / 4
        return c_skip * x + c_out * self.network(c_in * x, c_noise, y, a)

    def network(
        self, x: Tensor, c_noise: Tensor, y: Tensor | None = None, a: Tensor | None = None
    ) -> Tensor:
        """F(c_in·x, c_noise, y): the raw network output [B, C, H, W]."""
        B = x.shape[0]
        if y is None:
            y = x.new_zeros(B, max(self.cond_dim, 1))
        elif y.ndim != 2:
            raise ValueError(f"DiT: y must be [B, label_dim], got shape {tuple(y.shape)}")
        if a is None:
            a = torch.zeros(B, dtype=torch.long, device=x.device)
        c = self.s_embedder(c_noise) + self.y_embedder(y.to(x.dtype)) + self.a_embedder(a)
        h = self.pos_enc(self.x_embedder(x))
        for block in self.dit_backbone:
            h = block(h, c)
        h = self.dit_final(h, c)[:, self.extra_tokens :]
        return self.last(self.unpatchify(h))
