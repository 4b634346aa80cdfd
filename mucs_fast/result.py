"""`Attribution`: scores [K, N], the training ids, and the run's metadata; its result directory.

Result directory (API.md):
- scores.safetensors: `scores` [K, N] float32, `train_ids` [N] int64, `topk` [K, k] int64,
  `exact` [K, N] bool (True where the score is the full-bank score; all True unless adaptive)
- attribution.json: config, fingerprints, per-target steps/stop reason, timings, version, backend

attribution.json is written last and records the digest of scores.safetensors: `load` accepts a
directory only when both files exist and agree, so an interrupted save is never mistaken for a
result.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ._io import atomic_write, atomic_write_json, file_digest

SCORES_FILE = "scores.safetensors"
META_FILE = "attribution.json"
DEFAULT_TOP_K = 100


class Attribution:
    """Result of `mucs_fast.attribute`.

    scores: float32 [K, N], higher = more influential; train_ids: int64 [N]; meta: dict;
    exact: bool [K, N], True where the score is the full-bank score (default: all; adaptive scoring
    leaves the screening estimate of the images it set aside).
    """

    def __init__(
        self,
        scores: torch.Tensor,
        train_ids: torch.Tensor,
        meta: Optional[dict] = None,
        exact: Optional[torch.Tensor] = None,
    ):
        scores = torch.as_tensor(scores)
        train_ids = torch.as_tensor(train_ids)
        if scores.ndim != 2:
            raise ValueError(f"Attribution: scores must be [K, N], got shape {tuple(scores.shape)}")
        if train_ids.shape != (scores.shape[1],):
            raise ValueError(
                f"Attribution: train_ids must be [N={scores.shape[1]}], "
                f"got shape {tuple(train_ids.shape)}"
            )
        exact = (
            torch.ones(scores.shape, dtype=torch.bool) if exact is None else torch.as_tensor(exact)
        )
        if exact.shape != scores.shape:
            raise ValueError(
                f"Attribution: exact must be [K, N] = {list(scores.shape)}, got {list(exact.shape)}"
            )
        self.scores = scores.float()
        self.train_ids = train_ids.long()
        self.exact = exact.bool()
        self.meta = dict(meta or {})

    @property
    def K(self) -> int:
        return self.scores.shape[0]

    @property
    def N(self) -> int:
        return self.scores.shape[1]

    def topk(self, k: int) -> torch.Tensor:
        """int64 [K, k]: training ids by descending score (ties: lower position first)."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.N:
            raise ValueError(f"topk: k must be an int in [1, N={self.N}], got {k!r}")
        order = torch.argsort(self.scores, dim=1, descending=True, stable=True)[:, :k]
        return self.train_ids[order]

    def __repr__(self) -> str:
        return f"Attribution(K={self.K}, N={self.N})"

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path, top_k: Optional[int] = None) -> None:
        """Write the result directory `path` (created if needed). top_k default: min(100, N)."""
        from safetensors.torch import save_file

        k = min(DEFAULT_TOP_K, self.N) if top_k is None else top_k
        topk = self.topk(k)
        os.makedirs(path, exist_ok=True)
        meta_path = os.path.join(path, META_FILE)
        if os.path.exists(
            meta_path
        ):  # invalidate first: a crash below must not pair old json/new scores
            os.unlink(meta_path)
        scores_path = os.path.join(path, SCORES_FILE)
        tensors = {
            "scores": self.scores.contiguous(),
            "train_ids": self.train_ids.contiguous(),
            "topk": topk.contiguous(),
            "exact": self.exact.contiguous(),
        }
        atomic_write(scores_path, lambda tmp: save_file(tensors, tmp))
        meta = dict(self.meta)
        meta["top_k"] = k
        meta["scores_sha256"] = file_digest(scores_path)
        meta["shape"] = {"K": self.K, "N": self.N}
        atomic_write_json(meta_path, meta)

    @classmethod
    def load(cls, path) -> "Attribution":
        from safetensors.torch import load_file

        scores_path = os.path.join(path, SCORES_FILE)
        meta_path = os.path.join(path, META_FILE)
        for p in (scores_path, meta_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"Attribution.load: {p} is missing — {path!s} is not a complete "
                    f"mucs_fast result directory"
                )
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"Attribution.load: cannot read {meta_path}: {e}") from e
        if meta.get("scores_sha256") != file_digest(scores_path):
            raise ValueError(
                f"Attribution.load: {scores_path} does not match {meta_path} "
                "(interrupted or edited save)"
            )
        try:
            t = load_file(scores_path)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"Attribution.load: cannot read {scores_path}: {e}") from e
        for key in ("scores", "train_ids"):
            if key not in t:
                raise ValueError(f"Attribution.load: {scores_path} has no tensor {key!r}")
        return cls(t["scores"], t["train_ids"], meta, exact=t.get("exact"))
