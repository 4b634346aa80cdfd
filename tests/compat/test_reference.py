"""Drop-in for the reference's Attributor: its signature and side effects, each public method
against the engine or a plain loop, run() shapes/ids/agreement with `mucs_fast.attribute`, two
processes, the attrib.py call sequence, the reference's file formats, omegaconf checkpoints."""

import inspect
import os
import sys
import textwrap
import warnings

import pytest
import torch
from nets import TinyEDMNet, inference_losses
from refkit import FakeFabric, TensorDataset, Wrapped, make_conf, toy_data

import mucs_fast as mf
from mucs_fast import noise
from mucs_fast.compat import reference as ref
from mucs_fast.compat.reference import Attributor, ResidentLoader
from mucs_fast.noise import NoiseBank

M, B = 4, 4  # noises, batch: tiny on purpose (2 CPU cores)


def make(net=None, fabric=None, conf=None, method_path="/nonexistent/run--post", **kw):
    net = net if net is not None else TinyEDMNet(C=1, label_dim=3, width=8, zero_out=True)
    kw.setdefault("num_noises", M)
    kw.setdefault("progress", False)
    return Attributor(conf or make_conf(), fabric or FakeFabric(), Wrapped(net), method_path, **kw)


@pytest.fixture(scope="module")
def data():
    ids, x, y = toy_data(N=32, C=1, H=4, label_dim=3)
    return ids, x, y, TensorDataset(ids, x, y)


# -- constructor ---------------------------------------------------------------------------------
REFERENCE_SIGNATURE = [
    ("conf", inspect.Parameter.empty),
    ("fabric", inspect.Parameter.empty),
    ("model", inspect.Parameter.empty),
    ("method_path", inspect.Parameter.empty),
    ("device", "cpu"),
    ("seed", 45),
    ("batch_size", None),
    ("num_noises", 100),
    ("lr_factor", 10),
    ("lamb", 0.2),
    ("loss_null", "auto"),
    ("tolerance", 0.05),
    ("max_steps", None),
    ("frozen_params", list(mf.REFERENCE_FROZEN)),
    ("use_aug", False),
    ("use_same_noise_train", False),
    ("use_same_noise_infer", True),
    ("use_instance_weights", False),
    ("t_sched_train", None),
    ("t_sched_infer", 0.7),
    ("use_loss_ratio", True),
    ("eps", 1e-3),
]


def test_signature_is_the_references():
    params = list(inspect.signature(Attributor.__init__).parameters.values())[1:]
    positional = [(p.name, p.default) for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == REFERENCE_SIGNATURE
    assert all(p.kind == p.KEYWORD_ONLY for p in params[len(positional) :])  # acceleration options
    for name, args in [
        ("run", ["dl_train", "xgen", "ygen", "extra", "top_k_attrib"]),
        ("compute_inference_losses", ["model", "dl", "noiseinfo", "force_y"]),
        ("compute_unlearning", ["model", "dl", "xgen_i", "ygen_i"]),
        ("compute_scores", ["loss_t", "loss_u"]),
        ("get_noise_info", ["size", "training"]),
        ("get_model_pred", ["model", "x", "n", "s", "y", "a"]),
        ("get_model_loss", ["x", "xhat", "s", "reduction"]),
        ("estimate_null_loss", ["dl", "num_estimates"]),
        ("estimate_t_sched", ["dl", "num_consec", "qtl"]),
        ("is_frozen_param", ["name"]),
    ]:
        assert list(inspect.signature(getattr(Attributor, name)).parameters)[1:] == args, name


def test_side_effects():
    conf, fabric = make_conf(lr=3e-4), FakeFabric()
    att = make(conf=conf, fabric=fabric, lr_factor=10)
    assert conf.training.optim.lr == pytest.approx(3e-5)  # divided in place, as the reference
    assert fabric.calls == [("seed_everything", 45, True)]
    assert att.batch_size == M and isinstance(att.module, TinyEDMNet)
    with pytest.raises(AssertionError):
        make(fabric=FakeFabric("cpu"), device="cuda:0")
    raw = make(net=None)  # a raw module is accepted too
    assert Attributor(make_conf(), FakeFabric(), raw.module, "x").module is raw.module
    assert att.is_frozen_param("dit_backbone.0.mlp.0.bias") and not att.is_frozen_param(
        "dit_backbone.0.mlp.0.weight"
    )


# -- noise ---------------------------------------------------------------------------------------
def test_sigma_grid_values():
    att = make(num_noises=100)
    noise_, sigma = att.get_noise_info([100, 1, 4, 4])
    assert noise_.shape == (100, 1, 4, 4) and sigma.shape == (100,)
    assert sigma[0].item() == pytest.approx(80.0, rel=1e-6)
    assert sigma[-1].item() == pytest.approx(0.3102, abs=5e-5)
    assert sigma.median().item() == pytest.approx(8.296, abs=5e-4)
    assert torch.equal(sigma, noise.karras_sigmas(142)[:100])
    _, s_train = att.get_noise_info(
        [1000, 1, 4, 4], training=True
    )  # log-normal: ln σ ~ N(-1.2, 1.2²)
    assert s_train.log().mean().item() == pytest.approx(-1.2, abs=0.15)
    assert s_train.log().std().item() == pytest.approx(1.2, abs=0.15)


# -- compute_inference_losses == engine ---------------------------------------------------------
def test_inference_losses_equal_engine(data):
    ids, x, y, ds = data
    torch.manual_seed(1)
    net = TinyEDMNet(C=1, label_dim=3, width=8)  # non-zero output: losses depend on the net
    att = make(net)
    noise_, sigma = att.get_noise_info([M, 1, 4, 4])
    dl = torch.utils.data.DataLoader(ds, batch_size=5)
    idxs, losses, ni = att.compute_inference_losses(net, dl, noiseinfo=(noise_, sigma))
    assert ni[0] is noise_ and torch.equal(idxs, ids)
    assert losses.shape == (32, M) and losses.dtype == torch.float32
    den = mf.EDMDenoiser(net)
    bank = NoiseBank(noise_ / sigma.view(-1, 1, 1, 1), sigma)
    expect = inference_losses(den, net, x, y, bank, images_per_forward=7, precision="fp32")
    torch.testing.assert_close(losses, expect, rtol=1e-5, atol=0)
    # force_y: every image scored under one label
    _, forced, _ = att.compute_inference_losses(net, dl, noiseinfo=ni, force_y=y[0])
    expect = inference_losses(
        den, net, x, y[:1].expand(32, 3), bank, images_per_forward=32, precision="fp32"
    )
    torch.testing.assert_close(forced, expect, rtol=1e-5, atol=0)


# -- compute_unlearning == a plain loop ---------------------------------------------------------
def test_unlearning_equals_plain_loop(data):
    ids, x, y, _ds = data
    batches = [
        (ids[i : i + B], x[i : i + B], y[i : i + B]) for i in range(0, 12, B)
    ]  # injected batches
    torch.manual_seed(3)
    net = TinyEDMNet(C=1, label_dim=3, width=8)
    xg, yg = x[5] * 0.5, y[5]
    att = make(net, loss_null=1.3, max_steps=5, conf=make_conf(lr=1e-2))

    torch.manual_seed(11)  # the injected noise stream: the global RNG
    got = att.compute_unlearning(_copy(net), batches, xg, yg)

    torch.manual_seed(11)
    ref_net = _copy(net)
    opt = torch.optim.AdamW(ref_net.parameters(), lr=1e-3, weight_decay=0.01)
    for n, p in ref_net.named_parameters():
        p.requires_grad_(not any(f in n for f in mf.REFERENCE_FROZEN))
    sd = 0.5
    w = lambda s: ((s**2 + sd**2) / (s * sd) ** 2).view(-1, 1, 1, 1)  # noqa: E731
    step = 0
    while step < 5:
        for _, xr, yr in batches:
            if step >= 5:
                break
            s_r = (1.2 * torch.randn(B) - 1.2).exp()
            n_r = s_r.view(-1, 1, 1, 1) * torch.randn(xr.shape)
            s_f = (1.2 * torch.randn(B) - 1.2).exp()
            n_f = s_f.view(-1, 1, 1, 1) * torch.randn(xr.shape)
            xf, yf = xg.expand_as(xr), yg.expand(B, 3)
            lr_ = (w(s_r) * (ref_net(xr + n_r, s_r, y=yr) - xr) ** 2).mean((1, 2, 3)).mean()
            lf = (
                (w(s_f) * (ref_net(xf + n_f, s_f, y=yf) - xf) ** 2)
                .mean((1, 2, 3))
                .clamp(max=1.3)
                .mean()
            )
            opt.zero_grad()
            (lr_ - 0.2 * lf).backward()
            opt.step()
            step += 1
    for (n, a), b in zip(got.named_parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    changed = [
        n for n, p in got.named_parameters() if not torch.equal(p, dict(net.named_parameters())[n])
    ]
    assert changed and all(not att.is_frozen_param(n) for n in changed)


def test_replay_objective_is_the_engines(data, monkeypatch):
    """The replay's objective is `unlearn.mirrored_objective` (instance weights times the per-sample
    retain losses in), and its value is bit for bit the reference's order of operations."""
    from mucs_fast.compat import replay

    ids, x, y, ds = data
    batches = ResidentLoader(ds, ids, x, y, B, False, True)
    net = TinyEDMNet(C=1, label_dim=3, width=8)
    att = make(net, loss_null=1.3, max_steps=2)
    w = torch.linspace(0.5, 1.5, B)
    att.use_instance_weights = True  # the reference's weights need its lib.image_metrics
    att.get_instance_weight = lambda ds, xi, yi, xf, yf: w
    calls = []

    def spy(loss_r, loss_f, loss_null, lamb, bounded=True):
        out = mf.unlearn.mirrored_objective(loss_r, loss_f, loss_null, lamb, bounded)
        calls.append((loss_r.detach(), loss_f.detach(), out[2].detach()))
        return out

    monkeypatch.setattr(replay, "mirrored_objective", spy)
    torch.manual_seed(11)
    att.compute_unlearning(_copy(net), batches, x[5], y[5])
    assert len(calls) == 3  # 2 steps, then the stop check
    for weighted, loss_f, objective in calls:
        reference = weighted.mean() - 0.2 * loss_f.clamp(max=1.3).mean()
        assert torch.equal(objective, reference)
    weighted = calls[0][0]
    torch.manual_seed(11)  # the same first step without weights: the plain per-sample losses
    att.use_instance_weights = False
    calls.clear()
    att.compute_unlearning(_copy(net), batches, x[5], y[5])
    assert torch.equal(weighted, w * calls[0][0])


def _copy(net):
    import copy

    return copy.deepcopy(net)


def test_unlearning_stop_rule_and_safety_cap(data):
    ids, x, y, _ds = data
    batches = [(ids[:B], x[:B], y[:B])]
    net = TinyEDMNet(C=1, label_dim=3, width=8)
    att = make(net, loss_null=1e-3)  # the bound is reached at once: no step
    before = {n: p.clone() for n, p in net.named_parameters()}
    out = att.compute_unlearning(_copy(net), batches, x[0], y[0])
    assert all(torch.equal(p, before[n]) for n, p in out.named_parameters())
    att = make(net, loss_null=1e6, safety_steps=3)  # never reached: the cap stops it
    att.compute_unlearning(_copy(net), batches, x[0], y[0])
    assert att._stops == ["cap"]


# -- compute_scores ------------------------------------------------------------------------------
def test_compute_scores_switches():
    loss_t = torch.tensor([[[1.0, 2.0], [4.0, 1.0]]])  # [1, Nt=2, M=2]
    loss_u = torch.tensor([[[2.0, 2.0], [2.0, 3.0]], [[1.0, 4.0], [4.0, 1.0]]])  # [Ng=2, 2, 2]
    e = 1e-3
    ratio = lambda u, t: (u - t) / (u + t + e)  # noqa: E731
    att = make(eps=e)
    expect = torch.stack(
        [
            torch.stack([(ratio(loss_u[k, j], loss_t[0, j])).mean() for j in range(2)])
            for k in range(2)
        ]
    )
    torch.testing.assert_close(att.compute_scores(loss_t, loss_u), expect)
    att = make(use_loss_ratio=False)
    torch.testing.assert_close(att.compute_scores(loss_t, loss_u), (loss_u - loss_t).mean(-1))
    att = make(use_same_noise_infer=False, eps=e)
    torch.testing.assert_close(
        att.compute_scores(loss_t, loss_u), ratio(loss_u.mean(-1), loss_t.mean(-1))
    )


# -- ResidentLoader draws like a DataLoader ------------------------------------------------------
def test_resident_loader_consumes_rng_like_dataloader(data):
    ids, x, y, ds = data
    for shuffle, drop_last in [(True, True), (False, False)]:
        torch.manual_seed(5)
        a = [
            b
            for b in torch.utils.data.DataLoader(
                ds, batch_size=5, shuffle=shuffle, drop_last=drop_last
            )
        ]
        after_a = torch.rand(3)
        torch.manual_seed(5)
        b = list(ResidentLoader(ds, ids, x, y, 5, shuffle, drop_last))
        after_b = torch.rand(3)
        assert len(a) == len(b) and all(
            torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b)
        )
        assert torch.equal(after_a, after_b)


# -- run() ---------------------------------------------------------------------------------------
def test_run_shapes_ids_and_engine_agreement(data):
    ids, x, y, ds = data
    torch.manual_seed(2)
    net = TinyEDMNet(C=1, label_dim=3, width=8)
    xg, yg = x[[3, 9, 20]] * 0.8, y[[3, 9, 20]]
    att = make(net, loss_null=1.2, max_steps=2, batch_size=B, targets_per_batch=2)
    dl = torch.utils.data.DataLoader(ds, batch_size=7, shuffle=True)  # only .dataset matters
    top, all_idx, scores = att.run(dl, xg, yg, {"t_steps": torch.zeros(3, 1)}, 5)
    assert top.shape == (3, 5) and top.dtype == torch.int64
    assert torch.equal(all_idx, ids) and all_idx.dtype == torch.int64
    assert (
        scores.shape == (3, 32) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    )
    assert torch.equal(top, ids[torch.argsort(scores, dim=1, descending=True, stable=True)[:, :5]])
    res = mf.attribute(
        mf.EDMDenoiser(net),
        x,
        xg,
        att.config(),
        train_labels=y,
        target_labels=yg,
        train_ids=ids,
        device="cpu",
        progress=False,
        cache_dir=None,
    )
    torch.testing.assert_close(scores, res.scores, rtol=0, atol=0)
    assert att.last_result.meta["resolved"]["lr"] == pytest.approx(1e-4)


def test_run_reference_algorithm_and_fixes(data):
    """fast=False: the reference's own loop; t_sched="auto" works; max_steps=None is capped."""
    ids, x, y, ds = data
    torch.manual_seed(2)
    net = TinyEDMNet(C=1, label_dim=3, width=8)
    att = make(net, loss_null=1e6, safety_steps=2, batch_size=B, fast=False, t_sched_infer="auto")
    with pytest.warns(UserWarning, match="safety cap"):
        top, all_idx, scores = att.run(torch.utils.data.DataLoader(ds), x[:2], y[:2], {}, 4)
    assert top.shape == (2, 4) and torch.equal(all_idx, ids) and scores.shape == (2, 32)
    assert isinstance(att.t_sched_infer, float) and 0 < att.t_sched_infer <= 1
    att = make(
        net, loss_null=1e6, safety_steps=2, batch_size=B, t_sched_train="auto", targets_per_batch=1
    )
    with pytest.warns(UserWarning, match="safety cap"):
        att.run(torch.utils.data.DataLoader(ds), x[:1], y[:1], {}, 4)
    assert isinstance(att.t_sched_train, float)


def test_replay_inference_batches_as_the_reference(data):
    """fast=False batches inference as the reference, 16·B // M images, on every device and
    whatever score_batch says (the engine's knob)."""
    from mucs_fast.compat.replay import inference_images

    assert inference_images(100, 100) == 16 and inference_images(4, 8) == 8
    assert inference_images(5, 100) == 1 and inference_images(64, 100) == 10
    _ids, x, y, ds = data
    net = TinyEDMNet(C=1, label_dim=3, width=8)
    for batch_size, expect in [(B, 16), (6, 24)]:
        att = make(
            net, loss_null=1.2, max_steps=1, batch_size=batch_size, fast=False, score_batch=3
        )
        seen = _record_inference_batch_sizes(att)
        att.run(torch.utils.data.DataLoader(ds), x[:1], y[:1], {}, 3)
        assert seen == [expect, expect]  # the original model, the unlearned one


def _record_inference_batch_sizes(att) -> list:
    seen, inner = [], att.compute_inference_losses

    def spy(model, dl, **kw):
        seen.append(dl.batch_size)
        return inner(model, dl, **kw)

    att.compute_inference_losses = spy
    return seen


def test_unconditional_model_gets_no_labels(data, monkeypatch):
    """The reference's datasets carry y for every model; the engine path passes none to an
    unconditional one (the engine refuses labels there) and scores as the engine does without."""
    from mucs_fast import engine

    _ids, x, y, ds = data
    torch.manual_seed(4)
    net = TinyEDMNet(C=1, label_dim=0, width=8)
    att = make(net, loss_null=1.2, max_steps=2, batch_size=B, targets_per_batch=2)
    seen = []
    attribute = engine.attribute

    def spy(*a, **kw):
        seen.append((kw["train_labels"], kw["target_labels"]))
        return attribute(*a, **kw)

    monkeypatch.setattr(engine, "attribute", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the batched probe runs without labels too
        _top, _, scores = att.run(torch.utils.data.DataLoader(ds), x[:3] * 0.8, y[:3], {}, 3)
    assert seen == [(None, None)]
    expect = attribute(
        mf.EDMDenoiser(net), x, x[:3] * 0.8, att.config(), device="cpu", progress=False
    ).scores
    torch.testing.assert_close(scores, expect, rtol=0, atol=0)
    att = make(net, loss_null=1.2, max_steps=1, batch_size=B, fast=False)  # the reference: y as is
    _top, _, scores = att.run(torch.utils.data.DataLoader(ds), x[:1], y[:1], {}, 3)
    assert torch.isfinite(scores).all()


class RandCondNet(TinyEDMNet):
    """Draws a (probability-0) dropout mask in forward, like the reference's conditional
    embedders."""

    def forward(self, x, sigma, y=None, a=None):
        keep = torch.rand(len(x), 1, device=x.device) >= 0.0
        return super().forward(x, sigma, y=torch.where(keep, y, torch.zeros_like(y)), a=a)


def test_model_with_forward_randomness_runs_batched(data):
    """vmap(randomness="different"): a model drawing random numbers in forward is batched, not
    refused, and (its mask being probability-0) scores equal one target at a time."""
    _ids, x, y, ds = data
    torch.manual_seed(2)
    net = RandCondNet(C=1, label_dim=3, width=8)
    scores = {}
    for K in (1, 4):
        att = make(net, loss_null=1.2, max_steps=2, batch_size=B, targets_per_batch=K)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "one at a time" fallback warning
            _top, _, scores[K] = att.run(torch.utils.data.DataLoader(ds), x[:3], y[:3], {}, 3)
    assert torch.isfinite(scores[4]).all()
    assert (scores[4] - scores[1]).abs().max().item() <= 1e-6


def test_loss_null_auto_rebuilds_from_args(data):
    _ids, x, y, ds = data
    net = TinyEDMNet(C=1, label_dim=3, width=8, zero_out=True)
    att = make(net, max_steps=1, batch_size=B)
    att.run(torch.utils.data.DataLoader(ds), x[:1], y[:1], {}, 3)
    assert isinstance(att.loss_null, float) and att.loss_null > 0

    class NoArgs(torch.nn.Module):
        sigma_data, sigma_P_mean, sigma_P_std, unconditional = 0.5, -1.2, 1.2, True

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)

        def forward(self, x, sigma, y=None, a=None):
            return x

    att = make(NoArgs())
    with pytest.raises(ValueError, match="loss_null"):
        att.run(torch.utils.data.DataLoader(ds), x[:1], y[:1], {}, 3)


# -- two processes -------------------------------------------------------------------------------
def _ddp_worker(rank, world, port, out):
    sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..")]
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        ids, x, y = toy_data(N=32, C=1, H=4, label_dim=3)
        torch.manual_seed(2)
        net = TinyEDMNet(C=1, label_dim=3, width=8)
        att = Attributor(
            make_conf(),
            FakeFabric(rank=rank),
            Wrapped(net),
            "/nonexistent/a--b",
            num_noises=M,
            batch_size=B,
            max_steps=2,
            targets_per_batch=2,
            progress=False,
        )
        top, all_idx, scores = att.run(
            torch.utils.data.DataLoader(TensorDataset(ids, x, y)), x[:4] * 0.7, y[:4], {}, 5
        )
        torch.save(
            {"top": top, "all_idx": all_idx, "scores": scores, "loss_null": att.loss_null},
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_return_the_full_result_everywhere(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ids, x, y = toy_data(N=32, C=1, H=4, label_dim=3)
    torch.manual_seed(2)
    net = TinyEDMNet(C=1, label_dim=3, width=8)
    att = make(net, method_path="/nonexistent/a--b", batch_size=B, max_steps=2, targets_per_batch=2)
    top, all_idx, scores = att.run(
        torch.utils.data.DataLoader(TensorDataset(ids, x, y)), x[:4] * 0.7, y[:4], {}, 5
    )
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["scores"].shape == (4, 32)
        torch.testing.assert_close(got["scores"], scores, rtol=0, atol=0)
        assert torch.equal(got["top"], top) and torch.equal(got["all_idx"], all_idx)
        assert got["loss_null"] == pytest.approx(att.loss_null, rel=1e-12)


# -- the attrib.py call sequence -----------------------------------------------------------------
def test_attrib_py_flow_end_to_end(tmp_path):
    """samples.pt → dataset folder → Attributor(conf, fabric, model, method_path,
    device=fabric.device) → run → the checks and files of the reference's attrib.py."""
    ids, x, y = toy_data(N=32, C=1, H=4, label_dim=3)
    ref.save_dataset(tmp_path / "data", x, y, ids=ids)
    data = ref.load_dataset(tmp_path / "data")
    n_attrib, k = 2, 6
    gen = x[:4] * 0.9
    ref.save_samples(
        tmp_path / "samples.pt", torch.arange(4), x[:4], y[:4], gen, {"t_steps": torch.zeros(4, 3)}
    )

    fabric = FakeFabric()
    _idx, _xs, ys, xgen, extra = torch.load(
        tmp_path / "samples.pt", weights_only=True, map_location=fabric.device
    )
    dl_train = fabric.setup_dataloaders(
        torch.utils.data.DataLoader(TensorDataset(*data), batch_size=8)
    )
    torch.manual_seed(0)
    model = fabric.setup(TinyEDMNet(C=1, label_dim=3, width=8, zero_out=True))
    method_path = str(tmp_path / "logs" / "job--post_mucs_fast")
    attrib = Attributor(
        make_conf(),
        fabric,
        model,
        method_path,
        device=fabric.device,
        num_noises=M,
        batch_size=B,
        max_steps=2,
        progress=False,
    )
    e_attrib = {key: v[:n_attrib] for key, v in extra.items()}
    top, all_idx, all_scores = attrib.run(dl_train, xgen[:n_attrib], ys[:n_attrib], e_attrib, k)
    assert top.ndim == 2 and top.size(0) == n_attrib and top.size(1) == k
    fn_out = tmp_path / "attrib-ids.pt"
    ref.save_attrib_ids(fn_out, top.cpu().long(), all_idx.cpu().long(), all_scores.cpu().float())
    assert torch.equal(torch.load(fn_out, weights_only=True), top)
    t2, a2, s2 = torch.load(tmp_path / "attrib-ids_all.pt", weights_only=True)
    assert torch.equal(t2, top) and torch.equal(a2, ids) and torch.equal(s2, all_scores)
    assert set(top.flatten().tolist()) <= set(ids.tolist())


# -- file formats --------------------------------------------------------------------------------
def test_dataset_folder_round_trip(tmp_path):
    ids, x, y = toy_data(N=20, C=3, H=4, label_dim=5)
    x8 = ((x * 0.5 + 0.5) * 255).round().to(torch.uint8)
    meta = ref.save_dataset(
        tmp_path, x8, y, ids=ids, splits={"train": range(15), "test": range(15, 20)}
    )
    m = torch.load(tmp_path / "metadata.pt", weights_only=True)  # the reference reads it so
    assert m["label_dim"] == 5 and list(m["image_size"]) == [3, 4, 4] and m["num_samples"] == 20
    assert len(m["filenames"]["train"]) == 15 and meta["filenames"] == m["filenames"]
    i = int(ids[0])
    name = str(i).zfill(max(3, len(str(int(ids.max())))))
    item = torch.load(tmp_path / "pt_files" / name[-3:] / f"{name}.pt", weights_only=True)
    assert item[0] == i and torch.equal(item[1], x8[0]) and item[1].dtype == torch.uint8
    got = ref.load_dataset(tmp_path, "train", threads=2)
    assert torch.equal(got.ids, ids[:15]) and torch.equal(got.y, y[:15])
    torch.testing.assert_close(got.x, (x8[:15].float() / 255 - 0.5) / 0.5, rtol=0, atol=0)
    assert ref.load_dataset(tmp_path, "full").ids.shape == (20,)
    assert torch.equal(ref.load_dataset(tmp_path, "orig-test").ids, ids[15:])
    with pytest.raises(ValueError, match="split"):
        ref.load_dataset(tmp_path, "nope")


def test_samples_and_attrib_ids_round_trip(tmp_path):
    ids, x, y = toy_data(N=6, C=1, H=4, label_dim=2)
    ref.save_samples(tmp_path / "s.pt", ids, x, y, -x, {"t_steps": torch.ones(6, 2)})
    s = ref.load_samples(tmp_path / "s.pt")
    assert (
        torch.equal(s.idx, ids)
        and torch.equal(s.xgen, -x)
        and torch.equal(s.extra["t_steps"], torch.ones(6, 2))
    )
    torch.save({"not": "samples"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="samples"):
        ref.load_samples(tmp_path / "bad.pt")
    top, scores = torch.tensor([[3, 1]]), torch.rand(1, 4)
    ref.save_attrib_ids(tmp_path / "attrib-ids.pt", top, torch.arange(4), scores)
    assert torch.equal(ref.load_attrib_ids(tmp_path / "attrib-ids.pt"), top)
    _t, a, sc = ref.load_attrib_ids(tmp_path / "attrib-ids.pt", with_all=True)
    assert torch.equal(sc, scores) and torch.equal(a, torch.arange(4))


# -- omegaconf -----------------------------------------------------------------------------------
def test_omegaconf_checkpoint_loads(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    conf = omegaconf.OmegaConf.create(
        {"model": {"name": "x", "sizes": [1, 2]}, "lr": 1e-4, "flag": None}
    )
    torch.save({"model": {"w": torch.ones(2)}, "conf": conf, "epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state = ref.load_checkpoint(tmp_path / "ckpt.pt")
    assert state["conf"].model.sizes[1] == 2 and torch.equal(state["model"]["w"], torch.ones(2))
    with ref.omegaconf_safe_globals():
        assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 3


def test_loss_null_auto_from_pre_run_configuration(tmp_path, monkeypatch, data):
    """The reference's route: '<...--pre>/configuration.yaml' + models.<name>.Model(conf.model,
    meta) imported from the user's checkout."""
    omegaconf = pytest.importorskip("omegaconf")
    ids, x, y, ds = data
    (tmp_path / "code" / "models").mkdir(parents=True)
    (tmp_path / "code" / "models" / "__init__.py").write_text("")
    (tmp_path / "code" / "models" / "mucs_test_tiny.py").write_text(
        textwrap.dedent("""
        import nets
        BUILT = []
        class Model(nets.TinyEDMNet):
            def __init__(self, conf, meta):
                BUILT.append(meta["label_dim"])
                super().__init__(C=1, label_dim=meta["label_dim"], width=conf.width, zero_out=True)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    (tmp_path / "logs" / "job--pre").mkdir(parents=True)
    omegaconf.OmegaConf.save(
        omegaconf.OmegaConf.create({"model": {"name": "mucs_test_tiny", "width": 8}}),
        tmp_path / "logs" / "job--pre" / "configuration.yaml",
    )

    class NoArgs(TinyEDMNet):
        pass

    net = NoArgs(C=1, label_dim=3, width=8, zero_out=True)
    del net.args  # only the configuration route can build the null model
    att = make(
        net, method_path=str(tmp_path / "logs" / "job--post_mucs_fast"), max_steps=1, batch_size=B
    )
    att.run(torch.utils.data.DataLoader(ds), x[:1], y[:1], {}, 3)
    import models.mucs_test_tiny as built

    assert built.BUILT and built.BUILT[0] == 3 and att.loss_null > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lnull = att.estimate_null_loss(ResidentLoader(ds, ids, x, y, B, True, True))
    assert lnull > 0


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_attribute_on_reference_files(tmp_path):
    from mucs_fast import cli

    ids, x, y = toy_data(N=24, C=1, H=4, label_dim=3)
    ref.save_dataset(tmp_path / "data", x, y, ids=ids)
    ref.save_samples(tmp_path / "samples.pt", torch.arange(5), x[:5], y[:5], x[:5] * 0.9, {})
    torch.manual_seed(0)
    torch.save(TinyEDMNet(C=1, label_dim=3, width=8), tmp_path / "model.pt")
    out = tmp_path / "out"
    argv = [
        "attribute",
        "--model",
        str(tmp_path / "model.pt"),
        "--reference-samples",
        str(tmp_path / "samples.pt"),
        "--reference-data",
        str(tmp_path / "data"),
        "--num-attrib",
        "2",
        "--out",
        str(out),
        "--num-noises",
        "4",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--loss-null",
        "1.0",
        "--lr",
        "1e-4",
        "--top-k",
        "5",
        "--device",
        "cpu",
        "--quiet",
        "--trust-pickle",  # the model file is a whole pickled module (our own, made above)
    ]
    assert cli.main(argv) == 0
    res = mf.Attribution.load(out)
    assert res.scores.shape == (2, 24) and torch.equal(
        res.train_ids, ref.load_dataset(tmp_path / "data").ids
    )
    top, all_idx, scores = ref.load_attrib_ids(out / "attrib-ids.pt", with_all=True)
    assert (
        torch.equal(top, res.topk(5))
        and torch.equal(all_idx, res.train_ids)
        and torch.equal(scores, res.scores)
    )
    assert torch.equal(ref.load_attrib_ids(out / "attrib-ids.pt"), top)
    assert (
        cli.main(["attribute", "--model", "m", "--out", str(out), "--reference-samples", "s.pt"])
        == 2
    )


def test_acceleration_keywords_reach_the_engine_config():
    """Extra keywords only accelerate: they land in MUCSConfig, reference fields keep their
    defaults."""
    att = make(targets_per_batch=3, score_batch=64, compile=False, precision="fp32")
    cfg = att.config()
    assert (cfg.targets_per_batch, cfg.score_batch, cfg.compile, cfg.precision) == (
        3,
        64,
        False,
        "fp32",
    )
    assert make().config().compile == "auto"
