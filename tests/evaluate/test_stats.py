"""The protocol's statistics: AUC, Ratio, p-values, overlaps, rank averaging."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from mucs_fast.evaluate import stats


def brute_auc(m, r):
    """P(random > method) + ½ P(tie), over all pairs."""
    pairs = list(itertools.product(m, r))
    return sum((b > a) + 0.5 * (b == a) for a, b in pairs) / len(pairs)


def test_auc_identical_groups_is_half_and_matches_pair_counting():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(15, generator=g)
    assert stats.auc(a, a.clone()) == 0.5
    assert stats.auc(torch.ones(7), torch.ones(9)) == 0.5
    m, r = torch.rand(11, generator=g), torch.rand(13, generator=g) + 0.2
    m[3] = r[5]  # a tie
    assert math.isclose(stats.auc(m, r), brute_auc(m.tolist(), r.tolist()), rel_tol=1e-12)
    assert stats.auc(torch.zeros(4), torch.ones(4)) == 1.0  # the method's images all changed more
    assert stats.auc(torch.ones(4), torch.zeros(4)) == 0.0


def test_ratio_identical_pre_post_is_zero():
    # pre == post everywhere: similarity 1 (or distance 0) for every image and method
    for distance, value in ((False, 1.0), (True, 0.0)):
        r, ci = stats.ratio(torch.full((20,), value), torch.full((20,), value), distance)
        assert r == 0.0 and ci == 0.0


def test_ratio_closed_form_and_interval():
    sim_r = torch.tensor([0.8, 1.0, 1.2])  # median 1.0
    sim_m = torch.tensor([0.5, 0.7, 0.9, 1.1])
    vals = 100 * (sim_m.double() / 1.0 - 1)
    r, ci = stats.ratio(sim_m, sim_r)
    assert math.isclose(r, float(vals.mean()), rel_tol=1e-12)
    assert math.isclose(ci, 1.98 * float(vals.std()) / 2.0, rel_tol=1e-12)  # std with ddof 1, √4
    # median clamped at 0.01, as the reference
    r, _ = stats.ratio(torch.tensor([0.02]), torch.tensor([0.0, 0.001, 0.002]))
    assert math.isclose(r, 100.0, rel_tol=1e-6)  # float32 input
    # negated distances: twice random's median distance reads as −100 %
    r, _ = stats.ratio(-torch.tensor([2.0, 2.0]), -torch.tensor([1.0, 1.0, 1.0]), distance=True)
    assert math.isclose(r, -100.0, rel_tol=1e-12)
    r, _ = stats.ratio(-torch.tensor([0.5]), -torch.tensor([1.0]), distance=True)
    assert math.isclose(r, 50.0, rel_tol=1e-12)


def test_mannwhitney_matches_scipy_and_handles_ties():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(12, generator=g), torch.rand(10, generator=g) + 0.3
    for alt in ("less", "two-sided"):
        ref = sps.mannwhitneyu(a.double().numpy(), b.double().numpy(), alternative=alt).pvalue
        assert math.isclose(stats.mannwhitney_p(a, b, alt), float(ref), rel_tol=1e-12)
    assert stats.mannwhitney_p(a, b, "less") < 0.05  # a is stochastically smaller
    assert stats.mannwhitney_p(torch.ones(5), torch.ones(5), "two-sided") == 1.0
    assert math.isnan(stats.mannwhitney_p(torch.ones(0), torch.ones(5), "less"))


def test_group_stats_fields():
    d = stats.group_stats(torch.rand(8), torch.rand(8), False, "targets")
    assert set(d) == {"auc", "ratio", "ratio_ci", "p", "n"} and d["n"] == 8


def test_overlaps_union_and_mean_ci():
    assert stats.overlap([1, 2, 3], [3, 4]) == 0.5
    assert stats.overlap([1, 2], [1, 2, 3, 4]) == 1.0
    topk = torch.tensor([[0, 1, 2], [2, 3, 4], [0, 1, 2]])
    assert stats.within_overlaps(topk) == pytest.approx([1 / 3, 1.0, 1 / 3])
    assert stats.cross_overlaps(topk, topk.flip(0)) == pytest.approx([1.0, 1.0, 1.0])
    assert stats.union(topk).tolist() == [0, 1, 2, 3, 4]
    mu, ci = stats.mean_ci([1.0, 3.0])
    assert mu == 2.0 and math.isclose(ci, 1.98 * math.sqrt(2) / math.sqrt(2))


def test_rank_average():
    a = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    r = stats.rank_average([a, b])
    assert torch.allclose(r, torch.tensor([[0.5, 1 / 3, 2 / 3, 0.5]]))
    assert torch.allclose(stats.rank_average([a]), torch.tensor([[1.0, 1 / 3, 2 / 3, 0.0]]))
    with pytest.raises(ValueError, match="shapes"):
        stats.rank_average([a, torch.zeros(2, 4)])
    assert np.isfinite(stats.rank_average([torch.zeros(2, 5), torch.rand(2, 5)]).numpy()).all()
