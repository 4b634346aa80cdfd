"""train() (determinism, EMA, both denoiser kinds), checkpoints, and the per-image-seeded
samplers."""

import math
import pickle

import pytest
import torch

from mucs_fast.denoisers import DiffusersDenoiser, EDMDenoiser
from mucs_fast.models import DiT
from mucs_fast.sample import sample_edm, sample_vp
from mucs_fast.train import load_checkpoint, save_checkpoint, train

TINY = {"patch_size": 4, "width": 16, "depth": 1, "heads": 2, "cond_width": 16}


def tiny_edm(label_dim=3, seed=0):
    torch.manual_seed(seed)
    return EDMDenoiser(DiT((1, 8, 8), label_dim, **TINY))


def toy_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1), torch.arange(n) % 3


def test_train_edm_returns_ema_copy_and_is_deterministic():
    x, y = toy_data()
    den = tiny_edm()
    before = {k: v.clone() for k, v in den.net.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    out1, info = train(den, x, y, steps=6, batch_size=8, lr=1e-3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert isinstance(out1, EDMDenoiser) and out1.net is not den.net
    assert out1.train_lr == 1e-3 and out1.conditional and out1.label_dim == 3
    assert not out1.net.training
    assert (
        len(info["loss"]) == 6
        and all(math.isfinite(v) for v in info["loss"])
        and info["batch_size"] == 8
    )
    # the trained net moved, and the EMA differs from it
    assert any(not torch.equal(before[k], v) for k, v in den.net.state_dict().items())
    assert any(
        not torch.equal(den.net.state_dict()[k], v) for k, v in out1.net.state_dict().items()
    )

    out2, info2 = train(tiny_edm(), x, y, steps=6, batch_size=8, lr=1e-3, progress=False)
    assert info2["loss"] == info["loss"]
    for k, v in out1.net.state_dict().items():
        assert torch.equal(v, out2.net.state_dict()[k]), k
    _out3, info3 = train(tiny_edm(), x, y, steps=6, batch_size=8, lr=1e-3, seed=1, progress=False)
    assert info3["loss"] != info["loss"]
    if hasattr(den, "raw"):  # the D-form and the raw F-form of the loss train the same model
        den_d = tiny_edm()
        den_d = EDMDenoiser(den_d.net, raw=False)
        out4, info4 = train(den_d, x, y, steps=6, batch_size=8, lr=1e-3, progress=False)
        assert out4.raw is False
        torch.testing.assert_close(torch.tensor(info4["loss"]), torch.tensor(info["loss"]))


def test_train_reduces_loss():
    x, y = toy_data(48)
    x = torch.zeros_like(x) - 0.8  # a trivially learnable data set
    _, info = train(tiny_edm(), x, y, steps=60, batch_size=16, lr=3e-3, warmup=5, progress=False)
    L = info["loss"]
    assert sum(L[-10:]) / 10 < 0.5 * sum(L[:10]) / 10


def test_train_needs_labels_for_conditional_models():
    x, _ = toy_data()
    with pytest.raises(ValueError, match="labels"):
        train(tiny_edm(), x, None, steps=1, progress=False)


def test_train_diffusers_denoiser():
    pytest.importorskip("diffusers")
    from mucs_fast.models import ddpm_scheduler, tiny_unet

    x, y = toy_data(16)
    torch.manual_seed(0)
    den = DiffusersDenoiser(tiny_unet(1, 8, 3), ddpm_scheduler(50))
    out, info = train(
        den, x, torch.nn.functional.one_hot(y, 3), steps=3, batch_size=8, lr=2e-4, progress=False
    )
    assert isinstance(out, DiffusersDenoiser) and out.train_lr == 2e-4 and out.label_dim == 3
    assert out.scheduler is den.scheduler and len(info["loss"]) == 3
    imgs = sample_vp(out, [5, 6], labels=torch.tensor([0, 2]), num_steps=4, progress=False)
    assert imgs.shape == (2, 1, 8, 8) and torch.isfinite(imgs).all()


def test_checkpoint_roundtrip(tmp_path):
    x, y = toy_data()
    den, _ = train(tiny_edm(), x, y, steps=2, batch_size=8, lr=5e-4, progress=False)
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, den, extra={"note": "digits", "n": 3, "loss": [1.0, 0.5]})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["train_lr"] == 5e-4
    loaded, extra = load_checkpoint(path, with_extra=True)
    assert extra == {"note": "digits", "n": 3, "loss": [1.0, 0.5]}
    assert loaded.train_lr == 5e-4 and loaded.conditional and loaded.net.args == den.net.args
    assert (loaded.sigma_data, loaded.P_mean, loaded.P_std) == (0.5, -1.2, 1.2)
    for k, v in den.net.state_dict().items():
        assert torch.equal(v, loaded.net.state_dict()[k])
    xs, s = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    yy = torch.eye(3)[:2]
    torch.testing.assert_close(loaded.net(xs, s, y=yy), den.net(xs, s, y=yy), rtol=0, atol=0)
    with pytest.raises(TypeError, match="extra"):
        save_checkpoint(tmp_path / "bad.pt", den, extra={"obj": object()})
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_sample_edm_per_image_seeds():
    den = tiny_edm()
    with torch.no_grad():
        for p in den.net.parameters():
            p.normal_(0, 0.05)
    labels = torch.tensor([0, 1, 2, 0, 1])
    a = sample_edm(
        den, [10, 11, 12, 13, 14], labels=labels, num_steps=5, batch_size=5, progress=False
    )
    b = sample_edm(den, [12, 13, 14], labels=labels[2:], num_steps=5, batch_size=2, progress=False)
    c = sample_edm(den, [12], labels=labels[2:3], num_steps=5, progress=False)
    assert a.shape == (5, 1, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a[2:], b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[2:3], c, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], a[3])  # same label, different seeds
    torch.testing.assert_close(
        sample_edm(den, 2, labels=labels[:2], num_steps=5, progress=False),
        sample_edm(den, [0, 1], labels=labels[:2], num_steps=5, progress=False),
    )


def test_sample_edm_gaussian_data_closed_form():
    """With the exact denoiser of N(μ, σ_d²) data the probability-flow ODE is linear:
    x(σ) − μ ∝ √(σ² + σ_d²). Heun must follow it from x(σ_max) = σ_max·ε_i (per-image seeds)."""

    class Gaussian(torch.nn.Module):
        image_size = (1, 4, 4)

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, sigma, y=None):
            s = sigma.view(-1, 1, 1, 1)
            return 0.3 + (x - 0.3) * 0.25 / (s**2 + 0.25)

    seeds = [7, 100, 3]
    eps = torch.stack(
        [torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    exact = 0.3 + (80 * eps - 0.3) * 0.5 / (80**2 + 0.25) ** 0.5
    for steps, tol in [(32, 0.03), (128, 0.003)]:  # Heun's error shrinks with the step count
        x = sample_edm(EDMDenoiser(Gaussian()), seeds, num_steps=steps, progress=False)
        assert ((x - exact).abs().max() / exact.abs().max()).item() < tol


def test_sample_vp_per_image_seeds_with_noise():
    pytest.importorskip("diffusers")
    from mucs_fast.models import ddpm_scheduler, tiny_unet

    torch.manual_seed(0)
    den = DiffusersDenoiser(tiny_unet(1, 8), ddpm_scheduler(20))
    a = sample_vp(den, [3, 4, 5], num_steps=5, eta=1.0, batch_size=3, progress=False)
    b = sample_vp(den, [5], num_steps=5, eta=1.0, progress=False)
    torch.testing.assert_close(a[2:], b, rtol=1e-4, atol=1e-4)
    assert a.abs().max() <= 1 + 1e-5 or not den.scheduler.config.clip_sample
    with pytest.raises(ValueError, match="num_steps"):
        sample_vp(den, 1, num_steps=21, progress=False)
