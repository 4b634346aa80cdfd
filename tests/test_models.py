"""Our EDM DiT (reference names, zero-init output, vmap-safe) and the tiny diffusers builders."""

import pytest
import torch
from torch.func import functional_call, vmap

from mucs_fast.config import REFERENCE_FROZEN
from mucs_fast.models import DiT

try:
    from mucs_fast.params import trainable_names
except ImportError:  # the engine's helper is not there yet: the reference's substring rule

    def trainable_names(net, frozen):
        return [n for n, _ in net.named_parameters() if not any(p in n for p in frozen)]


SMALL = {
    "patch_size": 4,
    "width": 32,
    "depth": 2,
    "heads": 2,
    "mlp_ratio": 4,
    "cond_width": 32,
    "extra_tokens": 2,
}


def make(label_dim=10, image_size=(1, 16, 16), **kw):
    torch.manual_seed(0)
    return DiT(image_size, label_dim, **{**SMALL, **kw})


def randomize(net, std=0.1):
    """Non-zero weights everywhere (a fresh model's zero-init output would hide bugs)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def one_hot(ids, n=10):
    return torch.nn.functional.one_hot(torch.as_tensor(ids), n).float()


@pytest.mark.parametrize("label_dim", [0, 10])
def test_trainable_set_under_reference_frozen(label_dim):
    net = make(label_dim, depth=3)
    names = trainable_names(net, REFERENCE_FROZEN)
    expected = [f"dit_backbone.{i}.mlp.{j}.weight" for i in range(3) for j in (0, 3)]
    if label_dim:
        expected = ["y_embedder.emb_mlp.0.weight", "y_embedder.emb_mlp.3.weight"] + expected
    assert names == expected
    all_names = {n for n, _ in net.named_parameters()}
    for n in [
        "x_embedder.proj.weight",
        "pos_enc.extra",
        "s_embedder.mlp.0.weight",
        "a_embedder.emb.weight",
        "dit_backbone.0.attention.qkv.weight",
        "dit_backbone.0.attention.proj.weight",
        "dit_backbone.0.adapter.adapter.1.weight",
        "dit_final.adapter.adapter.1.weight",
        "unpatchify.proj.weight",
        "last.proj.weight",
    ]:
        assert n in all_names
    assert ("y_embedder.xdrop" in all_names) == bool(label_dim)


@pytest.mark.parametrize(
    "image_size,patch", [((1, 16, 16), 4), ((3, 10, 14), 4), ((2, 8, 8), (2, 4))]
)
def test_forward_shapes_and_attributes(image_size, patch):
    net = randomize(make(5, image_size, patch_size=patch))
    x = torch.randn(3, *image_size)
    D = net(x, torch.tensor([0.1, 1.0, 30.0]), y=one_hot([0, 4, 2], 5))
    assert D.shape == x.shape and D.dtype == torch.float32 and torch.isfinite(D).all()
    assert net(x, torch.ones(3)).shape == x.shape  # y=None: the learned "no label" vector
    assert (net.sigma_data, net.sigma_P_mean, net.sigma_P_std) == (0.5, -1.2, 1.2)
    assert net.cond_dim == 5 and net.unconditional is False
    assert make(0).unconditional is True and make(0).cond_dim == 0


def test_fresh_model_outputs_c_skip_x():
    net = make(10, sigma_data=0.5)
    x = torch.randn(4, 1, 16, 16)
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0])
    assert torch.equal(net.network(x, sigma.log() / 4, one_hot([1, 2, 3, 4])), torch.zeros_like(x))
    c_skip = (0.25 / (sigma**2 + 0.25)).view(-1, 1, 1, 1)
    torch.testing.assert_close(net(x, sigma, y=one_hot([1, 2, 3, 4])), c_skip * x)


def test_fresh_model_loss_is_one_on_sigma_data_scaled_data():
    from mucs_fast.denoisers import EDMDenoiser

    den = EDMDenoiser(make(0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 16, 16, generator=g)
    x = 0.5 * x / x.square().mean().sqrt()
    eps, sigma = den.training_noise(x.shape, generator=g)
    L = den.loss(x, eps, sigma)
    # F ≡ 0: E[L] = λ(σ)·σ²σ_d²/(σ² + σ_d²) = 1 for every σ (spec/MUCS.md)
    assert abs(L.mean().item() - 1) < 0.1


def test_args_rebuild_a_fresh_model():
    net = randomize(make(10))
    fresh = type(net)(*net.args)
    assert fresh.args == net.args
    assert [n for n, _ in fresh.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert torch.equal(fresh.last.proj.weight, torch.zeros_like(fresh.last.proj.weight))
    assert not torch.equal(fresh.dit_backbone[0].mlp[0].weight, net.dit_backbone[0].mlp[0].weight)


# CPU SDPA has no vmap batching rule yet: functorch loops over K (same cost), and says so.
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_over_stacked_trainable_weights_equals_separate_forwards():
    net = randomize(make(10)).eval()
    names = trainable_names(net, REFERENCE_FROZEN)
    base = dict(net.named_parameters())
    frozen = {n: p for n, p in base.items() if n not in names}
    g = torch.Generator().manual_seed(2)
    K = 3
    stacked = {
        n: torch.stack(
            [base[n].detach() + 0.05 * torch.randn(base[n].shape, generator=g) for _ in range(K)]
        )
        for n in names
    }
    x = torch.randn(5, 1, 16, 16, generator=g)
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0])
    y = one_hot([0, 1, 2, 3, 9])
    y[2] = 0  # one "no label" row

    def D(params, x, sigma, y):
        return functional_call(net, {**frozen, **params}, (x, sigma), {"y": y})

    with torch.no_grad():
        batched = vmap(D, in_dims=(0, None, None, None))(stacked, x, sigma, y)
        separate = torch.stack(
            [D({n: w[k] for n, w in stacked.items()}, x, sigma, y) for k in range(K)]
        )
        xb = x.expand(K, -1, -1, -1, -1) + 0.1 * torch.randn(K, *x.shape, generator=g)
        batched_x = vmap(D, in_dims=(0, 0, None, None))(stacked, xb, sigma, y)
        separate_x = torch.stack(
            [D({n: w[k] for n, w in stacked.items()}, xb[k], sigma, y) for k in range(K)]
        )
    assert batched.shape == (K, 5, 1, 16, 16)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched_x, separate_x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(separate[0], separate[1])

    # gradients through the vmapped call (what unlearning K targets together needs)
    grads = torch.func.grad(
        lambda p: vmap(D, in_dims=(0, None, None, None))(p, x, sigma, y).square().sum()
    )(stacked)
    assert set(grads) == set(names) and all(grads[n].shape == stacked[n].shape for n in names)


def test_bad_inputs_raise():
    net = make(10)
    with pytest.raises(ValueError, match="sigma"):
        net(torch.randn(2, 1, 16, 16), torch.ones(2, 1))
    with pytest.raises(ValueError, match="y must be"):
        net(torch.randn(2, 1, 16, 16), torch.ones(2), y=torch.zeros(2))
    with pytest.raises(ValueError, match="divisible"):
        DiT((1, 16, 16), 0, 4, 30, 1, 4)


def test_tiny_diffusers_models():
    pytest.importorskip("diffusers")
    from mucs_fast.denoisers import DiffusersDenoiser
    from mucs_fast.models import ddpm_scheduler, tiny_dit, tiny_unet

    sched = ddpm_scheduler(100)
    assert sched.config.num_train_timesteps == 100
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 70])
    for model, labels in [
        (tiny_unet(1, 8), None),
        (tiny_unet(1, 8, 10), torch.tensor([1, 9])),
        (tiny_dit(1, 8, 10), torch.tensor([0, 5])),
    ]:
        assert sum(p.numel() for p in model.parameters()) < 200_000
        assert model(x, t, class_labels=labels).sample.shape == x.shape
        den = DiffusersDenoiser(model, sched)
        assert den.conditional == (labels is not None)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_dit(1, 8, None)


def test_dit_forward_flops_counts_attention_that_the_flop_counter_misses():
    """MFU is held against DiT.forward_flops: torch's flop counter sees the linear layers and
    convolutions but not the fused attention (on CPU, as with flash/cuDNN SDPA on GPUs); the
    analytic count is the counter's plus QKᵀ and AV (2·T²·width each per block)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mucs_fast.models import DiT

    for cfg in [
        dict(
            image_size=(3, 8, 8),
            patch_size=2,
            width=32,
            depth=2,
            heads=2,
            cond_width=16,
            extra_tokens=4,
        ),
        dict(
            image_size=(1, 16, 16),
            label_dim=10,
            patch_size=4,
            width=64,
            depth=3,
            heads=4,
            cond_width=32,
        ),
    ]:
        net = DiT(**cfg).eval()
        x = torch.zeros(1, *cfg["image_size"])
        y = torch.zeros(1, cfg["label_dim"]) if cfg.get("label_dim") else None
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            net(x, torch.ones(1), y)
        T = net.x_embedder.grid_size[0] * net.x_embedder.grid_size[1] + cfg.get("extra_tokens", 0)
        attention = cfg["depth"] * 2 * (2 * T * T * cfg["width"])
        assert net.forward_flops() == fc.get_total_flops() + attention
