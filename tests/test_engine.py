"""Engine: closed-form checks (σ grid, L = 1, stop rule, trainable set, score formula) and
end-to-end determinism on a tiny model."""

import math

import pytest
import torch
from nets import TinyEDMNet

import mucs_fast as mf
from mucs_fast import noise
from mucs_fast.config import REFERENCE_FROZEN
from mucs_fast.data import TensorSource
from mucs_fast.params import trainable_names
from mucs_fast.score import skew_scores
from mucs_fast.unlearn import RetainStream, stop_reason, unlearn_batched


# -- σ grid -------------------------------------------------------------------------------------
def test_sigma_grid_reference_values():
    assert noise.grid_size(100, 0.7) == 142
    den = mf.EDMDenoiser(TinyEDMNet())
    sigma = den.inference_levels(100, 0.7)
    assert sigma.shape == (100,) and sigma.dtype == torch.float32
    assert sigma[0].item() == pytest.approx(80.0, rel=1e-6)
    assert sigma[-1].item() == pytest.approx(0.3102, abs=5e-5)
    assert sigma.median().item() == pytest.approx(8.296, abs=5e-4)
    assert torch.all(sigma[1:] < sigma[:-1])
    lam = den.weight(sigma)
    assert lam.min().item() == pytest.approx(4.0, abs=1e-3) and lam.max().item() == pytest.approx(
        14.4, abs=0.05
    )
    # the full grid is the first M of int(M / t) Karras levels: a prefix of the 142-level grid
    assert torch.equal(sigma, noise.karras_sigmas(142)[:100])


def test_vp_grid_noisiest_first():
    from mucs_fast.denoisers import DiffusersDenoiser

    class Sched:
        class config:
            prediction_type = "epsilon"

        alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    den = DiffusersDenoiser(torch.nn.Linear(1, 1), Sched())
    t = den.inference_levels(100, 0.7)
    assert t.dtype == torch.int64 and t[0] == 999 and torch.all(t[1:] < t[:-1])
    assert t[-1] == round(999 * (1 - 99 / 141))


# -- L = 1 for a zero-output EDM net ----------------------------------------------------------
def test_zero_output_edm_loss_is_one():
    """F ≡ 0 and data with E[x²] = σ_d², E[ε²] = 1, E[xε] = 0 exactly → L = 1 for every σ."""
    sd = 0.5
    net = TinyEDMNet(
        C=1, sigma_data=sd, zero_out=True
    ).double()  # fp64: λ(0.002) ≈ 2.5e5 amplifies fp32 rounding
    den = mf.EDMDenoiser(net)
    D = 64
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    H = h
    for _ in range(5):
        H = torch.kron(H, h)  # 64×64 Hadamard: orthogonal ±1 rows
    x = (sd * H[1]).view(1, 1, 8, 8).double()
    eps = H[2].view(1, 1, 8, 8).double()
    assert (x * eps).sum() == 0 and (x**2).mean() == sd**2 and H.shape == (D, D)
    for s in [0.002, 0.31, 1.0, 8.3, 80.0]:
        L = den.loss(x, eps, torch.tensor([s], dtype=torch.float64))
        assert L.item() == pytest.approx(1.0, rel=1e-9), s


# -- stop rule ----------------------------------------------------------------------------------
def test_stop_rule_on_scripted_losses():
    cfg = mf.MUCSConfig(tolerance=0.05, safety_steps=100)
    Ln = 1.5
    script = [0.4, 0.9, 1.3, 1.42, 1.425, 1.5]  # (1 - 0.05) * 1.5 = 1.425
    stops = [stop_reason(i, lf, Ln, cfg) for i, lf in enumerate(script)]
    assert stops == [None, None, None, None, "rule", "rule"]
    assert stop_reason(100, 0.1, Ln, cfg) == "cap"
    assert stop_reason(3, math.nan, Ln, cfg) == "nan"
    fixed = mf.MUCSConfig(max_steps=3)
    assert [stop_reason(i, 9.0, Ln, fixed) for i in range(5)] == [
        None,
        None,
        None,
        "max_steps",
        "max_steps",
    ]


class ScriptedDenoiser(mf.EDMDenoiser):
    """Loss of one step's [retain; forget] batch: 0.5 for the retain half, the next scripted value
    for the forget half, plus a differentiable zero (the engine evaluates both halves in one
    call)."""

    def __init__(self, net, script):
        super().__init__(net)
        self.script, self.calls = list(script), 0

    def loss(self, x, eps, level, y=None, net=None):
        B = x.shape[0] // 2
        value = self.script[self.calls]
        self.calls += 1
        out = torch.cat([torch.full((B,), 0.5), torch.full((B,), value)])
        return out + 0 * net(x, level).sum()


def test_unlearn_stops_at_the_rule_and_counts_steps():
    net = TinyEDMNet()
    den = ScriptedDenoiser(net, [0.4, 0.9, 1.3, 1.45, 0.1])
    x = torch.randn(8, 1, 4, 4)
    names = [n for n, _ in net.named_parameters()]
    _, (info,) = unlearn_batched(
        den,
        net,
        names,
        TensorSource(x),
        None,
        x[:1],
        None,
        cfg=mf.MUCSConfig(batch_size=4),
        loss_null=1.5,
        lr=1e-3,
        retains=[RetainStream(8, 4, torch.Generator().manual_seed(0))],
        generators=[torch.Generator().manual_seed(0)],
    )
    assert info.stop == "rule" and info.steps == 3
    assert [lf for _, lf in info.trace] == pytest.approx([0.4, 0.9, 1.3, 1.45])


def test_retain_stream_is_dataloader_like():
    s = RetainStream(10, 4, torch.Generator().manual_seed(0))
    batches = [next(s) for _ in range(4)]
    assert all(b.shape == (4,) for b in batches)
    assert len(set(torch.cat(batches[:2]).tolist())) == 8  # one epoch: no repeats, last 2 dropped
    with pytest.raises(ValueError, match="exceeds the training set size"):
        RetainStream(3, 4, torch.Generator())


# -- trainable set
# ----------------------------------------------------------------------------------
REFERENCE_DIT_NAMES = [
    "x_embedder.proj.weight",
    "x_embedder.proj.bias",
    "pos_enc.extra",
    "s_embedder.mlp.0.weight",
    "s_embedder.mlp.0.bias",
    "s_embedder.mlp.2.weight",
    "y_embedder.xdrop",
    "y_embedder.emb_mlp.0.weight",
    "y_embedder.emb_mlp.0.bias",
    "y_embedder.emb_mlp.3.weight",
    "a_embedder.emb.weight",
    "encoder.0.conv.weight",
    "decoder.0.conv.weight",
    "unpatchify.proj.weight",
    "unpatchify.proj.bias",
    "last.proj.weight",
    "dit_final.adapter.adapter.1.weight",
    "dit_final.adapter.adapter.1.bias",
] + [
    f"dit_backbone.{i}.{p}"
    for i in range(12)
    for p in (
        "attention.qkv.weight",
        "attention.proj.weight",
        "attention.proj.bias",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.3.weight",
        "mlp.3.bias",
        "adapter.adapter.1.weight",
        "adapter.adapter.1.bias",
    )
]


def test_reference_frozen_leaves_block_mlps_and_condition_embedder():
    net = torch.nn.Module()
    for n in REFERENCE_DIT_NAMES:
        *path, leaf = n.split(".")
        mod = net
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros(1)))
    names = trainable_names(net, REFERENCE_FROZEN)
    mlp = [f"dit_backbone.{i}.mlp.{j}.weight" for i in range(12) for j in (0, 3)]
    assert sorted(names) == sorted(
        mlp + ["y_embedder.emb_mlp.0.weight", "y_embedder.emb_mlp.3.weight"]
    )
    assert len([n for n in names if ".mlp." in n and n.startswith("dit_backbone")]) == 24
    # user patterns and predicates
    picked = trainable_names(net, lambda n, p: not n.endswith("mlp.3.weight"))
    assert picked == ["y_embedder.emb_mlp.3.weight"] + [
        f"dit_backbone.{i}.mlp.3.weight" for i in range(12)
    ]
    assert trainable_names(net, ["dit_backbone", "y_embedder.xdrop"]) == [
        n
        for n in REFERENCE_DIT_NAMES
        if not n.startswith("dit_backbone") and n != "y_embedder.xdrop"
    ]
    with pytest.raises(ValueError, match="no trainable parameter"):
        trainable_names(net, [""])


# -- score formula
# ------------------------------------------------------------------------------------
def test_score_formula_and_switches():
    loss_t = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])  # [n=2, M=3]
    loss_u = torch.tensor([[[2.0, 2.0, 1.0], [0.5, 1.5, 0.5]]])  # [K=1, n=2, M=3]
    eps = 1e-3
    ratio = ((loss_u - loss_t) / (loss_u + loss_t + eps)).mean(-1)
    got = skew_scores(loss_u, loss_t, eps=eps, use_loss_ratio=True, use_same_noise_infer=True)
    torch.testing.assert_close(got, ratio)
    got = skew_scores(loss_u, loss_t, eps=eps, use_loss_ratio=False, use_same_noise_infer=True)
    torch.testing.assert_close(got, (loss_u - loss_t).mean(-1))
    mu, mt = loss_u.mean(-1), loss_t.mean(-1)
    got = skew_scores(loss_u, loss_t, eps=eps, use_loss_ratio=True, use_same_noise_infer=False)
    torch.testing.assert_close(got, (mu - mt) / (mu + mt + eps))
    got = skew_scores(loss_u, loss_t, eps=eps, use_loss_ratio=False, use_same_noise_infer=False)
    torch.testing.assert_close(got, mu - mt)
    # hand value: image 0, ratio: (1/3)·(1/3.001 + 0 + (−2)/4.001)
    assert got.shape == (1, 2)
    r0 = skew_scores(loss_u, loss_t, eps=eps, use_loss_ratio=True, use_same_noise_infer=True)[
        0, 0
    ].item()
    assert r0 == pytest.approx((1 / 3.001 + 0 - 2 / 4.001) / 3, rel=1e-6)
    res = mf.Attribution(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([10, 11, 12]))
    assert res.topk(2).tolist() == [[11, 12]]
    with pytest.raises(ValueError, match="k must be"):
        res.topk(4)
    with pytest.raises(ValueError, match="k must be"):
        res.topk(0)


# -- end to end
# ----------------------------------------------------------------------------------------
def _tiny_problem(K=3, N=40, label_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = TinyEDMNet(C=1, label_dim=label_dim)
    train = torch.rand(N, 1, 6, 6, generator=g) * 2 - 1
    targets = torch.rand(K, 1, 6, 6, generator=g) * 2 - 1
    ytr = torch.randint(0, label_dim, (N,), generator=g) if label_dim else None
    ytg = torch.randint(0, label_dim, (K,), generator=g) if label_dim else None
    return net, train, targets, ytr, ytg


CFG = dict(num_noises=8, lr=1e-3, safety_steps=12)


def test_same_seed_same_scores_bitwise_and_order_independent():
    net, train, targets, ytr, ytg = _tiny_problem()
    cfg = mf.MUCSConfig(**CFG)
    a = mf.attribute(mf.EDMDenoiser(net), train, targets, cfg, ytr, ytg, progress=False)
    b = mf.attribute(mf.EDMDenoiser(net), train, targets, cfg, ytr, ytg, progress=False)
    assert a.scores.shape == (3, 40) and a.scores.dtype == torch.float32
    assert torch.isfinite(a.scores).all()
    assert torch.equal(a.scores, b.scores)
    c = mf.attribute(
        mf.EDMDenoiser(net), train, targets[[2, 0]], cfg, ytr, ytg[[2, 0]], progress=False
    )
    assert torch.equal(c.scores, a.scores[[2, 0]])
    d = mf.attribute(
        mf.EDMDenoiser(net),
        train,
        targets,
        mf.MUCSConfig(**{**CFG, "seed": 46}),
        ytr,
        ytg,
        progress=False,
    )
    assert not torch.equal(d.scores, a.scores)
    for info in a.meta["targets"]:
        assert info["stop"] in ("rule", "cap") and info["steps"] <= 12


def test_switches_change_scores_and_max_steps_is_exact():
    net, train, targets, ytr, ytg = _tiny_problem(K=1)
    base = mf.attribute(
        mf.EDMDenoiser(net),
        train,
        targets,
        mf.MUCSConfig(**CFG, max_steps=2),
        ytr,
        ytg,
        progress=False,
    )
    assert base.meta["targets"][0]["steps"] == 2 and base.meta["targets"][0]["stop"] == "max_steps"
    for switch in (
        {"use_loss_ratio": False},
        {"use_same_noise_infer": False},
        {"use_same_noise_train": True},
        {"t_sched_infer": None},
        {"t_sched_infer": "auto"},
    ):
        other = mf.attribute(
            mf.EDMDenoiser(net),
            train,
            targets,
            mf.MUCSConfig(**CFG, max_steps=2, **switch),
            ytr,
            ytg,
            progress=False,
        )
        assert torch.isfinite(other.scores).all(), switch
        assert not torch.equal(other.scores, base.scores), switch


def test_loss_null_auto_is_near_one_for_zero_output_nets():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 1, 4, 4, generator=g) * 0.5  # E[x²] = σ_d²
    net = TinyEDMNet(zero_out=True)
    from mucs_fast.engine import estimate_loss_null

    cfg = mf.MUCSConfig(batch_size=20)
    Ln = estimate_loss_null(
        mf.EDMDenoiser(net), TensorSource(train), None, cfg, torch.device("cpu")
    )
    assert Ln == pytest.approx(1.0, abs=0.05)


def test_raw_F_form_equals_the_nets_own_preconditioning():
    """EDMDenoiser(raw=True) evaluates F = net.network(...) and lets edm_loss apply c_skip/c_out."""
    from mucs_fast.models import DiT

    torch.manual_seed(0)
    net = DiT((1, 8, 8), label_dim=3, patch_size=2, width=32, depth=2, heads=2, cond_width=16)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert mf.EDMDenoiser(net).raw and not mf.EDMDenoiser(TinyEDMNet()).raw
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.randn(6, 1, 8, 8, generator=g)
    sigma, y = torch.tensor([0.002, 0.3, 1.0, 5.0, 20.0, 80.0]), torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    d_form = mf.EDMDenoiser(net, raw=False).loss(x, eps, sigma, y)
    f_form = mf.EDMDenoiser(net, raw=True).loss(x, eps, sigma, y)
    torch.testing.assert_close(f_form, d_form, rtol=1e-6, atol=0)


def test_unbounded_ablation_changes_the_forget_term():
    net, train, targets, ytr, ytg = _tiny_problem(K=1)
    kw = dict(num_noises=8, lr=1e-2, max_steps=3, loss_null=0.05)  # tiny L_null: the clamp binds
    a = mf.attribute(
        mf.EDMDenoiser(net), train, targets, mf.MUCSConfig(**kw), ytr, ytg, progress=False
    )
    b = mf.attribute(
        mf.EDMDenoiser(net),
        train,
        targets,
        mf.MUCSConfig(**kw, bounded=False),
        ytr,
        ytg,
        progress=False,
    )
    assert max(lf for _, lf in a.meta["targets"][0]["trace"]) <= 0.05 + 1e-7
    assert max(lf for _, lf in b.meta["targets"][0]["trace"]) > 0.05
    assert not torch.equal(a.scores, b.scores)


class _NoisyForward(torch.nn.Module):
    """A net whose forward draws from the global RNG (as the reference's conditional DiT draws a
    label-dropout mask even in eval mode), with a trainable weight the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.args = ()
        self.sigma_data, self.sigma_P_mean, self.sigma_P_std = 0.5, -1.2, 1.2
        self.dit_backbone = torch.nn.ModuleList([torch.nn.Module()])
        self.dit_backbone[0].mlp = torch.nn.Linear(16, 16)
        self.dit_backbone[0].unused = torch.nn.Linear(3, 3)

    def forward(self, x, sigma, y=None, a=None):
        h = self.dit_backbone[0].mlp(x.reshape(x.shape[0], -1)).view_as(x)
        return h + 1e-2 * torch.randn_like(x)


def test_random_draws_in_forward_do_not_depend_on_other_targets_or_the_callers_rng():
    """The global RNG is seeded per block of targets (engine.forward_rng): a target scores the same
    alone or after another one, and the caller's RNG state is left as it was."""
    torch.manual_seed(0)
    den = mf.EDMDenoiser(_NoisyForward())
    x = torch.rand(12, 1, 4, 4) * 2 - 1
    t = torch.rand(2, 1, 4, 4) * 2 - 1
    cfg = mf.MUCSConfig(num_noises=4, lr=1e-2, max_steps=2, loss_null=5.0, targets_per_batch=1)
    torch.manual_seed(123)
    alone = mf.attribute(den, x, t[1:], cfg, progress=False, cache_dir=None)
    state = torch.get_rng_state()
    both = mf.attribute(den, x, t, cfg, progress=False, cache_dir=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(both.scores[1], alone.scores[0]) and alone.scores.abs().max() > 1e-4


def test_a_trainable_weight_the_loss_never_reaches_changes_no_score():
    """Difference from the reference (README): the flat AdamW decays such a weight (torch's AdamW
    skips a parameter whose grad stays None); it does not reach the loss, so every score is the
    one of the same run with it frozen."""
    torch.manual_seed(0)
    den = mf.EDMDenoiser(_NoisyForward())
    x = torch.rand(12, 1, 4, 4) * 2 - 1
    cfg = dict(num_noises=4, lr=1e-2, max_steps=2, loss_null=5.0)
    with_it = mf.attribute(den, x, x[:2], mf.MUCSConfig(**cfg), progress=False, cache_dir=None)
    frozen = mf.MUCSConfig(**cfg, frozen=[*mf.REFERENCE_FROZEN, "unused"])
    without = mf.attribute(den, x, x[:2], frozen, progress=False, cache_dir=None)
    assert "dit_backbone.0.unused.weight" in with_it.meta["resolved"]["trainable"]
    assert "dit_backbone.0.unused.weight" not in without.meta["resolved"]["trainable"]
    assert torch.equal(with_it.scores, without.scores)
