"""Tiny networks for engine tests (CI has 2 cores): reference call signature and naming."""

import torch


class TinyEDMNet(torch.nn.Module):
    """EDM-preconditioned per-pixel MLP, called like the reference: net(x_noisy, sigma, y=None,
    a=None) → D.

    Parameter names follow the reference DiT where it matters for REFERENCE_FROZEN: the block MLP
    (`dit_backbone.0.mlp.*`) is trainable, the embedders and `last.` are frozen.
    """

    def __init__(self, C=1, label_dim=0, width=16, sigma_data=0.5, zero_out=False):
        super().__init__()
        self.args = (C, label_dim, width, sigma_data, zero_out)
        self.sigma_data, self.sigma_P_mean, self.sigma_P_std = sigma_data, -1.2, 1.2
        self.unconditional = label_dim == 0
        self.cond_dim = label_dim
        self.x_embedder = torch.nn.Linear(C, width)
        self.s_embedder = torch.nn.Linear(1, width)
        self.y_embedder = torch.nn.Linear(max(label_dim, 1), width, bias=False)
        self.dit_backbone = torch.nn.ModuleList([torch.nn.Module()])
        self.dit_backbone[0].mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width)
        )
        self.last = torch.nn.Linear(width, C)
        if zero_out:
            torch.nn.init.zeros_(self.last.weight)
            torch.nn.init.zeros_(self.last.bias)

    def forward(self, x, sigma, y=None, a=None):
        sd = self.sigma_data
        s = sigma.view(-1, 1, 1, 1)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + s**2).sqrt()
        c_noise = (1e-6 + s).log() / 4
        return c_skip * x + c_out * self._raw(c_in * x, c_noise, y)

    def _raw(self, x_in, c_noise, y=None, a=None):
        """F(c_in·x, c_noise, y) [B, C, H, W]."""
        h = self.x_embedder(x_in.permute(0, 2, 3, 1))  # [B, H, W, width]
        h = h + self.s_embedder(c_noise.reshape(-1, 1)).view(-1, 1, 1, h.shape[-1])
        if not self.unconditional:
            h = h + self.y_embedder(y).view(-1, 1, 1, h.shape[-1])
        h = h + self.dit_backbone[0].mlp(h)
        return self.last(h).permute(0, 3, 1, 2)


class TinyRawEDMNet(TinyEDMNet):
    """TinyEDMNet that also exposes its raw F as `network(c_in·x, c_noise, y)`, like mucs_fast's
    DiT: EDMDenoiser then evaluates F directly (the raw path) and K-stacked copies call a method."""

    def network(self, x_in, c_noise, y=None, a=None):
        return self._raw(x_in, c_noise, y, a)


def trained_digits_dit(n_images: int, steps: int = 200):
    """(EDMDenoiser, images): a 2-block DiT briefly trained (200 steps) on the first `n_images`
    sklearn digits at 8×8 — a model that has learned its data, for tests that need real scores."""
    import mucs_fast as mf
    from mucs_fast.data import load_digits
    from mucs_fast.models import DiT
    from mucs_fast.train import train

    x, _ = load_digits(size=8)
    x = x[:n_images]
    torch.manual_seed(0)
    net = DiT((1, 8, 8), label_dim=0, patch_size=2, width=32, depth=2, heads=2, cond_width=16)
    den, info = train(
        mf.EDMDenoiser(net), x, steps=steps, batch_size=32, lr=3e-3, warmup=20, progress=False
    )
    return den, x, info


def inference_losses(den, net, x, y, bank, *, images_per_forward, precision="auto", compile=False):
    """L [N, M] float32 of one model `net` under the bank: a one-model LossPass over resident x."""
    from mucs_fast.data import TensorSource
    from mucs_fast.score import LossPass, original_losses

    lp = LossPass(
        den,
        net,
        [],
        bank,
        images_per_forward=images_per_forward,
        precision=precision,
        compile=compile,
    )
    return original_losses(lp, TensorSource(x), y, torch.arange(x.shape[0]))


def replicated(net, names, K):
    """A StackedNet of K copies of net's current values of `names` (fresh tensors, no grad)."""
    from mucs_fast.functional import StackedNet

    params = dict(net.named_parameters())
    w = {
        n: params[n].detach().unsqueeze(0).repeat(K, *([1] * params[n].dim())).contiguous()
        for n in names
    }
    return StackedNet(net, w)


def standalone(stack, k):
    """Copy k of a StackedNet as a module of its own (a deep copy of the net with k's weights)."""
    import copy

    m = copy.deepcopy(stack.net)
    with torch.no_grad():
        p = dict(m.named_parameters())
        for n in stack.names:
            p[n].copy_(stack.weights[n][k])
    return m
