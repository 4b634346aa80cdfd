"""On-disk cache of the original model's losses L_t [N, M].

L_t depends only on the model, the training data (and labels) and the noise bank — not on the
targets — so a second `attribute` call with new targets reuses it. Entries are safetensors files
named by the digest of everything that determines them; a damaged entry is ignored and rewritten.

Location: `cache_dir` argument, else $MUCS_FAST_CACHE, else ~/.cache/mucs_fast; None disables.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._io import atomic_write

DEFAULT = "auto"


def default_dir() -> str:
    """$MUCS_FAST_CACHE, else ~/.cache/mucs_fast: the one default of every cache (L_t, the demo
    models, encoded latents and captions)."""
    return os.environ.get("MUCS_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mucs_fast"
    )


def resolve_dir(cache_dir) -> Optional[str]:
    if cache_dir is None or cache_dir is False:
        return None
    if cache_dir == DEFAULT:
        cache_dir = default_dir()
    return os.fspath(cache_dir)


class LossCache:
    def __init__(self, cache_dir):
        self.dir = resolve_dir(cache_dir)

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, "loss_t", f"{key}.safetensors")

    def get(self, key: str) -> Optional[torch.Tensor]:
        if self.dir is None or not os.path.isfile(self._path(key)):
            return None
        from safetensors import safe_open

        try:
            with safe_open(self._path(key), "pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                return f.get_tensor("loss_t")
        except Exception:  # unreadable entry: recompute, never trust
            return None

    def put(self, key: str, loss_t: torch.Tensor) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file

        t = {"loss_t": loss_t.detach().float().cpu().contiguous()}
        try:
            atomic_write(self._path(key), lambda tmp: save_file(t, tmp, metadata={"key": key}))
        except OSError:  # a read-only or full cache must not fail the attribution
            pass
