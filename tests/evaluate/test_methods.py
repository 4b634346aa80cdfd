"""Attribution methods behind the one interface: shapes, determinism, planted signals."""

import pytest
import torch

from mucs_fast.denoisers import EDMDenoiser
from mucs_fast.evaluate import METHODS, MethodContext, check_method, get_method, register_method
from mucs_fast.evaluate.methods import method_key
from mucs_fast.models import DiT
from mucs_fast.train import train

TINY = dict(patch_size=4, width=16, depth=1, heads=2, cond_width=16)


_MODELS = {}


def tiny_ctx(N=24, seed=0, **kw):
    """N random 8×8 images in 2 classes and a tiny DiT trained on them for a few steps (the
    zero-initialized adaLN gates of a fresh DiT block every gradient into the block weights)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(N) % 2
    if (N, seed) not in _MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            den = EDMDenoiser(DiT((1, 8, 8), 2, **TINY))
        _MODELS[N, seed] = train(
            den, x, y, steps=8, batch_size=8, lr=1e-2, warmup=0, progress=False
        )[0]
    return MethodContext(den=_MODELS[N, seed], train=x, train_labels=y, seed=seed, **kw)


def test_registry_and_names():
    for name in (
        "mucs",
        "mucs-diff",
        "mucs-indep",
        "mucs-unbounded",
        "random",
        "pixel",
        "pixel-l2",
        "dtrak",
        "abu",
    ):
        assert name in METHODS
    check_method("ensemble:mucs+dtrak+pixel")
    check_method("center:mucs")
    with pytest.raises(ValueError, match="unknown method"):
        check_method("trak")
    with pytest.raises(ValueError, match="unknown method"):
        check_method("ensemble:pixel+nope")
    with pytest.raises(ValueError, match="at least two"):
        check_method("ensemble:pixel")
    s = {"mucs": {"num_noises": 8}, "dtrak": {"proj_dim": 64}}
    assert method_key("mucs-diff", s)["settings"] == {"num_noises": 8}
    assert method_key("pixel", s)["settings"] == {}
    assert [p["name"] for p in method_key("ensemble:mucs+pixel", s)["parts"]] == ["mucs", "pixel"]


def test_pixel_methods_find_exact_duplicates():
    ctx = tiny_ctx(N=30)
    which = torch.tensor([7, 0, 29])
    targets = ctx.train[which].clone()
    for name in ("pixel", "pixel-l2"):
        s = get_method(name)(ctx, targets, None)
        assert s.shape == (3, 30)
        assert torch.equal(s.argmax(1), which), name


def test_random_is_seeded_per_target():
    ctx = tiny_ctx()
    t = ctx.train[:3]
    a = get_method("random")(ctx, t, None)
    assert a.shape == (3, 24) and torch.equal(a, get_method("random")(ctx, t, None))
    assert torch.equal(
        a[:2], get_method("random")(ctx, t[:2], None)
    )  # target k's stream is its own
    ctx.seed = 1
    assert not torch.equal(a, get_method("random")(ctx, t, None))


def test_ensemble_and_center_over_a_planted_method():
    planted = torch.zeros(24)
    planted[[3, 5, 11]] = 1.0

    @register_method("_planted_test")
    def _planted(ctx, targets, target_labels=None):
        return planted.expand(targets.shape[0], -1) + 0.01 * torch.arange(targets.shape[0])[:, None]

    try:
        ctx = tiny_ctx()
        t = ctx.train[:2]
        ens = get_method("ensemble:_planted_test+_planted_test")(ctx, t, None)
        assert set(ens.topk(3, dim=1).indices[0].tolist()) == {3, 5, 11}
        mix = get_method("ensemble:_planted_test+random")(ctx, t, None)
        assert mix.shape == (2, 24) and float(mix.min()) >= 0 and float(mix.max()) <= 1
        cen = get_method("center:_planted_test")(ctx, t, None)
        assert torch.allclose(cen.sum(0), torch.zeros(24), atol=1e-6)
        # ensembles take component scores from ctx.scores_of when given (the evaluation's cache)
        calls = []
        ctx.scores_of = lambda m: calls.append(m) or torch.zeros(2, 24)
        get_method("ensemble:pixel+random")(ctx, t, None)
        assert calls == ["pixel", "random"]
    finally:
        METHODS.pop("_planted_test")


def test_dtrak_shapes_determinism_and_self_influence():
    ctx = tiny_ctx(
        N=20, settings={"dtrak": {"num_levels": 3, "proj_dim": 32, "batch_size": 8, "block": 1000}}
    )
    which = torch.tensor([4, 13])
    t = ctx.train[which].clone()
    s = get_method("dtrak")(ctx, t, ctx.train_labels[which])
    assert s.shape == (2, 20) and torch.isfinite(s).all()
    assert torch.equal(s, get_method("dtrak")(ctx, t, ctx.train_labels[which]))
    # a target that duplicates a training image ranks it among the top (its own leverage)
    for k, j in enumerate(which.tolist()):
        assert int((s[k] > s[k, j]).sum()) <= 2
    assert ctx.info["settings"]["proj_dim"] == 32


def test_abu_scores_a_duplicated_target_highest():
    ctx = tiny_ctx(
        N=20, settings={"abu": {"steps": 3, "batch_size": 16, "num_noises": 8, "lr_factor": 0.1}}
    )
    which = torch.tensor([0, 5, 11, 17])
    t = ctx.train[which].clone()
    s = get_method("abu")(ctx, t, ctx.train_labels[which])
    assert s.shape == (4, 20) and torch.isfinite(s).all()
    assert torch.equal(s, get_method("abu")(ctx, t, ctx.train_labels[which]))
    for k, j in enumerate(which.tolist()):  # ascent on x̂ raises the loss of its duplicate most
        assert int((s[k] > s[k, j]).sum()) == 0
    with pytest.raises(ValueError, match="unknown settings"):
        get_method("abu")(
            tiny_ctx(N=20, settings={"abu": {"stepz": 1}}), t, ctx.train_labels[which]
        )


@pytest.mark.parametrize("name", ["mucs", "mucs-diff", "mucs-indep", "mucs-unbounded"])
def test_mucs_variants_run_through_the_engine(tmp_path, name):
    ctx = tiny_ctx(
        N=16,
        settings={"mucs": {"num_noises": 4, "safety_steps": 3, "loss_null": 1.0}},
        work_dir=str(tmp_path / "run"),
        cache_dir=None,
    )
    t = ctx.train[:2].clone()
    s = get_method(name)(ctx, t, ctx.train_labels[:2])
    assert s.shape == (2, 16) and torch.isfinite(s).all()
    cfg = ctx.info["config"]
    assert cfg["use_loss_ratio"] == (name != "mucs-diff")
    assert cfg["use_same_noise_infer"] == (name != "mucs-indep")
    assert cfg["bounded"] == (name != "mucs-unbounded")
    assert len(ctx.info["steps"]) == 2


@pytest.mark.parametrize("name", ["mucs", "mucs-indep"])
def test_mucs_variants_adaptive_settings(tmp_path, name):
    # adaptive_top_k reaches the engine; mucs-indep (no shared bank to screen with) stays exact
    ctx = tiny_ctx(
        N=16,
        settings={
            "mucs": {"num_noises": 4, "safety_steps": 3, "loss_null": 1.0, "adaptive_top_k": 3}
        },
        work_dir=None,
        cache_dir=None,
    )
    s = get_method(name)(ctx, ctx.train[:2].clone(), ctx.train_labels[:2])
    assert s.shape == (2, 16)
    assert (ctx.info["adaptive"] is None) == (name == "mucs-indep")
    assert ctx.info["config"]["adaptive_top_k"] == (None if name == "mucs-indep" else 3)


@pytest.mark.parametrize(
    "name, settings",
    [
        ("dtrak", {"num_levels": 2, "proj_dim": 8, "batch_size": 8, "block": 1000}),
        ("abu", {"steps": 1, "batch_size": 4, "num_noises": 4}),
    ],
)
def test_methods_leave_the_callers_net_as_it_was(name, settings):
    """A method computes with a working copy: the caller's module keeps its mode, flags and
    weights."""
    ctx = tiny_ctx(N=12, settings={name: settings})
    net = ctx.den.net
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.train()
        first = next(net.parameters()).requires_grad_(False)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        grads = {n: p.requires_grad for n, p in net.named_parameters()}
        get_method(name)(ctx, ctx.train[:2].clone(), ctx.train_labels[:2])
        assert all(m.training for m in net.modules())
        assert {
            n: p.requires_grad for n, p in net.named_parameters()
        } == grads and not first.requires_grad
        assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    finally:
        first.requires_grad_(True)
        for m, t in modes:
            m.train(t)


def test_lds_model_outputs_leave_the_callers_net_as_it_was():
    from mucs_fast.evaluate.lds import lds_bank, model_outputs

    ctx = tiny_ctx(N=12)
    net = ctx.den.net
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.train()
        bank = lds_bank(ctx.den, tuple(ctx.train.shape[1:]), 4, seed=0)
        model_outputs(ctx.den, ctx.train[:2], ctx.train_labels[:2], bank)
        assert all(m.training for m in net.modules())
    finally:
        for m, t in modes:
            m.train(t)
