"""Outputs of the evaluation: results.json, results.md (the paper's table layout), densities.png,
pre_post_targets.png and pre_post_controls.png. Every file is written atomically."""

from __future__ import annotations

import json
import math
import os

import torch

from .._io import atomic_path, atomic_write
from .metrics import METRICS

GROUPS = ("targets", "controls")


def _clean(o):
    """JSON without NaN/Inf (→ null) and with plain Python numbers."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, torch.Tensor):
        return _clean(o.tolist())
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        try:
            return _clean(o.item())
        except (ValueError, TypeError):
            return repr(o)
    return o


def write_outputs(out: str, cfg, results: dict, per_seed: dict) -> None:
    atomic_write(
        os.path.join(out, "results.json"),
        json.dumps(_clean(results), indent=1, sort_keys=False, allow_nan=False) + "\n",
    )
    atomic_write(os.path.join(out, "results.md"), results_markdown(results))
    seed0 = next(iter(per_seed))
    write_densities(os.path.join(out, "densities.png"), results)
    T = cfg.num_targets
    for grp, sl in (("targets", slice(0, T)), ("controls", slice(T, None))):
        write_pre_post(
            os.path.join(out, f"pre_post_{grp}.png"),
            per_seed[seed0]["gen_pre"][sl],
            {m: g[sl] for m, g in per_seed[seed0]["gen_post"].items()},
            title=f"{grp}, seed {seed0}: pre (top row) and post per method",
        )


def _fmt(v, spec):
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def results_markdown(results: dict) -> str:
    cfg = results["config"]
    metrics = list(cfg["metrics"])
    methods = list(results["methods"])
    heads = [METRICS[m].label for m in metrics] + ["mean"]
    lines = [
        f"# Counterfactual evaluation: {cfg.get('data_description') or cfg['data']}",
        "",
        f"N = {cfg['N']} training images, top-k = {cfg['top_k']} per target (union removed), "
        f"{cfg['num_targets']} targets + {cfg['num_controls']} controls per seed, seeds "
        f"{', '.join(map(str, cfg['seeds']))} (pooled: n = "
        f"{cfg['num_targets'] * len(cfg['seeds'])} targets). "
        "Every method is compared with random removal.",
        "",
    ]

    def table(title, grp, field, fmt, with_ci=False):
        lines.extend(
            [
                f"## {title}",
                "",
                "| method | " + " | ".join(heads) + " |",
                "|---|" + "---:|" * len(heads),
            ]
        )
        for m in methods:
            row = results["methods"][m][grp]
            cells = []
            for metric in metrics:
                c = _fmt(row[metric][field], fmt)
                if with_ci and row[metric].get("ratio_ci") is not None:
                    c += f" ± {_fmt(row[metric]['ratio_ci'], '.1f')}"
                cells.append(c)
            cells.append(_fmt(results["methods"][m]["mean"][grp][field], fmt))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")

    table("AUC, targets (higher is better; 0.5 = random)", "targets", "auc", ".3f")
    table(
        "Ratio %, targets (more negative is better; ± 1.98·std/√n)",
        "targets",
        "ratio",
        "+.1f",
        True,
    )
    table("AUC, controls (should stay ≈ 0.5)", "controls", "auc", ".3f")
    table("Ratio %, controls (should stay ≈ 0)", "controls", "ratio", "+.1f", True)
    if results.get("lds"):
        info = results.get("lds_models", {})
        lines.extend(
            [
                "## LDS (linear datamodeling score; higher is better; ± 1.98·std/√n over targets)",
                "",
                f"{info.get('subsets')} subset models on random {info.get('alpha')} subsets "
                f"({info.get('subset_size')} images, {info.get('train_steps')} steps each); "
                "output: each "
                f"target's diffusion loss over a fixed bank of {info.get('num_noises')} noises.",
                "",
                "| method | LDS | targets |",
                "|---|---:|---:|",
            ]
        )
        for m in methods:
            v = results["lds"][m]
            n = sum(1 for t in v["per_target"] if t is not None and math.isfinite(t))
            lines.append(f"| {m} | {_fmt(v['mean'], '+.3f')} ± {_fmt(v['ci'], '.3f')} | {n} |")
        lines.append("")
    lines.extend(
        [
            '## p-values vs random (Mann–Whitney U; targets one-sided "less", controls two-sided)',
            "",
            "| method | group | " + " | ".join(heads[:-1]) + " |",
            "|---|---|" + "---:|" * len(metrics),
        ]
    )
    for m in methods:
        if m == "random":
            continue
        for grp in GROUPS:
            cells = [_fmt(results["methods"][m][grp][metric]["p"], ".1e") for metric in metrics]
            lines.append(f"| {m} | {grp} | " + " | ".join(cells) + " |")
    lines.extend(
        [
            "",
            "## Removal sets",
            "",
            "| method | union size (mean over seeds) | per seed | within-method top-k overlap |",
            "|---|---:|---|---:|",
        ]
    )
    for m in methods:
        w = results["overlap"]["within"][m]
        lines.append(
            f"| {m} | {results['union_sizes'][m]} | {results['union_sizes_per_seed'][m]} | "
            f"{_fmt(100 * w['mean'] if w['mean'] is not None else None, '.1f')} % "
            f"± {_fmt(100 * w['ci'] if w['ci'] is not None else None, '.1f')} |"
        )
    lines.extend(
        [
            "",
            "## Cross-method top-k overlap (mean over targets, %)",
            "",
            "| | " + " | ".join(methods) + " |",
            "|---|" + "---:|" * len(methods),
        ]
    )
    for m1 in methods:
        cells = [
            "—" if m1 == m2 else _fmt(100 * results["overlap"]["cross"][m1][m2], ".1f")
            for m2 in methods
        ]
        lines.append(f"| {m1} | " + " | ".join(cells) + " |")
    lines.append("")
    clf = results.get("classifier")
    if clf:
        lines.append(
            f"Feature classifier: held-out accuracy {_fmt(clf.get('holdout_accuracy'), '.3f')}."
        )
    t = results.get("timings", {}).get("total_seconds")
    if t is not None:
        lines.append(
            f"Wall time of this call: {t / 60:.1f} min (cached artifacts are not recomputed)."
        )
    return "\n".join(lines) + "\n"


def write_densities(path: str, results: dict) -> None:
    """One panel per metric: Gaussian KDE of the targets' pre/post similarity per method; random
    shaded (the reference's distribution plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats as sps

    metrics = list(results["config"]["metrics"])
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        allv = np.concatenate(
            [
                np.asarray(results["per_image"][m]["targets"][metric], dtype=float)
                for m in results["per_image"]
            ]
        )
        lo, hi = float(allv.min()), float(allv.max())
        pad = 0.1 * (hi - lo) or 0.05
        grid = np.linspace(lo - pad, hi + pad, 200)
        for m, d in results["per_image"].items():
            v = np.asarray(d["targets"][metric], dtype=float)
            if v.size > 1 and np.ptp(v) > 0:
                dens = sps.gaussian_kde(v, bw_method=0.25)(grid)
            else:
                dens = np.exp(-0.5 * ((grid - v.mean()) / (pad / 4)) ** 2)
            dens = dens / dens.sum()
            if m == "random":
                ax.fill_between(grid, 0, dens, color="tab:gray", alpha=0.3, label="random")
            else:
                ax.plot(grid, dens, linewidth=1.2, label=m)
        ax.set_xlabel(f"{METRICS[metric].label} (pre vs post)", fontsize=8)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("Targets: similarity of pre and post images (left = changed more)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_pre_post(
    path: str, pre: torch.Tensor, posts: dict, title: str = "", max_images: int = 20
) -> None:
    """Grid: row 0 = pre images, then one row per method with its post images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_images, pre.shape[0])
    if n == 0:
        fig, ax = plt.subplots(figsize=(3, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no images", ha="center", va="center")
    else:
        rows = [("pre", pre)] + list(posts.items())
        fig, axes = plt.subplots(
            len(rows), n, figsize=(0.75 * n + 1.2, 0.8 * len(rows) + 0.4), squeeze=False
        )
        for r, (name, imgs) in enumerate(rows):
            for c in range(n):
                ax = axes[r, c]
                img = ((imgs[c].float() + 1) / 2).clamp(0, 1)
                ax.imshow(
                    (img[0] if img.shape[0] == 1 else img[:3].permute(1, 2, 0)).numpy(),
                    cmap="gray" if img.shape[0] == 1 else None,
                    vmin=0,
                    vmax=1,
                )
                ax.set_xticks([])
                ax.set_yticks([])
            axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
