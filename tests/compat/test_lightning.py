"""The drop-in inside a real `lightning.Fabric` built as the reference's attrib.py builds it
(DDPStrategy(broadcast_buffers=False), fabric.launch(); CPU accelerator, gloo), one process and
two: run() works on the engine and on the replay, and the replay (fast=False) reads its resident
data in exactly the order that real DataLoaders set up by that Fabric give the reference's loop
(Lightning swaps in a DistributedSampler: its seed, its epoch per iteration, each rank's padded
shard). The flow runs as a script (tests/compat/lightning_flow.py): `fabric.launch()` starts a
process group and, for two devices, re-runs the script as rank 1."""

import os
import subprocess
import sys

import lightning  # noqa: F401  (the test extra; these tests must not be skipped in CI)
import pytest
import torch
from lightning_flow import STEPS, B, K, M, N
from nets import TinyEDMNet
from refkit import FakeFabric, TensorDataset, Wrapped, make_conf, toy_data

from mucs_fast.compat.reference import Attributor

FLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightning_flow.py")


def _flow(tmp_path, devices: int, *extra) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(k, None)  # Lightning picks a free port and sets the ranks itself
    proc = subprocess.run(
        [sys.executable, FLOW, "--devices", str(devices), "--out", str(tmp_path), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def _fast_without_lightning():
    """The same run() with the stand-in Fabric (no process group): the engine's result."""
    ids, x, y = toy_data(N=N, C=1, H=4, label_dim=3)
    torch.manual_seed(2)
    net = TinyEDMNet(C=1, label_dim=3, width=8)
    att = Attributor(
        make_conf(),
        FakeFabric(),
        Wrapped(net),
        "/nonexistent/job--post",
        num_noises=M,
        batch_size=B,
        max_steps=STEPS,
        loss_null="auto",
        progress=False,
        targets_per_batch=2,
    )
    dl = torch.utils.data.DataLoader(TensorDataset(ids, x, y), batch_size=8)
    return att.run(dl, x[:K] * 0.7, y[:K], {}, 5), ids


def _on(idx_from, scores_from, idx_to):
    """scores_from's columns at the ids idx_to."""
    pos = {int(i): j for j, i in enumerate(idx_from.tolist())}
    return scores_from[:, [pos[int(i)] for i in idx_to.tolist()]]


def test_one_process(tmp_path):
    (r,) = _flow(tmp_path, 1)
    assert r["world"] == 1 and r["sampler"] == "DistributedSampler"  # DDP swaps it, even alone
    # the replay reads what the Fabric's own loaders give the reference's loop, bit for bit
    torch.testing.assert_close(r["slow"]["scores"], r["loaders"]["scores"], rtol=0, atol=0)
    assert torch.equal(r["slow"]["all_idx"], r["loaders"]["all_idx"])
    assert r["slow"]["loss_null"] == r["loaders"]["loss_null"]
    (top, all_idx, scores), ids = _fast_without_lightning()
    assert torch.equal(r["fast"]["all_idx"], ids) and torch.equal(r["slow"]["all_idx"], ids)
    torch.testing.assert_close(r["fast"]["scores"], scores, rtol=0, atol=0)
    assert torch.equal(r["fast"]["top"], top)
    assert r["slow"]["scores"].shape == (K, N) and torch.isfinite(r["slow"]["scores"]).all()


def test_two_processes_gloo(tmp_path):
    ranks = _flow(tmp_path, 2)
    (_, _, one), ids = _fast_without_lightning()
    for r in ranks:
        assert r["world"] == 2 and r["sampler"] == "DistributedSampler"
        # each rank of the reference's loop reads its own padded shard ...
        shard = r["loaders"]["all_idx"]
        assert len(shard) == -(-N // 2)
        # ... and the replay, which returns every rank's shard on every rank, has that rank's
        # scores bit for bit on it
        got = _on(r["slow"]["all_idx"], r["slow"]["scores"], shard)
        torch.testing.assert_close(got, r["loaders"]["scores"], rtol=0, atol=0)
        assert r["slow"]["loss_null"] == r["loaders"]["loss_null"]  # each rank: its own shard
        assert torch.equal(r["slow"]["all_idx"], ids)
        # the engine splits the work over the ranks; the scores do not depend on their number
        torch.testing.assert_close(r["fast"]["scores"], one, rtol=0, atol=0)
    a, b = ranks
    torch.testing.assert_close(a["slow"]["scores"], b["slow"]["scores"], rtol=0, atol=0)
    assert not torch.equal(a["loaders"]["all_idx"], b["loaders"]["all_idx"])  # two shards
    assert a["loaders"]["loss_null"] != b["loaders"]["loss_null"]


def test_replay_without_a_distributed_strategy_draws_like_torch():
    """A Fabric whose setup_dataloaders keeps the loaders (a single-device strategy, the
    stand-in): the replay's unlearning batches come from RandomSampler's global-RNG seed."""
    ids, x, y = toy_data(N=N, C=1, H=4, label_dim=3)
    ds = TensorDataset(ids, x, y)
    from mucs_fast.compat.replay import reference_loaders

    torch.manual_seed(7)
    _, dl = reference_loaders(FakeFabric(), ds, (ids, x, y), 8, 5, None)
    got = [b[0] for _ in range(2) for b in dl]
    after = torch.rand(2)
    torch.manual_seed(7)
    real = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True, drop_last=True)
    want = [b[0] for _ in range(2) for b in real]
    assert torch.equal(after, torch.rand(2))
    assert len(got) == len(want) == 2 * (N // 5)
    assert all(torch.equal(u, v) for u, v in zip(got, want))
    assert not torch.equal(got[0], got[N // 5])  # two iterations, two permutations


@pytest.mark.parametrize("shuffle", [True, False])
def test_replay_loader_follows_a_fabric_that_shards(shuffle):
    """A Fabric that swaps in a DistributedSampler (rank 1 of 3, seed 11), as Lightning's
    distributed strategies do: the replay's loader yields that rank's shard, a new permutation
    per iteration (the epoch), and draws only the iterator's base seed from the global RNG."""
    from mucs_fast.compat.replay import ResidentLoader

    ids, x, y = toy_data(N=N, C=1, H=4, label_dim=3)
    ds = TensorDataset(ids, x, y)

    def sharded(dl_of):
        sampler = torch.utils.data.DistributedSampler(
            dl_of.dataset, num_replicas=3, rank=1, shuffle=shuffle, seed=11
        )
        return torch.utils.data.DataLoader(dl_of.dataset, batch_size=4, sampler=sampler)

    from mucs_fast.compat.replay import _Positions

    pos = sharded(torch.utils.data.DataLoader(_Positions(N)))
    real = sharded(torch.utils.data.DataLoader(ds))
    dl = ResidentLoader(ds, ids, x, y, 4, shuffle, False, None, pos)
    for epoch in range(2):
        pos.sampler.set_epoch(epoch)
        real.sampler.set_epoch(epoch)
        torch.manual_seed(3)
        got = [b[0] for b in dl]
        after = torch.rand(2)
        torch.manual_seed(3)
        want = [b[0] for b in real]
        assert torch.equal(after, torch.rand(2))
        assert len(got) == len(dl) == len(want) == -(-(N // 3) // 4)
        assert all(torch.equal(u, v) for u, v in zip(got, want))


# -- against the reference's own code (a working copy beside the project; skipped without it) ----
def _reference_checkout():
    """A working copy of github sony/mucs outside this repository (extracted from the local
    mirror by benches/dropin/refshim.py), or None; the reference also needs omegaconf, einops."""
    import importlib.util

    sys.path.insert(0, os.path.join(os.path.dirname(FLOW), "..", "..", "benches", "dropin"))
    import refshim

    if not all(importlib.util.find_spec(m) for m in ("omegaconf", "einops")):
        return None
    if os.path.exists(os.path.join(refshim.DEFAULT_REF, "attribution", "mucs.py")):
        return refshim.DEFAULT_REF
    if os.path.isdir(refshim.MIRROR):
        return refshim.ensure_checkout()
    return None


@pytest.mark.parametrize("devices", [1, 2])
def test_replay_is_the_reference_in_lightning(tmp_path, devices):
    """The reference's Attributor and fast=False in the same real Fabric: the same scores (each
    rank: the reference's shard), to 1e-6 of the score scale."""
    path = _reference_checkout()
    if path is None:
        pytest.skip("the reference's code (github sony/mucs) is not checked out beside the project")
    for r in _flow(tmp_path, devices, "--reference", path):
        (ref_idx, ref_scores), (idx, scores) = r["reference"]["ref"], r["reference"]["slow"]
        assert len(ref_idx) == -(-N // devices)
        scale = float(ref_scores.abs().max())
        assert scale > 0
        got = _on(idx, scores, ref_idx)
        assert float((got - ref_scores).abs().max()) <= 1e-6 * scale
