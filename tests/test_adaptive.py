"""Adaptive scoring (MUCSConfig(adaptive_top_k=k), mucs_fast/adaptive.py) against exact scoring on a
briefly trained tiny DiT on 64 sklearn digits (8×8), planted targets (training images)."""

import math

import pytest
import torch
from nets import trained_digits_dit

import mucs_fast as mf
from mucs_fast.adaptive import checkpoints, screen_noises, screening_order, wilson
from mucs_fast.rundir import RunDir

PLANTED = [9, 25, 40, 50]  # training images that rank themselves first on this model
CFG = {
    "num_noises": 32,
    "batch_size": 16,
    "lr": 3e-3,
    "lamb": 1.0,
    "max_steps": 12,
    "targets_per_batch": 2,
    "compile": False,
}
M = CFG["num_noises"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def problem():
    den, x, _ = trained_digits_dit(64)
    return den, x, x[PLANTED]


def run(problem, **over):
    den, x, targets = problem
    return mf.attribute(
        den, x, targets, mf.MUCSConfig(**{**CFG, **over}), progress=False, cache_dir=None
    )


@pytest.fixture(scope="module")
def exact(problem):
    return run(problem)


def test_screening_order_is_a_stratified_permutation():
    level = torch.linspace(80, 0.3, 100)[
        torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ]
    order = screening_order(level)
    assert sorted(order.tolist()) == list(range(100))
    rank = torch.empty(100, dtype=torch.long)
    rank[torch.argsort(level, descending=True)] = torch.arange(100)
    first = sorted(rank[order[:8]].tolist())  # 8 noises: one in every eighth of the σ range
    assert [r * 8 // 100 for r in first] == list(range(8)), first
    assert checkpoints(5) == [1, 2, 4] and checkpoints(1) == []
    lo, hi = wilson(0, 50)
    assert lo == 0 and 0.05 < hi < 0.09
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi


def test_exact_mode_reports_every_score_exact_and_all_pairs(exact):
    N = exact.N
    assert exact.exact.all() and "adaptive" not in exact.meta
    assert exact.meta["pairs_evaluated"] == [N * M] * exact.K
    assert exact.meta["pairs_evaluated_original"] == N * M


def test_a_huge_margin_sets_nothing_aside_and_equals_exact(problem, exact):
    res = run(problem, adaptive_top_k=5, adaptive_margin=1e9)
    assert res.exact.all()
    assert res.meta["pairs_evaluated"] == [res.N * M] * res.K
    assert res.meta["pairs_evaluated_original"] == res.N * M
    scale = exact.scores.abs().max().item()
    assert scale > 1e-3
    assert (res.scores - exact.scores).abs().max().item() <= 1e-5 * scale
    assert torch.equal(res.topk(5), exact.topk(5))


@pytest.mark.parametrize("margin", [3.0, 2.0])
def test_planted_winners_are_never_set_aside(problem, exact, margin):
    assert exact.topk(1)[:, 0].tolist() == PLANTED  # the planted copies are clear winners here
    res = run(problem, adaptive_top_k=3, adaptive_margin=margin, adaptive_audit=0.0)
    assert res.exact[torch.arange(res.K), PLANTED].all()
    assert res.topk(1)[:, 0].tolist() == PLANTED
    assert not res.exact.all()  # it did set images aside
    assert sum(res.meta["pairs_evaluated"]) < 0.8 * res.K * res.N * M
    scale = exact.scores.abs().max().item()
    assert (res.scores - exact.scores)[
        res.exact
    ].abs().max().item() <= 1e-5 * scale  # exact where it says so


def test_pairs_evaluated_and_exact_mask_match_the_work_done(problem):
    # segments of 3 noises: the last of the 32 has 2 (padded to 3 for the forward; 2 are counted)
    res = run(
        problem, adaptive_top_k=3, adaptive_margin=0.5, adaptive_audit=0.0, adaptive_screen_noises=3
    )
    for k, info in enumerate(res.meta["adaptive"]["targets"]):
        n_exact = int(res.exact[k].sum())
        assert (
            info["exact"] == n_exact
            and info["set_aside"] == res.N - n_exact
            and info["audited"] == 0
        )
        seen = sum(int(d) * c for d, c in info["set_aside_at"].items())
        assert sum(info["set_aside_at"].values()) == res.N - n_exact
        assert res.meta["pairs_evaluated"][k] == info["pairs_evaluated"] == n_exact * M + seen
    # L_t only for the (image, segment) pairs some target used: at most every pair, at least the
    # exact ones'
    assert max(res.meta["pairs_evaluated"]) <= res.meta["pairs_evaluated_original"] < res.N * M
    assert res.meta["adaptive"]["top_k"] == 3 and res.meta["adaptive"]["screen_noises"] == 3


def test_the_audit_counts_known_misses(problem, exact):
    """Margin 0 sets aside images that belong in the top-k. Auditing never changes which images are
    set aside (audited images take no part in the bounds), so the p = 0 run names them; with p = 1
    every one of them is audited, and the misses it counts are those that reach the k-th best."""
    k = 8
    blind = run(problem, adaptive_top_k=k, adaptive_margin=0.0, adaptive_audit=0.0)
    audited = run(problem, adaptive_top_k=k, adaptive_margin=0.0, adaptive_audit=1.0)
    assert audited.exact.all()  # every set-aside image was evaluated on the whole bank
    scale = exact.scores.abs().max().item()
    assert (audited.scores - exact.scores).abs().max().item() <= 1e-5 * scale
    total = 0
    for t in range(exact.K):
        aside = ~blind.exact[t]
        kth = torch.topk(exact.scores[t], k).values[-1]
        truth = int((exact.scores[t][aside] >= kth - 1e-6 * scale).sum())
        info = audited.meta["adaptive"]["targets"][t]
        assert info["audited"] == info["set_aside"] == int(aside.sum())
        assert info["audit_misses"] == truth, (t, info)
        lo, hi = info["miss_rate_95"]
        assert lo <= truth / max(1, info["audited"]) <= hi
        total += truth
    assert total >= 1  # the case has misses to find
    # the blind run's top-k misses exactly those
    recall = [
        len(set(blind.topk(k)[t].tolist()) & set(exact.topk(k)[t].tolist())) for t in range(exact.K)
    ]
    assert sum(recall) < exact.K * k


def test_resume_mid_way_gives_the_uninterrupted_result(problem, tmp_path, monkeypatch):
    over = {"adaptive_top_k": 3, "adaptive_audit": 0.25, "targets_per_batch": 1}
    whole = run(problem, **over)
    den, x, targets = problem
    cfg = mf.MUCSConfig(**{**CFG, **over})
    save = RunDir.save_target
    calls = []

    def save_then_crash(self, k, *a, **kw):
        save(self, k, *a, **kw)
        calls.append(k)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_target", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        mf.attribute(den, x, targets, cfg, progress=False, cache_dir=None, run_dir=tmp_path / "r")
    monkeypatch.setattr(RunDir, "save_target", save)
    res = mf.attribute(
        den, x, targets, cfg, progress=False, cache_dir=None, run_dir=tmp_path / "r", resume=True
    )
    assert torch.equal(res.exact, whole.exact)
    assert (res.scores - whole.scores).abs().max().item() <= 1e-6 * whole.scores.abs().max().item()
    assert res.meta["adaptive"]["targets"] == whole.meta["adaptive"]["targets"]
    assert res.meta["pairs_evaluated"] == whole.meta["pairs_evaluated"]
    loaded = mf.Attribution.load(tmp_path / "r")
    assert torch.equal(loaded.exact, res.exact) and not loaded.exact.all()


def test_bad_adaptive_settings_are_clear_errors(problem):
    with pytest.raises(ValueError, match="adaptive_top_k needs the shared bank"):
        mf.MUCSConfig(adaptive_top_k=5, use_same_noise_infer=False)
    with pytest.raises(ValueError, match="adaptive_top_k"):
        mf.MUCSConfig(adaptive_top_k=0)
    with pytest.raises(ValueError, match="adaptive_screen_noises"):
        mf.MUCSConfig(adaptive_top_k=5, adaptive_screen_noises=1)
    with pytest.raises(ValueError, match="adaptive_audit"):
        mf.MUCSConfig(adaptive_top_k=5, adaptive_audit=1.5)
    with pytest.raises(ValueError, match="adaptive_top_k=65 exceeds the training set size N=64"):
        run(problem, adaptive_top_k=65)
    assert math.isfinite(mf.MUCSConfig(adaptive_top_k=5).adaptive_margin)


def test_the_adaptive_defaults_are_pinned():
    """The documented defaults (README, API.md): margin z = 3.0, a 2 % audit, ⌈M/16⌉ screening
    noises per segment (at least 2, at most M); exact scoring unless adaptive_top_k is set."""
    cfg = mf.MUCSConfig()
    assert cfg.adaptive_top_k is None
    assert (cfg.adaptive_margin, cfg.adaptive_audit, cfg.adaptive_screen_noises) == (
        3.0,
        0.02,
        None,
    )
    assert [screen_noises(M, None) for M in (1, 16, 33, 100)] == [1, 2, 3, 7]
