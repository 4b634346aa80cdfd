"""Results that cannot be garbage: a streamed set scores bitwise as the same images in memory at
sizes where chunks, shards and pack files come out short (N = 37, 88, 203, one image, more than 16
shards); a read that drops or repeats a range fails the run instead of returning what the memory
held; every result entry is written exactly once (coverage.Writes)."""

import numpy as np
import pytest
import torch
from nets import TinyEDMNet

import mucs_fast as mf
from mucs_fast import parallel
from mucs_fast.coverage import Writes, nan_tensor
from mucs_fast.data import Source, TensorSource, pack

# M = 4 noises and 40 pairs per forward: chunks of 10 images, so none of the sizes below divides
CFG = dict(
    num_noises=4,
    batch_size=4,
    lr=1e-2,
    max_steps=3,
    score_batch=40,
    targets_per_batch=2,
    loss_null=5.0,
)


def _problem(N, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    raw = torch.randint(0, 256, (N, 1, 4, 4), generator=g, dtype=torch.uint8)
    targets = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    return mf.EDMDenoiser(TinyEDMNet(C=1, width=8)), raw, targets


def _attribute(den, train, targets, **cfg):
    return mf.attribute(
        den, train, targets, mf.MUCSConfig(**{**CFG, **cfg}), progress=False, cache_dir=None
    )


@pytest.mark.parametrize("N", [37, 88, 203])
def test_streamed_equals_resident_bitwise_when_the_last_chunk_is_short(tmp_path, N):
    den, raw, targets = _problem(N)
    np.save(tmp_path / "train.npy", raw.numpy())
    pack(
        str(tmp_path / "train.npy"), str(tmp_path / "packed"), shard_images=16, progress=False
    )  # short last file
    resident = _attribute(den, raw.float() / 127.5 - 1, targets)
    assert torch.isfinite(resident.scores).all() and resident.scores.abs().max() > 1e-4
    for streamed in (str(tmp_path / "train.npy"), str(tmp_path / "packed")):
        assert torch.equal(_attribute(den, streamed, targets).scores, resident.scores), streamed


def test_one_training_image(tmp_path):
    den, raw, targets = _problem(1)
    np.save(tmp_path / "one.npy", raw.numpy())
    resident = _attribute(den, raw.float() / 127.5 - 1, targets, batch_size=1)
    streamed = _attribute(den, str(tmp_path / "one.npy"), targets, batch_size=1)
    assert resident.scores.shape == (3, 1) and torch.isfinite(resident.scores).all()
    assert torch.equal(resident.scores, streamed.scores)


def test_more_than_16_shards_with_a_last_shard_of_one_short_chunk(tmp_path, monkeypatch):
    """The plan cuts N = 203 into 21 shards of one 10-image chunk (the last: 3 images), and pack
    writes 26 shard files of 8 (the last: 3): the same scores as one shard and one file."""
    den, raw, targets = _problem(203)
    np.save(tmp_path / "train.npy", raw.numpy())
    one = _attribute(den, str(tmp_path / "train.npy"), targets)
    index = pack(
        str(tmp_path / "train.npy"), str(tmp_path / "packed"), shard_images=8, progress=False
    )
    assert len(index["shards"]) == 26 and index["shards"][-1]["count"] == 3
    monkeypatch.setattr(parallel, "SHARD_IMAGES", 10)
    plan = parallel.Plan.make(203, 10, [0], 1, parallel.Group())
    assert len(plan.shards) == 21 and plan.shards[-1] == (200, 203)
    many = _attribute(den, str(tmp_path / "packed"), targets)
    assert torch.equal(many.scores, one.scores)


def _drop_short_last(chunks):
    """The mutation a review found no test catching: a reader that loses a short last range (one
    of fewer than the 10 images of a full chunk here)."""

    def dropped(self, ranges, device):
        ranges = list(ranges)
        if ranges and ranges[-1][1] - ranges[-1][0] < 10:
            ranges = ranges[:-1]
        return chunks(self, ranges, device)

    return dropped


@pytest.mark.parametrize("kind", ["streamed", "resident"])
def test_a_read_that_drops_the_short_last_chunk_fails_the_run(tmp_path, monkeypatch, kind):
    den, raw, targets = _problem(37)
    np.save(tmp_path / "train.npy", raw.numpy())
    cls = Source if kind == "streamed" else TensorSource
    monkeypatch.setattr(cls, "chunks", _drop_short_last(cls.chunks))
    train = str(tmp_path / "train.npy") if kind == "streamed" else raw.float() / 127.5 - 1
    with pytest.raises(RuntimeError, match="not written exactly once"):
        _attribute(den, train, targets)


def test_a_read_that_repeats_a_chunk_fails_the_run(monkeypatch):
    den, raw, targets = _problem(37)
    real = TensorSource.chunks
    monkeypatch.setattr(
        TensorSource, "chunks", lambda self, r, d: real(self, list(r) + list(r)[:1], d)
    )
    with pytest.raises(RuntimeError, match="not written exactly once"):
        _attribute(den, raw.float() / 127.5 - 1, targets)


def test_writes_counts_and_names_the_first_gap():
    assert torch.isnan(nan_tensor(2, 3)).all()
    w = Writes(10, "scores")
    w.mark(0, 4)
    w.mark(6, 10)
    with pytest.raises(RuntimeError, match=r"scores: 2 of 10 entries .* entry 4, 0 times"):
        w.require_full()
    w.mark(4, 6)
    w.require_full()
    w.mark(9, 10)
    with pytest.raises(RuntimeError, match=r"entry 9, 2 times"):
        w.require_full()
