"""Image metrics: SSIM against a per-window loop, closed-form values, the feature classifier."""

import math

import pytest
import torch

from mucs_fast.evaluate.metrics import (
    METRICS,
    compute_metrics,
    correlation,
    gaussian_window,
    neg_euclidean,
    neg_mae,
    pixel_cosine,
    ssim,
    train_feature_net,
)


def ssim_loop(x, y, L=1.0, size=7, sigma=1.5):
    """SSIM of one channel pair [H, W] window by window (the textbook definition)."""
    w = gaussian_window(size, sigma)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    H, W = x.shape
    vals = []
    for i in range(H - size + 1):
        for j in range(W - size + 1):
            a, b = x[i : i + size, j : j + size].double(), y[i : i + size, j : j + size].double()
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append(
                ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return torch.stack(vals).mean()


def test_gaussian_window_is_normalized_and_symmetric():
    w = gaussian_window(7, 1.5)
    assert w.shape == (7, 7)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))
    assert w[3, 3] == w.max()


def test_ssim_matches_window_loop_and_basic_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 10, 9, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = ssim(x, y)
    assert s.shape == (3,)
    for b in range(3):
        ref = torch.stack([ssim_loop(x[b, c], y[b, c]) for c in range(2)]).mean()
        assert abs(float(s[b]) - float(ref)) < 1e-6
    assert torch.allclose(ssim(x, x), torch.ones(3))
    assert torch.allclose(ssim(x, y), ssim(y, x))
    noisier = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ssim(x, noisier) < s).all()
    with pytest.raises(ValueError, match="smaller"):
        ssim(torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6))


def test_pixel_metrics_closed_form():
    x = torch.full((2, 1, 8, 8), -1.0)
    x[:, :, 2:6, 2:6] = 1.0
    y = x.clone()
    y[1] = -x[1]
    assert torch.allclose(pixel_cosine(x, y), torch.tensor([1.0, -1.0]))
    assert torch.allclose(correlation(x, y), torch.tensor([1.0, -1.0]), atol=1e-6)
    assert torch.allclose(
        neg_mae(x, y), torch.tensor([0.0, -1.0])
    )  # on [0, 1]: |u - v| = 1 everywhere
    assert torch.allclose(neg_euclidean(x, y), torch.tensor([0.0, -8.0]))  # sqrt(64 pixels * 1^2)
    over = x * 1.5  # values outside [-1, 1] are clipped first
    assert torch.allclose(neg_mae(x, over), torch.zeros(2))


def test_compute_metrics_identical_images_are_maximally_similar():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    m = compute_metrics(x, x.clone(), ("ssim", "cos", "neg_mae", "neg_euc", "correl"))
    for name, v in m.items():
        target = 0.0 if METRICS[name].distance else 1.0
        assert torch.allclose(v, torch.full((4,), target), atol=1e-5), name
    with pytest.raises(ValueError, match="feature classifier"):
        compute_metrics(x, x, ("feat",))
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(x, x, ("lpips",))


def test_feature_classifier_learns_and_gives_feature_cosine():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 2
    x = torch.full((60, 1, 8, 8), -0.8) + 0.1 * torch.randn(60, 1, 8, 8, generator=g)
    x[y == 1, :, :, 4:] += 1.4  # class 1: bright right half
    net, info = train_feature_net(x, y, steps=25, batch_size=32, lr=1e-2, width=4, seed=0)
    assert info["holdout_accuracy"] == 1.0
    m = compute_metrics(x[:4], x[:4].clone(), ("feat",), feature_net=net)["feat"]
    assert torch.allclose(m, torch.ones(4), atol=1e-5)
    across = compute_metrics(x[y == 0][:5], x[y == 1][:5], ("feat",), feature_net=net)["feat"]
    assert across.mean() < 0.99


@pytest.mark.parametrize("chw", [(1, 9, 7), (3, 16, 16), (1, 5, 5)])
def test_feature_net_any_image_size(chw):
    from mucs_fast.evaluate.metrics import FeatureNet

    net = FeatureNet(chw, classes=3, width=2, feat=8)
    assert net(torch.zeros(2, *chw)).shape == (2, 3) and net.features(
        torch.zeros(2, *chw)
    ).shape == (2, 8)
