"""Bad input gets a clear error before heavy compute; writes are atomic; runs resume."""

import json
import os

import pytest
import torch
from nets import TinyEDMNet

import mucs_fast as mf
from mucs_fast import engine

CFG = mf.MUCSConfig(num_noises=6, lr=1e-3, safety_steps=4)


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = TinyEDMNet(C=1, label_dim=3)
    train = torch.rand(24, 1, 4, 4, generator=g) * 2 - 1
    targets = torch.rand(2, 1, 4, 4, generator=g) * 2 - 1
    ytr = torch.randint(
        0, 2, (24,), generator=g
    )  # classes 0, 1 only (class 2 is the NaN trigger below)
    ytg = torch.tensor([0, 1])
    return mf.EDMDenoiser(net), train, targets, ytr, ytg


@pytest.fixture
def no_heavy_compute(monkeypatch):
    """Fail loudly if validation lets a call reach the expensive phases."""

    def boom(*a, **k):
        raise AssertionError("heavy compute reached before the error")

    monkeypatch.setattr(engine, "original_losses", boom)
    monkeypatch.setattr(engine, "estimate_loss_null", boom)


@pytest.mark.parametrize(
    "case, match",
    [
        ("chw", r"targets: images are C×H×W = 1×5×4, but the training images are 1×4×4"),
        ("nan_train", r"train: image 3 contains NaN or Inf"),
        ("inf_target", r"targets: image 1 contains NaN or Inf"),
        ("empty", r"train: empty \(0 images\)"),
        ("int_images", r"train: expected float images"),
        ("three_d", r"targets: expected a 4-D tensor .* use targets\[None\]"),
        (
            "no_labels",
            r"train_labels: the model is class-conditional \(label_dim=3\) but no labels",
        ),
        (
            "wide_labels",
            r"target_labels: expected class ids \[N\] or label vectors \[N, 3\], got shape \(2, "
            r"5\)",
        ),
        ("label_count", r"train_labels: expected 24 labels"),
        ("label_range", r"train_labels: class ids must lie in \[0, 3\)"),
        ("batch", r"batch size B=100 .* exceeds the training set size N=24"),
        ("ids", r"train_ids: ids must be unique"),
    ],
)
def test_bad_inputs_raise_before_compute(problem, no_heavy_compute, case, match):
    den, train, targets, ytr, ytg = problem
    cfg = CFG
    if case == "chw":
        targets = torch.zeros(2, 1, 5, 4)
    elif case == "nan_train":
        train = train.clone()
        train[3, 0, 1, 1] = float("nan")
    elif case == "inf_target":
        targets = targets.clone()
        targets[1, 0, 0, 0] = float("inf")
    elif case == "empty":
        train, ytr = train[:0], ytr[:0]
    elif case == "int_images":
        train = (train * 127).to(torch.uint8)
    elif case == "three_d":
        targets = targets[0]
    elif case == "no_labels":
        ytr = None
    elif case == "wide_labels":
        ytg = torch.zeros(2, 5)
    elif case == "label_count":
        ytr = ytr[:10]
    elif case == "label_range":
        ytr = ytr + 5
    elif case == "batch":
        cfg = mf.MUCSConfig(lr=1e-3)
    kw = {"train_ids": torch.zeros(24, dtype=torch.long)} if case == "ids" else {}
    with pytest.raises(ValueError, match=match):
        mf.attribute(den, train, targets, cfg, ytr, ytg, progress=False, **kw)


def test_model_data_mismatch_is_reported(problem, no_heavy_compute):
    den, train, targets, ytr, ytg = problem
    with pytest.raises(ValueError, match="the model cannot process the data"):
        mf.attribute(
            den, train.repeat(1, 3, 1, 1), targets.repeat(1, 3, 1, 1), CFG, ytr, ytg, progress=False
        )


def test_unknown_lr_and_unbuildable_null_model(problem, no_heavy_compute):
    den, train, targets, ytr, ytg = problem
    with pytest.raises(ValueError, match="training learning rate is unknown"):
        mf.attribute(den, train, targets, mf.MUCSConfig(num_noises=6), ytr, ytg, progress=False)
    del den.net.args
    with pytest.raises(ValueError, match="null_factory"):
        mf.attribute(den, train, targets, CFG, ytr, ytg, progress=False)


def test_config_validation():
    for bad in (
        {"num_noises": 0},
        {"t_sched_infer": 1.5},
        {"loss_null": "zero"},
        {"loss_null": -1.0},
        {"max_steps": -1},
        {"max_steps": 0},
        {"tolerance": 1.0},
        {"frozen": "mlp"},
        {"precision": "fp8"},
    ):
        with pytest.raises(ValueError, match="MUCSConfig"):
            mf.MUCSConfig(**bad)


class NaNForClass2(torch.nn.Module):
    """Wraps a net so that samples with label 2 come out NaN (a model that blows up on one
    target)."""

    def __init__(self, net):
        super().__init__()
        self.inner = net
        self.args = (net,)
        self.sigma_data, self.sigma_P_mean, self.sigma_P_std = 0.5, -1.2, 1.2
        self.unconditional, self.cond_dim = False, 3

    def forward(self, x, sigma, y=None, a=None):
        D = self.inner(x, sigma, y=y)
        return torch.where(y[:, 2].view(-1, 1, 1, 1) > 0, torch.full_like(D, float("nan")), D)


def test_nan_target_is_flagged_and_the_others_finish(problem):
    den, train, targets, ytr, _ = problem
    wrapped = NaNForClass2(den.net)
    res = mf.attribute(
        mf.EDMDenoiser(wrapped), train, targets, CFG, ytr, torch.tensor([2, 0]), progress=False
    )
    assert res.meta["targets"][0]["stop"] == "nan" and res.meta["flagged"] == [0]
    assert torch.isnan(res.scores[0]).all() and torch.isfinite(res.scores[1]).all()


def test_run_dir_resume_and_different_run(problem, tmp_path, monkeypatch):
    den, train, targets, ytr, ytg = problem
    out = tmp_path / "run"
    full = mf.attribute(den, train, targets, CFG, ytr, ytg, progress=False, run_dir=out)
    loaded = mf.Attribution.load(out)
    assert torch.equal(loaded.scores, full.scores) and torch.equal(loaded.train_ids, full.train_ids)
    meta = json.loads((out / "attribution.json").read_text())
    assert meta["targets"][1]["stop"] in ("rule", "cap") and meta["config"]["num_noises"] == 6

    # a crash after the first target: resume redoes only the second one
    calls = []
    real = engine.unlearn_block

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    out2 = tmp_path / "run2"
    monkeypatch.setattr(engine, "unlearn_block", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        mf.attribute(den, train, targets, CFG, ytr, ytg, progress=False, run_dir=out2)
    assert not (out2 / "attribution.json").exists()
    with pytest.raises(FileNotFoundError, match="not a complete"):
        mf.Attribution.load(out2)
    calls.clear()
    monkeypatch.setattr(
        engine, "unlearn_block", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )
    resumed = mf.attribute(
        den, train, targets, CFG, ytr, ytg, progress=False, run_dir=out2, resume=True
    )
    assert len(calls) == 1
    assert torch.equal(resumed.scores, full.scores)

    # the same folder for a different run is refused
    with pytest.raises(ValueError, match="holds a different run"):
        mf.attribute(
            den,
            train,
            targets,
            mf.MUCSConfig(num_noises=7, lr=1e-3, safety_steps=4),
            ytr,
            ytg,
            progress=False,
            run_dir=out,
        )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a mucs_fast run directory"):
        mf.attribute(den, train, targets, CFG, ytr, ytg, progress=False, run_dir=tmp_path / "junk")


def test_interrupted_save_is_never_loaded(tmp_path, monkeypatch):
    res = mf.Attribution(torch.rand(2, 5), torch.arange(5))
    res.save(tmp_path / "r")
    assert torch.equal(mf.Attribution.load(tmp_path / "r").scores, res.scores)
    import safetensors.torch

    def die(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", die)
    with pytest.raises(OSError, match="disk full"):
        mf.Attribution(torch.rand(2, 5), torch.arange(5)).save(tmp_path / "r")
    assert [p for p in os.listdir(tmp_path / "r") if p.endswith(".tmp")] == []
    with pytest.raises(FileNotFoundError):
        mf.Attribution.load(
            tmp_path / "r"
        )  # old json was invalidated first; no half result accepted
    (tmp_path / "r" / "attribution.json").write_text("{}")
    with pytest.raises(ValueError, match="does not match"):
        mf.Attribution.load(tmp_path / "r")


def test_original_losses_are_cached_across_calls(problem, tmp_path, monkeypatch):
    den, train, targets, ytr, ytg = problem
    calls = []
    real = engine.original_losses
    monkeypatch.setattr(
        engine, "original_losses", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )
    a = mf.attribute(den, train, targets, CFG, ytr, ytg, progress=False, cache_dir=tmp_path)
    b = mf.attribute(den, train, targets[:1], CFG, ytr, ytg[:1], progress=False, cache_dir=tmp_path)
    assert len(calls) == 1 and b.meta["timings"]["loss_t_cached"]
    assert torch.equal(b.scores, a.scores[:1])
    mf.attribute(
        den,
        train,
        targets[:1],
        mf.MUCSConfig(num_noises=5, lr=1e-3, safety_steps=4),
        ytr,
        ytg[:1],
        progress=False,
        cache_dir=tmp_path,
    )  # another bank: recomputed
    mf.attribute(
        den, train, targets[:1], CFG, ytr, ytg[:1], progress=False, cache_dir=None
    )  # no cache
    assert len(calls) == 3
    for f in (tmp_path / "loss_t").iterdir():  # a damaged entry is recomputed, not trusted
        f.write_bytes(b"garbage")
    c = mf.attribute(den, train, targets[:1], CFG, ytr, ytg[:1], progress=False, cache_dir=tmp_path)
    assert len(calls) == 4 and torch.equal(c.scores, a.scores[:1])


def test_labels_for_an_unconditional_model_are_an_error(no_heavy_compute):
    g = torch.Generator().manual_seed(0)
    train, targets = torch.rand(24, 1, 4, 4, generator=g), torch.rand(2, 1, 4, 4, generator=g)
    den = mf.EDMDenoiser(TinyEDMNet(C=1, label_dim=0))
    with pytest.raises(
        ValueError, match="train_labels: labels were given, but the model is unconditional"
    ):
        mf.attribute(
            den, train, targets, CFG, torch.zeros(24, dtype=torch.long), None, progress=False
        )


def test_inputs_that_require_grad_are_detached(problem):
    den, train, targets, ytr, ytg = problem
    a = mf.attribute(den, train, targets, CFG, ytr, ytg, progress=False, cache_dir=None)
    b = mf.attribute(
        den,
        train.clone().requires_grad_(True),
        targets.clone().requires_grad_(True),
        CFG,
        ytr,
        ytg,
        progress=False,
        cache_dir=None,
    )
    assert torch.equal(a.scores, b.scores) and not b.scores.requires_grad


def test_float64_inputs_score_as_their_float32_values(problem):
    """Fingerprints, and so every target's seeds, come from the float32 values the engine uses."""
    den, train, targets, ytr, ytg = problem
    a = mf.attribute(den, train, targets, CFG, ytr, ytg, progress=False, cache_dir=None)
    b = mf.attribute(
        den, train.double(), targets.double(), CFG, ytr, ytg, progress=False, cache_dir=None
    )
    assert torch.equal(a.scores, b.scores)
    assert a.meta["fingerprints"] == b.meta["fingerprints"]


def test_the_callers_objects_come_back_unchanged(problem):
    den, train, targets, ytr, ytg = problem
    net = den.net
    net.train()
    net.last.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    before = {n: t.clone() for n, t in net.state_dict().items()}
    inputs = (train.clone(), targets.clone())
    mf.attribute(den, train, targets, CFG, ytr, ytg, progress=False, cache_dir=None)
    assert den.net is net and all(m.training for m in net.modules())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert all(torch.equal(before[n], t) for n, t in net.state_dict().items())
    assert torch.equal(inputs[0], train) and torch.equal(inputs[1], targets)


def test_a_finished_run_resumes_without_computing_anything(problem, tmp_path, monkeypatch):
    den, train, targets, ytr, ytg = problem
    full = mf.attribute(
        den, train, targets, CFG, ytr, ytg, progress=False, run_dir=tmp_path / "r", cache_dir=None
    )

    def boom(*a, **k):
        raise AssertionError("L_t, L_null or unlearning ran for a finished run")

    for name in ("original_losses", "estimate_loss_null", "unlearn_block"):
        monkeypatch.setattr(engine, name, boom)
    again = mf.attribute(
        den,
        train,
        targets,
        mf.MUCSConfig(num_noises=6, lr=1e-3, safety_steps=4, loss_null="auto"),
        ytr,
        ytg,
        progress=False,
        run_dir=tmp_path / "r",
        resume=True,
        cache_dir=None,
    )
    assert torch.equal(again.scores, full.scores)
    assert again.meta["resolved"]["loss_null"] == full.meta["resolved"]["loss_null"]
