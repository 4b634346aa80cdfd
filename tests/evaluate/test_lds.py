"""The linear datamodeling score: the statistic on planted linear datamodels (against a plain
rank-correlation oracle), the subsets, the subset models' outputs (against a direct loop over the
bank), and the pipeline end to end (schema, a planted influential class, resume, CLI)."""

import json
import math

import numpy as np
import pytest
import torch

from mucs_fast.evaluate import StopEvaluation, evaluate
from mucs_fast.evaluate.lds import (
    lds_bank,
    lds_options,
    lds_per_target,
    model_outputs,
    spearman,
    subset_masks,
    subset_train,
)

from .test_pipeline import planted_class_data, planted_method, tiny_cfg, toy_data


def spearman_oracle(a, b):
    """Pearson correlation of average ranks, by hand."""

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):  # ties: average rank
            r[v == val] = r[v == val].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra**2).sum() * (rb**2).sum()))


def test_spearman_matches_the_oracle_with_ties_and_is_nan_when_constant():
    g = np.random.default_rng(0)
    a, b = g.integers(0, 5, 40).astype(float), g.normal(size=40)
    assert spearman(a, b) == pytest.approx(spearman_oracle(a, b), abs=1e-12)
    assert math.isnan(spearman(np.ones(5), b[:5]))


def test_lds_recovers_a_planted_linear_datamodel_and_its_sign():
    # outputs f_s(x̂_k) = −Σ_{j∈D_s} w_kj + small noise: the true scores w give LDS ≈ 1, −w ≈ −1,
    # random scores ≈ 0; the complement of each subset (a wrong sum) gives ≈ −1.
    K, N, S = 4, 60, 40
    g = torch.Generator().manual_seed(0)
    w = torch.randn(K, N, generator=g)
    masks = subset_masks(N, S, 0.5, seed=0)
    f = -(w.double() @ masks.double().T) + 0.01 * torch.randn(K, S, generator=g).double()
    assert min(lds_per_target(w, masks, f)) > 0.99
    assert max(lds_per_target(-w, masks, f)) < -0.99
    assert max(lds_per_target(w, ~masks, f)) < -0.9
    rnd = lds_per_target(torch.randn(K, N, generator=g), masks, f)
    assert abs(float(np.mean(rnd))) < 0.3
    # each value is Spearman of (Σ over the subset, −f) as the oracle computes it
    pred = (w.double() @ masks.double().T).numpy()
    assert lds_per_target(w, masks, f)[2] == pytest.approx(
        spearman_oracle(pred[2], -f[2].numpy()), abs=1e-12
    )
    # a NaN score counts 0 (not NaN for the whole target)
    w2 = w.clone()
    w2[0, 3] = math.nan
    assert all(math.isfinite(v) for v in lds_per_target(w2, masks, f))


def test_subset_masks_are_halves_seeded_and_stable_when_S_grows():
    m = subset_masks(101, 8, 0.5, seed=3)
    assert m.dtype == torch.bool and m.shape == (8, 101)
    assert (m.sum(1) == 50).all()  # round(0.5 · 101)
    assert torch.equal(m, subset_masks(101, 8, 0.5, seed=3))
    assert torch.equal(
        subset_masks(101, 12, 0.5, seed=3)[:8], m
    )  # more subsets keep the first ones
    assert not torch.equal(m, subset_masks(101, 8, 0.5, seed=4))
    assert len({tuple(r.nonzero()[:, 0].tolist()) for r in m}) == 8
    # every image is in about half the subsets
    frac = subset_masks(50, 400, 0.5, seed=0).double().mean(0)
    assert frac.min() > 0.35 and frac.max() < 0.65


def test_options_and_the_subset_recipe():
    o = lds_options({"subsets": 5})
    assert o == {"subsets": 5, "alpha": 0.5, "steps": None, "num_noises": 256, "seed": 0}
    assert subset_train({"steps": 3000, "lr": 1e-3}, o) == {
        "steps": 1500,
        "lr": 1e-3,
    }  # same epochs
    assert subset_train({"steps": 3000}, {**o, "steps": 7})["steps"] == 7
    assert lds_options(None) is None
    for bad, msg in (
        ({"subsets": 2}, "subsets"),
        ({"alpha": 1.0}, "alpha"),
        ({"nope": 1}, "unknown"),
        ({"num_noises": 0}, "num_noises"),
        ({"steps": 0}, "steps"),
    ):
        with pytest.raises(ValueError, match=msg):
            lds_options(bad)
    with pytest.raises(ValueError, match="lds"):
        tiny_cfg(lds={"subsets": 1})


def test_model_outputs_are_the_mean_loss_over_one_fixed_bank():
    # oracle: den.loss per target per bank noise, by hand; the same bank for every model and image
    from mucs_fast.config import MUCSConfig
    from mucs_fast.denoisers import EDMDenoiser
    from mucs_fast.engine import make_bank
    from mucs_fast.models import DiT

    from .test_pipeline import TINY_MODEL

    torch.manual_seed(0)
    den = EDMDenoiser(DiT((1, 8, 8), label_dim=2, **TINY_MODEL).eval())
    x, y = toy_data(5)
    out = model_outputs(den, x, y, lds_bank(den, (1, 8, 8), num_noises=6, seed=11))
    bank = make_bank(
        den, (1, 8, 8), MUCSConfig(num_noises=6, seed=11), None
    )  # log-normal σ, as in training
    with torch.no_grad():
        want = torch.stack(
            [
                den.loss(
                    x[k : k + 1].expand(6, -1, -1, -1),
                    bank.eps,
                    bank.level,
                    den.prepare_labels(y[k : k + 1].expand(6), 6, "y"),
                )
                .double()
                .mean()
                for k in range(5)
            ]
        )
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        model_outputs(den, x, y, lds_bank(den, (1, 8, 8), 6, 11)), out, rtol=0, atol=0
    )
    assert not torch.equal(model_outputs(den, x, y, lds_bank(den, (1, 8, 8), 6, 12)), out)


def test_pipeline_lds_finds_a_planted_influential_class_and_resumes(tmp_path):
    # Class 0 (8 bright images of 40) and the targets are class 0: the fewer class-0 images a
    # subset model saw, the worse it fits the targets. A method scoring class-0 membership
    # predicts exactly that (positive LDS on every target).
    x, y = planted_class_data(8)
    with planted_method("_planted_lds"):
        cfg = tiny_cfg(
            methods=("_planted_lds", "center:_planted_lds", "random"),
            num_targets=3,
            num_controls=1,
            top_k=8,
            target_classes=(0,),
            train=dict(steps=300, batch_size=16, lr=1e-2, ema_decay=0.9),
            sample_steps=16,
            metrics=("cos",),
            lds=dict(subsets=10, num_noises=32),
        )
        with pytest.raises(StopEvaluation):
            evaluate(str(tmp_path), cfg, data=(x, y), progress=False, stop_after="lds-models")
        res = evaluate(str(tmp_path), cfg, data=(x, y), progress=False)
        again = evaluate(str(tmp_path), cfg, data=(x, y), progress=False)
    lds = res["lds"]
    assert set(lds) == set(cfg.methods)
    for m, v in lds.items():
        assert set(v) >= {"mean", "ci", "per_target"} and len(v["per_target"]) == 3, m
    assert lds["_planted_lds"]["mean"] > 0.3 and min(lds["_planted_lds"]["per_target"]) > 0, lds[
        "_planted_lds"
    ]
    # centering removes a target-independent method entirely: constant predictions, no LDS
    assert all(math.isnan(v) for v in lds["center:_planted_lds"]["per_target"])
    assert res["lds_models"]["subsets"] == 10 and res["lds_models"]["train_steps"] == 150
    assert len(res["lds_models"]["models"]) == 10
    computed, reused = res["artifacts"]["computed"], res["artifacts"]["reused"]
    # pre and two post models (the planted method and its centred copy share one); the subset
    # models of the first call are reused
    assert sum(c.startswith("model-") for c in computed) == 3
    assert sum(r.startswith("model-") for r in reused) >= 10
    assert sum(c.startswith("lds-outputs-") for c in computed) == 1
    assert again["artifacts"]["computed"] == [] and again["lds"] == lds
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["lds"]) == set(cfg.methods)
    assert "## LDS" in (tmp_path / "results.md").read_text()


def test_cli_lds_flags(tmp_path):
    import argparse

    from mucs_fast.cli import main
    from mucs_fast.evaluate.cli import add_evaluate_parser, config_from_args

    p = argparse.ArgumentParser()
    add_evaluate_parser(p.add_subparsers())
    cfg = config_from_args(p.parse_args(["evaluate", "--quick", "--lds"]))
    assert cfg.lds["subsets"] == 8
    assert config_from_args(p.parse_args(["evaluate", "--lds-subsets", "40"])).lds["subsets"] == 40
    assert config_from_args(p.parse_args(["evaluate"])).lds is None
    x, y = toy_data(20)
    torch.save(x, tmp_path / "train.pt")
    torch.save(y, tmp_path / "train.pt.labels.pt")
    out = tmp_path / "out"
    common = [
        "evaluate",
        "--data",
        str(tmp_path / "train.pt"),
        "--image-size",
        "8",
        "--train-steps",
        "2",
        "--methods",
        "pixel,random",
        "--seeds",
        "0",
        "--targets",
        "2",
        "--controls",
        "1",
        "--top-k",
        "2",
        "--metrics",
        "cos",
        "--lds-subsets",
        "3",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(common + ["--stop-after", "lds-models"]) == 0
    assert not (out / "results.json").exists()
    assert sum(p.name.startswith("model-") for p in (out / "artifacts").iterdir()) == 3
    assert main(common) == 0
    assert set(json.loads((out / "results.json").read_text())["lds"]) == {"pixel", "random"}
    bad = list(common)
    bad[bad.index("--lds-subsets") + 1] = "2"
    assert main(bad) == 2  # a clear error (at least 3 subsets), not a traceback


def test_every_subset_model_sees_the_same_bank(tmp_path):
    # three copies of one model: the same outputs in every column only if the noise bank is shared
    from mucs_fast.denoisers import EDMDenoiser
    from mucs_fast.evaluate.pipeline import Store, _lds_phase
    from mucs_fast.models import DiT

    from .test_pipeline import TINY_MODEL

    torch.manual_seed(0)
    den = EDMDenoiser(DiT((1, 8, 8), label_dim=2, **TINY_MODEL))
    cfg = tiny_cfg(lds=dict(subsets=3, num_noises=8))
    x, y = toy_data(12)
    lds = {"masks": subset_masks(12, 3, 0.5, 0), "models": [den, den, den], "keys": ["a", "b", "c"]}
    got = _lds_phase(
        Store(str(tmp_path)), cfg, lds, x[:4], y[:4], "gen", {"pixel": torch.rand(4, 12)}, "cpu"
    )
    out = got["outputs"]
    assert (
        out.shape == (4, 3)
        and torch.equal(out[:, 0], out[:, 1])
        and torch.equal(out[:, 0], out[:, 2])
    )
    assert len(got["per_target"]["pixel"]) == 4
