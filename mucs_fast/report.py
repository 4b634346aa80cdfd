"""report.png: each target beside its top training images, with their scores."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import torch

from ._io import atomic_path
from .data import open_source


def _to_display(img: torch.Tensor):
    """[C, H, W] in [-1, 1] → HxW (gray) or HxWx3 array in [0, 1]."""
    img = ((img.detach().float().cpu() + 1) / 2).clamp(0, 1)
    if img.shape[0] == 1:
        return img[0].numpy()
    return img[:3].permute(1, 2, 0).numpy()


def _wrap(text: str, width: int = 22, lines: int = 3) -> str:
    out = textwrap.wrap(text, width) or [""]
    return "\n".join(out[:lines]) + ("…" if len(out) > lines else "")


def format_score(s: float) -> str:
    """A score with its sign and 3 significant digits at any scale: +0.0123, -1.23e-5, +412.

    MUCS scores are differences of nearly equal losses; a fixed 4-decimal format printed the
    typical 1e-5 as "-0.0000"."""
    s = float(s)
    if math.isnan(s):
        return "nan"
    if s == 0:
        return "0"
    text = f"{s:+.3g}"
    mant, e, exp = text.partition("e")
    return f"{mant}e{int(exp)}" if e else text  # e-05 -> e-5: the titles are small


def write_report(
    path,
    targets: torch.Tensor,
    train: torch.Tensor,
    res,
    top: int = 8,
    target_labels: torch.Tensor | None = None,
    train_labels: torch.Tensor | None = None,
    title: str | None = None,
    target_titles: Sequence[str] | None = None,
    train_captions: Sequence[str] | None = None,
) -> None:
    """One row per target: the target, then its `top` highest-scoring training images.

    targets [K, C, H, W], train [N, C, H, W] in [-1, 1] (or a Source), res: an Attribution whose
    train_ids index rows of `train` by position (ids are shown under each image). Text models:
    target_titles (each target's prompt) above the target, train_captions [N] under each image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = res.K
    top = min(top, res.N)
    train = open_source(train)
    order = torch.argsort(res.scores, dim=1, descending=True, stable=True)[:, :top]
    text = target_titles is not None or train_captions is not None
    row_h = 1.9 if text else 1.45
    fig, axes = plt.subplots(K, top + 1, figsize=(1.3 * (top + 1), row_h * K + 0.4), squeeze=False)
    cmap = "gray" if targets.shape[1] == 1 else None
    for k in range(K):
        ax = axes[k, 0]
        ax.imshow(_to_display(targets[k]), cmap=cmap, vmin=0, vmax=1)
        lab = "" if target_labels is None else f" (y={int(target_labels[k])})"
        flagged = res.meta.get("targets", [None] * K)[k] if res.meta.get("targets") else None
        stop = f"\n{flagged['stop']}, {flagged['steps']} st" if flagged else ""
        prompt = "" if target_titles is None else "\n" + _wrap(target_titles[k])
        ax.set_title(f"target {k}{lab}{stop}{prompt}", fontsize=6, color="tab:red")
        for j in range(top):
            pos = int(order[k, j])
            ax = axes[k, j + 1]
            img = train.gather(torch.tensor([pos]))[0]
            ax.imshow(_to_display(img), cmap=cmap, vmin=0, vmax=1)
            lab = "" if train_labels is None else f" y={int(train_labels[pos])}"
            ax.set_title(
                f"#{int(res.train_ids[pos])}{lab}\n{format_score(res.scores[k, pos].item())}",
                fontsize=6,
            )
            if train_captions is not None:
                ax.set_xlabel(_wrap(train_captions[pos]), fontsize=5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or "MUCS attribution: target | top training images (id, score)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
