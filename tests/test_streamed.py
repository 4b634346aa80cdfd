"""Training sets the engine streams (a .npy, a .safetensors file, a packed folder) give bitwise the
scores of the same images held in memory; damaged files fail before any compute; the CLI streams."""

import numpy as np
import pytest
import torch
from nets import TinyEDMNet

import mucs_fast as mf
from mucs_fast import engine
from mucs_fast.data import NpySource, pack

CFG = dict(num_noises=6, lr=1e-2, safety_steps=5, score_batch=30, targets_per_batch=2)


@pytest.fixture
def problem(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = TinyEDMNet(C=1, label_dim=3)
    raw = torch.randint(0, 256, (40, 1, 6, 6), generator=g, dtype=torch.uint8)  # stored as uint8
    train = raw.float() / 127.5 - 1  # what every source reads it as
    np.save(tmp_path / "train.npy", raw.numpy())
    ytr = torch.randint(0, 3, (40,), generator=g)
    targets = torch.rand(3, 1, 6, 6, generator=g) * 2 - 1
    return mf.EDMDenoiser(net), train, targets, ytr, torch.tensor([0, 1, 2])


@pytest.mark.parametrize(
    "extra",
    [{}, {"use_same_noise_infer": False}, {"t_sched_infer": "auto", "loss_null": "auto"}],
    ids=["default", "independent-noise", "auto"],
)
def test_streamed_npy_equals_resident_bitwise(problem, tmp_path, extra):
    den, train, targets, ytr, ytg = problem
    cfg = mf.MUCSConfig(**{**CFG, **extra})
    resident = mf.attribute(den, train, targets, cfg, ytr, ytg, progress=False, cache_dir=None)
    streamed = mf.attribute(
        den, str(tmp_path / "train.npy"), targets, cfg, ytr, ytg, progress=False, cache_dir=None
    )
    assert torch.equal(resident.scores, streamed.scores) and resident.scores.abs().max() > 1e-3
    assert resident.meta["fingerprints"] == streamed.meta["fingerprints"]  # same run and cache keys


def test_packed_folder_with_its_labels_equals_resident(problem, tmp_path):
    den, train, targets, ytr, ytg = problem
    torch.save(ytr, tmp_path / "labels.pt")
    pack(
        str(tmp_path / "train.npy"),
        str(tmp_path / "packed"),
        shard_images=16,
        progress=False,
        labels=str(tmp_path / "labels.pt"),
    )
    cfg = mf.MUCSConfig(**CFG)
    resident = mf.attribute(den, train, targets, cfg, ytr, ytg, progress=False, cache_dir=None)
    streamed = mf.attribute(
        den, str(tmp_path / "packed"), targets, cfg, None, ytg, progress=False, cache_dir=None
    )
    assert torch.equal(resident.scores, streamed.scores)


def test_a_truncated_file_fails_before_any_compute(problem, tmp_path, monkeypatch):
    den, _, targets, ytr, ytg = problem
    data = (tmp_path / "train.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-100])

    def boom(*a, **k):
        raise AssertionError("heavy compute reached before the error")

    monkeypatch.setattr(engine, "original_losses", boom)
    monkeypatch.setattr(engine, "estimate_loss_null", boom)
    with pytest.raises(ValueError, match="cut.npy"):
        mf.attribute(
            den, str(tmp_path / "cut.npy"), targets, mf.MUCSConfig(**CFG), ytr, ytg, progress=False
        )
    nan = np.load(tmp_path / "train.npy").astype(np.float32) / 127.5 - 1
    nan[7, 0, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ValueError, match="image 7"):
        mf.attribute(
            den,
            NpySource(tmp_path / "nan.npy"),
            targets,
            mf.MUCSConfig(**CFG),
            ytr,
            ytg,
            progress=False,
        )


def test_cli_streams_a_npy_training_set(tmp_path):
    from mucs_fast import cli
    from mucs_fast.denoisers import EDMDenoiser
    from mucs_fast.models import DiT
    from mucs_fast.train import save_checkpoint

    torch.manual_seed(0)
    net = DiT((1, 4, 4), label_dim=0, patch_size=2, width=8, depth=1, heads=1, cond_width=8)
    save_checkpoint(tmp_path / "model.pt", EDMDenoiser(net, train_lr=2e-2))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 4, 4, generator=g) * 2 - 1
    np.save(tmp_path / "train.npy", x.numpy())
    torch.save(x, tmp_path / "train.pt")
    torch.save(x[:2] * 0.9, tmp_path / "targets.pt")
    outs = {}
    for name in ("train.npy", "train.pt"):
        out = tmp_path / f"out-{name}"
        argv = [
            "attribute",
            "--model",
            str(tmp_path / "model.pt"),
            "--train",
            str(tmp_path / name),
            "--targets",
            str(tmp_path / "targets.pt"),
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
            "--device",
            "cpu",
            "--quiet",
        ]
        assert cli.main(argv) == 0
        outs[name] = mf.Attribution.load(out)
        assert (out / "report.png").is_file()
    assert torch.equal(outs["train.npy"].scores, outs["train.pt"].scores)


def test_an_interrupted_loss_t_pass_resumes_from_its_persisted_shards(
    problem, tmp_path, monkeypatch
):
    """L_t is persisted per shard in the run directory: a rerun computes only the shards that are
    missing (here: two deleted, as if the pass had been killed before writing them)."""
    den, train, targets, ytr, ytg = problem
    cfg = mf.MUCSConfig(**CFG)
    run = tmp_path / "run"
    full = mf.attribute(
        den, train, targets, cfg, ytr, ytg, progress=False, cache_dir=None, run_dir=run
    )
    shards = sorted((run / "loss_t").iterdir())
    assert len(shards) > 2
    for f in shards[:2]:
        f.unlink()
    for f in (run / "targets").iterdir():  # no finished target either: L_t is needed again
        f.unlink()
    calls = []
    real = engine.original_losses
    monkeypatch.setattr(
        engine, "original_losses", lambda *a, **k: (calls.append(k["start"]), real(*a, **k))[1]
    )
    again = mf.attribute(
        den, train, targets, cfg, ytr, ytg, progress=False, cache_dir=None, run_dir=run, resume=True
    )
    assert len(calls) == 2 and torch.equal(again.scores, full.scores)
