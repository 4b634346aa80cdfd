"""End to end at demo scale on the CPU: per-target time of `attribute` for K targets at once.

Digits-shaped data (1×16×16, N = 600 — a third of digits, to keep the run short; per-target
time scales linearly with N), the demo DiT (patch 4, width 64, depth 4; random
"trained" weights: throughput does not depend on what the weights are), M = 100, a fixed number of
unlearning steps so every K does the same work. All `TARGETS` targets are attributed in blocks of
K; K = 1 is the plain one-target path. K ∈ {1, 4, 8} run eager (compile=False) so that K is the
only difference; "8c" is K = 8 with the scoring pass torch.compile'd (what compile="auto" does from
100,000 image·noise pairs per pass, e.g. the full digits set at M = 100), compile time included.
Scores of every case must equal K = 1's (max abs diff ≤ 1e-6) — asserted in the same run, before any
time is reported.

    pytest benches/bench_attribute.py --benchmark-enable          (the real measurement, ~10 min)
    pytest benches/bench_attribute.py --benchmark-disable          (CI: a tiny instance, seconds)
"""

import time

import pytest
import torch

import mucs_fast as mf
from mucs_fast.models import DiT

FULL = dict(N=600, M=100, targets=8, steps=10)
TINY = dict(N=48, M=4, targets=4, steps=2)
_scores = {}


def _problem(scale):
    torch.manual_seed(0)
    net = DiT(
        (1, 16, 16), label_dim=10, patch_size=4, width=64, depth=4, heads=4, cond_width=64
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    train = torch.rand(scale["N"], 1, 16, 16, generator=g) * 2 - 1
    targets = torch.rand(scale["targets"], 1, 16, 16, generator=g) * 2 - 1
    ytr = torch.randint(0, 10, (scale["N"],), generator=g)
    ytg = torch.arange(scale["targets"]) % 10
    return mf.EDMDenoiser(net, train_lr=2e-3), train, targets, ytr, ytg


@pytest.mark.parametrize("case", ["1", "4", "8", "8c"])
def test_attribute_per_target_time(benchmark, case):
    scale = TINY if benchmark.disabled else FULL
    K, compiled = min(int(case.rstrip("c")), scale["targets"]), case.endswith("c")
    den, train, targets, ytr, ytg = _problem(scale)
    cfg = mf.MUCSConfig(
        num_noises=scale["M"],
        max_steps=scale["steps"],
        targets_per_batch=K,
        batch_size=min(100, scale["N"]),
        compile=compiled,
    )
    seconds = []

    def run():
        t0 = time.perf_counter()
        res = mf.attribute(den, train, targets, cfg, ytr, ytg, progress=False, cache_dir=None)
        seconds.append(time.perf_counter() - t0)
        return res

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    _scores[case] = res.scores
    if "1" in _scores and case != "1":
        assert (res.scores - _scores["1"]).abs().max().item() <= 1e-6, case
    t = res.meta["timings"]
    benchmark.extra_info.update(
        {
            "K": K,
            "targets": scale["targets"],
            "N": scale["N"],
            "M": scale["M"],
            "steps": scale["steps"],
            "seconds_per_target": seconds[-1] / scale["targets"],
            "loss_t_s": t["loss_t"],
            "unlearn_s_per_target": t["unlearn"] / scale["targets"],
            "score_s_per_target": t["score"] / scale["targets"],
            "compiled": res.meta["compiled"],
            "threads": torch.get_num_threads(),
        }
    )
