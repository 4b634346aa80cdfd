"""Tests that pin MUCS itself (spec/MUCS.md), each built to fail on a deliberately broken engine:
objective sign, the clamp, the score's direction, noise consistency, the stop rule.

The step-for-step comparisons are against tests/oracle.py, a plain loop that shares no code with
mucs_fast. Everything is tiny: the trained model is a 2-block DiT on 32 sklearn digits (8×8).
"""

import math

import oracle
import pytest
import torch
from nets import TinyEDMNet, trained_digits_dit

import mucs_fast as mf
from mucs_fast.data import TensorSource
from mucs_fast.params import trainable_names
from mucs_fast.unlearn import RetainStream, unlearn_batched


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for this module: the trained model and the planted run are then the same on every
    machine (the thread count changes reduction order); ops this small gain nothing from threads
    and, on busy shared cores, lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Net64(TinyEDMNet):
    """TinyEDMNet for float64 runs: training σ is drawn in float32 (torch's default), and the net's
    σ embedding must match its float64 weights."""

    def forward(self, x, sigma, y=None, a=None):
        return super().forward(x, sigma.to(x.dtype), y)


def _problem(label_dim, N=10, K=3, seed=1, dtype=torch.float64):
    torch.manual_seed(0)
    net = Net64(C=1, label_dim=label_dim).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(N, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    x_hats = (torch.rand(K, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    y = y_hats = None
    if label_dim:
        y = torch.nn.functional.one_hot(torch.arange(N) % label_dim, label_dim).to(dtype)
        y_hats = torch.nn.functional.one_hot(torch.arange(K) % label_dim, label_dim).to(dtype)
    return net, x, y, x_hats, y_hats


def _flat(trace):
    return [v for pair in trace for v in pair]


def _oracle_run(problem, names, k, cfg, loss_null, lr, bounded=True):
    net, x, y, x_hats, y_hats = problem
    return oracle.unlearn(
        net,
        names,
        x,
        y,
        x_hats[k],
        None if y_hats is None else y_hats[k],
        g_retain=torch.Generator().manual_seed(100 + k),
        g_noise=torch.Generator().manual_seed(200 + k),
        loss_null=loss_null,
        lr=lr,
        B=cfg.B,
        lamb=cfg.lamb,
        tolerance=cfg.tolerance,
        max_steps=cfg.max_steps,
        safety_steps=cfg.safety_steps,
        bounded=bounded,
    )


def _engine_and_oracle(label_dim, K, cfg, loss_null, lr):
    problem = net, x, y, x_hats, y_hats = _problem(label_dim, K=K)
    names = trainable_names(net, mf.REFERENCE_FROZEN)
    N, B = x.shape[0], cfg.B
    weights, infos = unlearn_batched(
        mf.EDMDenoiser(net),
        net,
        names,
        TensorSource(x),
        y,
        x_hats,
        y_hats,
        cfg=cfg,
        loss_null=loss_null,
        lr=lr,
        retains=[RetainStream(N, B, torch.Generator().manual_seed(100 + k)) for k in range(K)],
        generators=[torch.Generator().manual_seed(200 + k) for k in range(K)],
    )
    runs = [_oracle_run(problem, names, k, cfg, loss_null, lr) for k in range(K)]
    return problem, names, weights, infos, runs


# -- a. unlearning == the oracle, step for step ---------------------------------------------------
@pytest.mark.parametrize("label_dim,K", [(0, 1), (3, 3)])
@pytest.mark.parametrize(
    "loss_null", [50.0, 1.0]
)  # 50: the clamp never binds; 1.0: it binds on some samples
def test_unlearning_matches_oracle_step_for_step(label_dim, K, loss_null):
    S = 4
    cfg = mf.MUCSConfig(batch_size=4, max_steps=S)
    problem, names, weights, infos, runs = _engine_and_oracle(label_dim, K, cfg, loss_null, lr=1e-2)
    # An unconditional TinyEDMNet never uses y_embedder: it gets no gradient, so torch's AdamW (the
    # oracle) skips it while a flat-buffer AdamW only decays it; neither changes the model's
    # outputs.
    compared = [n for n in names if label_dim or not n.startswith("y_embedder")]
    p_0 = dict(problem[0].named_parameters())
    for k, (net_u, trace, steps, stop) in enumerate(runs):
        assert (infos[k].steps, infos[k].stop) == (steps, stop) == (S, "max_steps")
        assert _flat(infos[k].trace) == pytest.approx(_flat(trace), rel=1e-10, abs=0)
        p_u = dict(net_u.named_parameters())
        for n in compared:
            torch.testing.assert_close(weights[n][k], p_u[n].detach(), rtol=1e-10, atol=1e-13)
            assert not torch.allclose(p_u[n], p_0[n], rtol=1e-3, atol=0), (
                n
            )  # the steps really moved it
    if loss_null == 1.0:  # the bound must be active here, or this case would not pin the clamp
        unbounded = _oracle_run(problem, names, 0, cfg, loss_null, lr=1e-2, bounded=False)[1]
        assert max(abs(a - b) for a, b in zip(_flat(unbounded), _flat(runs[0][1]))) > 1e-3


def test_unlearning_stop_rule_matches_oracle():
    # L_null a little above the targets' starting forget losses (≈ 1.4): each reaches the goal on
    # its
    # own clock (11, 11 and 35 steps here).
    cfg = mf.MUCSConfig(batch_size=4, safety_steps=60)
    _, names, weights, infos, runs = _engine_and_oracle(3, 3, cfg, loss_null=1.6, lr=5e-2)
    steps = []
    for k, (net_u, trace, n_steps, stop) in enumerate(runs):
        assert stop == "rule" and 1 <= n_steps < 60
        assert (infos[k].steps, infos[k].stop) == (n_steps, stop)
        assert _flat(infos[k].trace) == pytest.approx(_flat(trace), rel=1e-10, abs=0)
        assert trace[-1][1] >= 0.95 * 1.6 > max(lf for _, lf in trace[:-1])
        p_u = dict(net_u.named_parameters())
        for n in names:
            torch.testing.assert_close(weights[n][k], p_u[n].detach(), rtol=1e-10, atol=1e-13)
        steps.append(n_steps)
    assert len(set(steps)) > 1, steps  # targets stop on their own clocks


# -- the whole pipeline against the oracle
# ----------------------------------------------------------
def _engine_streams(seed, target_fp):
    """The engine's per-target generators (mucs_fast.engine._streams). Coupled to how the engine
    derives its seeds on purpose: it lets one test compare mf.attribute with the oracle end to end;
    change it with the engine's seeding."""
    from mucs_fast._io import derive_seed

    return (
        torch.Generator().manual_seed(derive_seed(seed, "retain", target_fp)),
        torch.Generator().manual_seed(derive_seed(seed, "noise", target_fp)),
    )


def _engine_bank(seed, M, chw, t_sched=0.7):
    from mucs_fast._io import derive_seed

    num = int(M / t_sched)  # Karras levels, the first M (largest) kept
    s = torch.linspace(0, 1, num)
    sigma = (80 ** (1 / 7) + s * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    eps = torch.randn((M, *chw), generator=torch.Generator().manual_seed(derive_seed(seed, "bank")))
    return eps, sigma[:M]


@pytest.mark.parametrize("targets_per_batch", [1, 3])
def test_attribute_matches_oracle_end_to_end(targets_per_batch):
    net, x, y, x_hats, y_hats = _problem(3, N=12, K=3, dtype=torch.float32)
    cfg = mf.MUCSConfig(
        num_noises=8,
        batch_size=4,
        lr=1e-2,
        max_steps=3,
        loss_null=1.0,
        targets_per_batch=targets_per_batch,
    )
    res = mf.attribute(
        mf.EDMDenoiser(net),
        x,
        x_hats,
        cfg,
        y.argmax(1),
        y_hats.argmax(1),
        progress=False,
        cache_dir=None,
    )
    bank_eps, bank_sigma = _engine_bank(cfg.seed, cfg.num_noises, (1, 4, 4))
    names = res.meta["resolved"]["trainable"]
    for k in range(3):
        info = res.meta["targets"][k]
        g_retain, g_noise = _engine_streams(cfg.seed, info["target"])
        net_u, trace, _, _ = oracle.unlearn(
            net,
            names,
            x,
            y,
            x_hats[k],
            y_hats[k],
            g_retain=g_retain,
            g_noise=g_noise,
            loss_null=1.0,
            lr=1e-2,
            B=4,
            max_steps=3,
        )
        assert _flat(info["trace"]) == pytest.approx(_flat(trace), rel=1e-5)
        want = oracle.scores(net, net_u, x, y, bank_eps, bank_sigma)
        assert want.abs().max() > 1e-2
        torch.testing.assert_close(
            res.scores[k].double(), want, rtol=0, atol=1e-4 * want.abs().max().item()
        )


def test_identity_unlearning_scores_zero():
    """A copy that has not moved has L_u == L_t on every (image, noise) pair only when both models
    see the same noise: any inconsistency between the two passes shows up as non-zero scores."""
    net, x, y, x_hats, y_hats = _problem(3, N=12, K=3, dtype=torch.float32)
    for tpb in (1, 3):
        cfg = mf.MUCSConfig(
            num_noises=8, batch_size=4, lr=1e-12, max_steps=1, loss_null=1.0, targets_per_batch=tpb
        )
        res = mf.attribute(
            mf.EDMDenoiser(net),
            x,
            x_hats,
            cfg,
            y.argmax(1),
            y_hats.argmax(1),
            progress=False,
            cache_dir=None,
        )
        assert res.scores.abs().max() < 1e-5, tpb


# -- a briefly trained tiny DiT on 32 digits
# --------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model():
    den, x, info = trained_digits_dit(32)
    assert sum(info["loss"][-20:]) / 20 < 0.9  # well below L_null ≈ 1.78: it has learned the data
    return den, x


PLANTED = [3, 9, 17, 20, 25, 30]
# λ = 1 and lr = 3e-3 (not the reference's 0.2 and train_lr / 10) so that the copies reach the
# stop rule in tens of steps on this tiny model.
PLANTED_CFG = {"num_noises": 16, "batch_size": 16, "lr": 3e-3, "lamb": 1.0}


@pytest.fixture(scope="module")
def planted_run(digits_model):
    den, x = digits_model
    cfg = mf.MUCSConfig(**PLANTED_CFG, safety_steps=150)
    return mf.attribute(den, x, x[PLANTED], cfg, progress=False, cache_dir=None)


# -- b. training images used as targets rank themselves first ---------------------------------
def test_planted_copies_rank_themselves_first(planted_run):
    top1 = planted_run.topk(1)[:, 0].tolist()
    hits = sum(t == i for t, i in zip(top1, PLANTED))
    assert hits >= 5, (top1, PLANTED)
    own = planted_run.scores[torch.arange(len(PLANTED)), PLANTED]
    assert (own > 0).all(), own  # forgetting the target raised its own loss


# -- c. the stop rule ends a real run ----------------------------------------------------------
def test_stop_rule_ends_every_target(planted_run):
    Ln = planted_run.meta["resolved"]["loss_null"]
    for info in planted_run.meta["targets"]:
        assert info["stop"] == "rule" and info["steps"] <= 100, (info["stop"], info["steps"])
        assert info["trace"][-1][1] >= 0.95 * Ln > max(lf for _, lf in info["trace"][:-1])
    assert planted_run.meta["flagged"] == []


# -- h. batched == sequential, on scores that are not ≈ 0 ------------------------------------
def test_batched_equals_sequential_on_nonzero_scores(digits_model):
    den, x = digits_model
    targets = x[PLANTED[:3]]
    runs = [
        mf.attribute(
            den,
            x,
            targets,
            mf.MUCSConfig(**PLANTED_CFG, max_steps=10, targets_per_batch=tpb),
            progress=False,
            cache_dir=None,
        )
        for tpb in (1, 3)
    ]
    seq, bat = runs[0].scores, runs[1].scores
    top = seq.abs().max().item()
    assert 1e-2 < top < 1, top
    torch.testing.assert_close(bat, seq, rtol=0, atol=1e-4 * top)


# -- f. bf16 scoring on the CPU -----------------------------------------------------------------
def test_bf16_scores_track_fp32_and_losses_accumulate_in_fp32(digits_model):
    den, x = digits_model
    kw = {**PLANTED_CFG, "max_steps": 10}
    targets = x[PLANTED[:2]]
    s32, s16 = (
        mf.attribute(
            den, x, targets, mf.MUCSConfig(**kw, precision=p), progress=False, cache_dir=None
        ).scores
        for p in ("fp32", "bf16")
    )
    assert s16.dtype == torch.float32 and torch.isfinite(s16).all()
    assert not torch.equal(s16, s32)  # bf16 really ran
    for k in range(2):
        r = torch.corrcoef(torch.stack([s16[k], s32[k]]))[0, 1]
        assert r > 0.99, r
    assert s16.argmax(1).tolist() == s32.argmax(1).tolist()

    g = torch.Generator().manual_seed(0)
    eps, sigma = torch.randn(x.shape, generator=g), torch.rand(x.shape[0], generator=g) * 10 + 0.1
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        D = den.net(x + sigma.view(-1, 1, 1, 1) * eps, sigma)  # bf16 matmuls, as the scoring pass
        L = den.loss(x, eps, sigma)
    # the net's output in bf16, its squared error summed in fp32: rounding of the sum alone
    want = lam * ((D.float() - x) ** 2).mean((1, 2, 3))
    assert L.dtype == torch.float32
    torch.testing.assert_close(L, want, rtol=1e-5, atol=0)


# -- g. lr = train_lr / lr_factor -------------------------------------------------------------
def test_lr_defaults_to_train_lr_over_lr_factor():
    net, x, y, x_hats, y_hats = _problem(3, N=12, K=1, dtype=torch.float32)
    kw = {"num_noises": 8, "batch_size": 4, "max_steps": 3, "loss_null": 1.0}

    def run(den, **over):
        return mf.attribute(
            den,
            x,
            x_hats,
            mf.MUCSConfig(**{**kw, **over}),
            y.argmax(1),
            y_hats.argmax(1),
            progress=False,
            cache_dir=None,
        )

    X = 0.1
    default = run(mf.EDMDenoiser(net, train_lr=X), lr=None)
    assert default.meta["resolved"]["lr"] == pytest.approx(X / 10)
    assert torch.equal(default.scores, run(mf.EDMDenoiser(net), lr=X / 10).scores)
    assert not torch.allclose(
        default.scores, run(mf.EDMDenoiser(net), lr=X).scores, rtol=0.05, atol=0
    )
    assert torch.equal(
        run(mf.EDMDenoiser(net, train_lr=X), lr=None, lr_factor=4.0).scores,
        run(mf.EDMDenoiser(net), lr=X / 4).scores,
    )
    with pytest.raises(ValueError, match=r"MUCSConfig\.lr is None.*training learning rate"):
        run(mf.EDMDenoiser(net), lr=None)


# -- d. t_sched = "auto" on images with known distances
# ----------------------------------------------
def _karras_fraction_above(threshold, num):
    """Fraction of the Karras grid σ_i (s_i = i/(num − 1)) above `threshold`, from the closed form:
    σ_i > t ⟺ s_i < (σ_max^{1/ρ} − t^{1/ρ}) / (σ_max^{1/ρ} − σ_min^{1/ρ})."""
    r = 1 / 7
    s_star = (80**r - threshold**r) / (80**r - 0.002**r)
    return (math.floor(s_star * (num - 1)) + 1) / num


def test_t_sched_auto_on_known_distances():
    from mucs_fast.noise import estimate_t_sched

    D = 16  # 1×4×4 images
    basis = torch.eye(D).view(D, 1, 4, 4)
    # a·√(D/2)·e_i: every pair at normalized distance ‖x_i − x_j‖/√D = a, whatever the shuffling
    grid = torch.tensor([4.0, 2.0, 1.0, 0.6, 0.4, 0.2, 0.1, 0.05])
    for a, want in [(1.0, 4 / 8), (0.3, 6 / 8)]:  # threshold a/2: 0.5 → 4 levels above; 0.15 → 6
        x = a * math.sqrt(D / 2) * basis
        for B in (4, 16):
            got = estimate_t_sched(TensorSource(x), grid, B, torch.Generator().manual_seed(0))
            assert got == pytest.approx(want), (a, B)

    # The 5 % quantile, neither the minimum nor the median: 10 near-duplicate pairs among 20 images,
    # one at distance 0.02, nine at 0.1, every other pair ≥ 1. In one batch (B = N) that is 2 + 18
    # of
    # the 380 ordered pairs; entry int(0.05·380) = 19 of the sorted distances is 0.1 → threshold
    # 0.05.
    n, D2 = 10, 64
    delta = torch.full((n, 1), 0.1)
    delta[0] = 0.02
    base = math.sqrt(D2 / 2) * torch.eye(D2)[:n]
    dup = base + delta * math.sqrt(D2) * torch.eye(D2)[n : 2 * n]
    x = torch.cat([base, dup]).view(2 * n, 1, 8, 8)
    full = torch.linspace(0, 1, 100)
    full = (80 ** (1 / 7) + full * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    got = estimate_t_sched(TensorSource(x), full, 2 * n, torch.Generator().manual_seed(0))
    # s* = (80^{1/7} − 0.05^{1/7}) / (80^{1/7} − 0.002^{1/7}) = 0.8353 → levels i ≤ 82 of 0..99
    assert got == pytest.approx(_karras_fraction_above(0.05, 100)) == pytest.approx(0.83)

    # end to end: the resolved fraction of the 8-level grid of num_noises = 8 (threshold 1/2 → 5 of
    # 8)
    x = math.sqrt(D / 2) * basis
    res = mf.attribute(
        mf.EDMDenoiser(TinyEDMNet()),
        x,
        x[:1],
        mf.MUCSConfig(
            num_noises=8, batch_size=4, lr=1e-3, max_steps=1, loss_null=1.0, t_sched_infer="auto"
        ),
        progress=False,
        cache_dir=None,
    )
    assert (
        res.meta["resolved"]["t_sched_infer"]
        == pytest.approx(_karras_fraction_above(0.5, 8))
        == 5 / 8
    )


# -- e. the VP loss is the model's own ε-prediction loss
# ---------------------------------------------
def test_vp_loss_is_the_epsilon_prediction_loss():
    from mucs_fast.models.unet import ddpm_scheduler, tiny_unet

    torch.manual_seed(0)
    model = tiny_unet(1, 8).eval()
    for p in model.parameters():  # diffusers zero-initializes the output conv: make ε_θ non-trivial
        torch.nn.init.normal_(p, std=0.05)
    sched = ddpm_scheduler(100)
    den = mf.DiffusersDenoiser(model, sched)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(x.shape, generator=g)
    t = torch.tensor([0, 10, 50, 90, 99])
    with torch.no_grad():
        L = den.loss(x, eps, t)
        x_t = sched.add_noise(x, eps, t)
        eps_hat = model(x_t, t).sample
    want = ((eps - eps_hat) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(L, want, rtol=1e-5, atol=0)
    assert want.std() > 0 and want.min() > 0
    # the same number as the D-form (the spec's equivalence): λ = 1/σ_t² with σ_t² = (1 − ᾱ_t)/ᾱ_t,
    # denoised x̂₀ = (x_t − √(1 − ᾱ_t)·ε_θ)/√ᾱ_t
    acp = sched.alphas_cumprod[t].view(-1, 1, 1, 1).double()
    x0 = (x_t.double() - (1 - acp).sqrt() * eps_hat.double()) / acp.sqrt()
    d_form = (acp / (1 - acp)).view(-1) * ((x0 - x.double()) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(L.double(), d_form, rtol=1e-4, atol=0)
