"""pointwise_view: 1×1 stride-1 convolutions as channel matmuls — same parameters (shared, same
names), same values up to rounding, gradients and vmap through functional_call, the caller's
module untouched; the drop-in's engine runs it on the CPU (pointwise="auto")."""

import pytest
import torch
from nets import TinyEDMNet
from refkit import FakeFabric, TensorDataset, Wrapped, make_conf, toy_data

from mucs_fast.compat.pointwise import PointwiseConv2d, PointwiseConvTranspose2d, pointwise_view
from mucs_fast.compat.reference import Attributor


class Sub(torch.nn.Conv2d):  # a subclass may override forward: never swapped
    pass


class ConvEDMNet(TinyEDMNet):
    """TinyEDMNet behind a 1×1 conv encoder and a 1×1 ConvTranspose2d decoder (like the
    reference DiT's frontend blocks), with a 3×3 conv and a subclassed 1×1 conv left alone."""

    def __init__(self, C=2, label_dim=3, width=8):
        super().__init__(C=C, label_dim=label_dim, width=width)
        self.encoder = torch.nn.Sequential(
            torch.nn.Conv2d(C, 3, 1), torch.nn.Conv2d(3, C, 3, padding=1)
        )
        self.decoder = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(C, 4, 1), Sub(4, C, 1, bias=False)
        )

    def _raw(self, x_in, c_noise, y=None, a=None):
        return self.decoder(super()._raw(self.encoder(x_in), c_noise, y, a))


def _inputs(n=6, C=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, 4, 4, generator=g)
    return x, torch.rand(n, generator=g) * 3 + 0.1, torch.eye(3)[torch.arange(n) % 3]


def test_view_shares_parameters_and_matches():
    torch.manual_seed(0)
    net = ConvEDMNet()
    view, n = pointwise_view(net)
    assert n == 2
    assert [type(m) for m in view.encoder] == [PointwiseConv2d, torch.nn.Conv2d]
    assert [type(m) for m in view.decoder] == [PointwiseConvTranspose2d, Sub]
    assert [type(m) for m in net.encoder] == [torch.nn.Conv2d, torch.nn.Conv2d]  # caller's: as is
    assert type(net.decoder[0]) is torch.nn.ConvTranspose2d
    pv, pn = dict(view.named_parameters()), dict(net.named_parameters())
    assert pv.keys() == pn.keys() and all(pv[k] is pn[k] for k in pn)
    x, s, y = _inputs()
    torch.testing.assert_close(view(x, s, y=y), net(x, s, y=y), rtol=1e-6, atol=1e-6)
    with pytest.raises(AssertionError):  # the comparison can fail: a changed weight shows
        w = {**pn, "encoder.0.weight": pn["encoder.0.weight"] * 1.01}
        out = torch.func.functional_call(view, w, (x, s), {"y": y})
        torch.testing.assert_close(out, net(x, s, y=y), rtol=1e-6, atol=1e-6)


def test_view_gradients_and_vmap():
    torch.manual_seed(1)
    net = ConvEDMNet()
    view, _ = pointwise_view(net)
    x, s, y = _inputs()
    names = ["encoder.0.weight", "decoder.0.weight", "dit_backbone.0.mlp.0.weight"]
    params = dict(net.named_parameters())
    w = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    grads = []
    for m in (net, view):
        out = torch.func.functional_call(m, w, (x, s), {"y": y})
        grads.append(torch.autograd.grad(out.pow(2).sum(), list(w.values())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    stacked = {n: torch.stack([params[n].detach(), params[n].detach() * 0.9]) for n in names}

    def f(m):
        return torch.func.vmap(lambda wk: torch.func.functional_call(m, wk, (x, s), {"y": y}))(
            stacked
        )

    torch.testing.assert_close(f(view), f(net), rtol=1e-6, atol=1e-6)


def test_nothing_to_swap_returns_the_module():
    net = TinyEDMNet(C=1, label_dim=3, width=8)
    assert pointwise_view(net) == (net, 0)


def _attributor(net, **kw):
    return Attributor(
        make_conf(),
        FakeFabric(),
        Wrapped(net),
        "/nonexistent/a--b",
        num_noises=4,
        batch_size=4,
        max_steps=2,
        loss_null=1.2,
        progress=False,
        **kw,
    )


def test_dropin_engine_runs_the_view_on_cpu():
    torch.manual_seed(2)
    net = ConvEDMNet()
    assert type(_attributor(net).engine_module().encoder[0]) is PointwiseConv2d
    assert _attributor(net, pointwise=False).engine_module() is net
    with pytest.raises(ValueError, match="pointwise must be"):
        _attributor(net, pointwise="yes")
    ids, x, y = toy_data(N=24, C=2, H=4, label_dim=3)
    dl = torch.utils.data.DataLoader(TensorDataset(ids, x, y))
    runs = [
        _attributor(net, pointwise=p, targets_per_batch=2).run(dl, x[:2] * 0.8, y[:2], {}, 3)
        for p in ("auto", False)
    ]
    (_, ia, sa), (_, ib, sb) = runs
    assert torch.equal(ia, ib)
    # scores lie in (-1, 1) and are differences of nearly equal losses: rounding-level losses
    # give scores within ~1e-7 absolute
    torch.testing.assert_close(sa, sb, rtol=0, atol=1e-6)


def test_engine_runs_at_highest_precision_on_cpu_and_restores_it(monkeypatch):
    """attrib.py sets torch.set_float32_matmul_precision("medium"); the CPU engine runs under
    "highest" and gives the caller's setting back."""
    import mucs_fast.engine as E

    seen, inner = [], E.attribute

    def spy(*a, **k):
        seen.append(torch.get_float32_matmul_precision())
        return inner(*a, **k)

    monkeypatch.setattr(E, "attribute", spy)
    ids, x, y = toy_data(N=24, C=2, H=4, label_dim=3)
    dl = torch.utils.data.DataLoader(TensorDataset(ids, x, y))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        for flag in (True, False):
            _attributor(ConvEDMNet(), cpu_highest_precision=flag).run(dl, x[:1], y[:1], {}, 3)
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen == ["highest", "medium"]
