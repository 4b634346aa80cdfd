"""What a training set is made of, validated once: images' shape, labels, dataset ids; and the one
conversion of stored pixel values to the model's range.

Every reader (tensor files, image folders, the reference's folder, packed shards), the streamed
sources and the engine call these, so a rule (ids are unique, label vectors are finite, ...) holds
for every way a training set arrives. Errors name `where` (a file, a flag or an argument).
"""

from __future__ import annotations

import torch


def to_model_range(raw: torch.Tensor) -> torch.Tensor:
    """Stored values → float32 in the model's range, contiguous: uint8 v ↦ v/127.5 − 1 (bitwise
    the reference's (v/255 − 0.5)/0.5 for all 256 values: tests/test_data.py); floats as they
    are."""
    if raw.dtype == torch.uint8:
        return raw.float().div_(127.5).sub_(1).contiguous()
    return raw.float().contiguous()


def check_chw(shape, where: str) -> tuple[int, int, int, int]:
    """(N, C, H, W) of images [N, C, H, W] with C, H, W ≥ 1."""
    if len(shape) != 4:
        raise ValueError(f"{where}: expected images [N, C, H, W], found shape {tuple(shape)}")
    if min(shape[1:]) < 1:
        raise ValueError(f"{where}: images of shape {tuple(shape[1:])} hold no pixels")
    return tuple(int(s) for s in shape)


def check_labels(y, N: int | None, where: str) -> torch.Tensor:
    """Class ids int64 [N] or finite label vectors float32 [N, D] (CPU, contiguous); N = None
    accepts any count."""
    y = torch.as_tensor(y).detach().cpu()
    if y.ndim not in (1, 2) or (N is not None and y.shape[0] != N):
        n = "N" if N is None else f"N={N}"
        raise ValueError(
            f"{where}: expected labels [{n}] (class ids) or [{n}, D] (label vectors), "
            f"found shape {tuple(y.shape)}"
        )
    if y.ndim == 1:
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise ValueError(
                f"{where}: expected integer class ids [N] (or float label vectors "
                f"[N, D]), found {y.dtype}"
            )
        return y.long().contiguous()
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{where}: expected label vectors [N, D] of a real dtype, found {y.dtype}")
    y = y.float().contiguous()
    if not torch.isfinite(y).all():
        raise ValueError(f"{where}: labels contain NaN or Inf")
    return y


def check_ids(ids, N: int, where: str) -> torch.Tensor:
    """Dataset ids int64 [N] (CPU), distinct: an id names one training image in every result."""
    ids = torch.as_tensor(ids).detach().cpu()
    if ids.shape != (N,) or ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(
            f"{where}: expected int64 ids [N={N}], found {ids.dtype} of shape {tuple(ids.shape)}"
        )
    ids = ids.long().contiguous()
    if torch.unique(ids).numel() != N:
        raise ValueError(f"{where}: ids must be unique")
    return ids
