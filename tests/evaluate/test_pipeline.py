"""The evaluation end to end at CI size: identical pre/post, a planted influential subset,
resumability, the results.json schema and the CLI."""

import contextlib
import json
import os

import pytest
import torch

from mucs_fast.evaluate import METHODS, EvalConfig, StopEvaluation, evaluate, register_method

TINY_MODEL = dict(
    patch_size=4, width=16, depth=1, heads=2, mlp_ratio=2, cond_width=16, extra_tokens=0
)
ALL_METRICS = ("ssim", "cos", "neg_mae", "neg_euc", "correl", "feat")


def tiny_cfg(**kw):
    base = dict(
        seeds=(0,),
        methods=("pixel", "random"),
        num_targets=3,
        num_controls=2,
        top_k=2,
        image_size=8,
        model=TINY_MODEL,
        train=dict(steps=0, batch_size=8, lr=1e-2, ema_decay=0.9),
        sample_steps=4,
        classifier=dict(steps=3, batch_size=8, lr=1e-2, width=4),
        metrics=ALL_METRICS,
    )
    return EvalConfig(**{**base, **kw})


def toy_data(N=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, 1, 8, 8, generator=g) * 2 - 1, torch.arange(N) % 2


def check_schema(results, cfg):
    assert set(results) >= {"config", "union_sizes", "methods", "overlap"}
    for m in cfg.methods:
        assert isinstance(results["union_sizes"][m], int)
        for grp in ("targets", "controls"):
            for metric in cfg.metrics:
                d = results["methods"][m][grp][metric]
                assert set(d) >= {"auc", "ratio", "ratio_ci", "p"}
                assert all(
                    v is None or isinstance(v, float)
                    for v in (d["auc"], d["ratio"], d["ratio_ci"], d["p"])
                )
    assert set(results["overlap"]) == {"within", "cross"}
    assert set(results["overlap"]["cross"]) == set(cfg.methods)


def test_identical_pre_post_gives_ratio_zero_auc_half_and_the_schema(tmp_path):
    # 0 training steps: pre and every post model are the same fresh network, so every image is
    # regenerated exactly and every similarity is maximal.
    cfg = tiny_cfg()
    res = evaluate(str(tmp_path), cfg, data=toy_data(), progress=False)
    for m in cfg.methods:
        for grp in ("targets", "controls"):
            for metric in cfg.metrics:
                d = res["methods"][m][grp][metric]
                assert d["auc"] == 0.5 and d["ratio"] == 0.0, (m, grp, metric)
    with open(tmp_path / "results.json") as f:
        on_disk = json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    check_schema(on_disk, cfg)
    assert on_disk["union_sizes"]["pixel"] <= 3 * 2
    for name in ("results.md", "densities.png", "pre_post_targets.png", "pre_post_controls.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "results.md").read_text()
    assert "## AUC, targets" in md and "## Ratio %, targets" in md and "| pixel |" in md


def planted_class_data(n_planted: int, N: int = 40):
    """(x, y): class 0, the planted subset (n_planted images), bright; class 1 (the rest) dark."""
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(n_planted), torch.ones(N - n_planted)]).long()
    return torch.where(y[:, None, None, None] == 0, 0.6, -0.6) + 0.05 * torch.randn(
        N, 1, 8, 8, generator=g
    ), y


@contextlib.contextmanager
def planted_method(name: str):
    """A registered toy method scoring membership in class 0 (the planted subset), for one test."""

    @register_method(name)
    def planted(ctx, targets, target_labels=None):
        return (ctx.train_labels == 0).float().expand(targets.shape[0], -1).clone()

    try:
        yield name
    finally:
        METHODS.pop(name)


def test_planted_influential_subset_is_found_and_detected(tmp_path):
    # Class 0 (the planted subset, 6 images) is bright, class 1 (34 images) is dark; the targets are
    # class 0. A toy method that scores membership in the planted subset removes exactly it: the
    # post model has never seen class 0, so the targets change far more than after removing the
    # same number of random images per target (whose union leaves some class-0 images in).
    x, y = planted_class_data(6)
    with planted_method("_planted_pipeline"):
        cfg = tiny_cfg(
            methods=("_planted_pipeline", "random"),
            num_targets=4,
            num_controls=2,
            top_k=6,
            target_classes=(0,),
            train=dict(steps=120, batch_size=16, lr=1e-2, ema_decay=0.9),
            metrics=("cos", "neg_mae"),
        )
        res = evaluate(str(tmp_path), cfg, data=(x, y), progress=False)
    assert res["union_sizes"]["_planted_pipeline"] == 6
    assert res["overlap"]["within"]["_planted_pipeline"]["mean"] == 1.0
    for metric in cfg.metrics:
        d = res["methods"]["_planted_pipeline"]["targets"][metric]
        assert d["auc"] > 0.7 and d["ratio"] < 0, (metric, d)


def test_resume_after_a_phase_redoes_only_the_rest(tmp_path):
    cfg = tiny_cfg(methods=("pixel", "random", "ensemble:pixel+random"))
    with pytest.raises(StopEvaluation):
        evaluate(str(tmp_path), cfg, data=toy_data(), progress=False, stop_after="attribute")
    arts = sorted(os.listdir(tmp_path / "artifacts"))
    assert sum(a.startswith("model-") for a in arts) == 1  # pre only
    assert sum(a.startswith("scores-") for a in arts) == 3
    res = evaluate(str(tmp_path), cfg, data=toy_data(), progress=False)
    computed, reused = res["artifacts"]["computed"], res["artifacts"]["reused"]
    assert all(c.startswith(("model-", "gen-")) for c in computed), (
        computed
    )  # post models, regenerations
    assert not any(c.startswith(("scores-", "classifier-")) for c in computed)
    assert sum(r.startswith("scores-") for r in reused) == 3 and any(
        r.startswith("model-") for r in reused
    )
    again = evaluate(str(tmp_path), cfg, data=toy_data(), progress=False)
    assert again["artifacts"]["computed"] == []
    assert again["methods"] == res["methods"]


def test_cli_evaluate_on_a_tensor_file(tmp_path, capsys):
    from mucs_fast.cli import main

    x, y = toy_data(20)
    torch.save(x, tmp_path / "train.pt")
    torch.save(y, tmp_path / "train.pt.labels.pt")
    out = tmp_path / "out"
    rc = main(
        [
            "evaluate",
            "--data",
            str(tmp_path / "train.pt"),
            "--image-size",
            "8",
            "--train-steps",
            "0",
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
            "ssim,cos",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["methods"] == ["pixel", "random"] and res["config"]["N"] == 20
    assert "| pixel |" in capsys.readouterr().out
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(tmp_path / "train.pt"),
                "--methods",
                "nope",
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_adaptive_resolves_the_evaluations_top_k_into_the_mucs_settings(tmp_path):
    seen = {}

    @register_method("_settings_probe", "mucs")
    def probe(ctx, targets, target_labels=None):
        seen.update(ctx.settings["mucs"])
        return torch.zeros(targets.shape[0], ctx.N)

    try:
        cfg = tiny_cfg(methods=("_settings_probe",), adaptive=True, top_k=3)
        with pytest.raises(StopEvaluation):
            evaluate(str(tmp_path), cfg, data=toy_data(), progress=False, stop_after="attribute")
    finally:
        METHODS.pop("_settings_probe")
    assert seen["adaptive_top_k"] == 3
