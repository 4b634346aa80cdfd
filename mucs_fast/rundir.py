"""The run directory: per-target results persisted as they finish, so a crash loses at most the
targets in flight, and `resume=True` continues where a run stopped."""

from __future__ import annotations

import json
import os
import shutil

import torch

from . import __version__
from ._io import atomic_write, atomic_write_json, key_digest

RUN_FILE = "run.json"
TARGETS_DIR = "targets"


class RunDir:
    """Per-target results persisted as they finish, so a crash loses at most the target in flight."""

    def __init__(self, path, key: dict, resume: bool):
        self.path = os.fspath(path)
        self.key = key
        self.digest = key_digest(key)
        run_file = os.path.join(self.path, RUN_FILE)
        if os.path.isdir(self.path) and os.listdir(self.path):
            if not os.path.isfile(run_file):
                raise ValueError(f"run_dir {self.path!s} is not empty and holds no {RUN_FILE}: it is not a "
                                 "mucs_fast run directory; choose an empty or new folder")
            try:
                with open(run_file) as f:
                    old = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"run_dir {self.path!s}: cannot read {RUN_FILE}: {e}") from e
            if old.get("digest") != self.digest:
                diff = sorted(k for k in set(old.get("key", {})) | set(key)
                              if old.get("key", {}).get(k) != key.get(k))
                raise ValueError(f"run_dir {self.path!s} holds a different run (differs in: "
                                 f"{', '.join(diff) or 'format'}); use another folder or delete it")
            if not resume:  # same run, fresh start: drop finished targets
                shutil.rmtree(os.path.join(self.path, TARGETS_DIR), ignore_errors=True)
        os.makedirs(os.path.join(self.path, TARGETS_DIR), exist_ok=True)
        atomic_write_json(run_file, {"digest": self.digest, "key": key, "mucs_fast": __version__})

    def _target_file(self, k: int) -> str:
        return os.path.join(self.path, TARGETS_DIR, f"{k:06d}.safetensors")

    def load_target(self, k: int):
        from safetensors import safe_open

        p = self._target_file(k)
        if not os.path.isfile(p):
            return None
        with safe_open(p, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("run") != self.digest:
                return None
            return f.get_tensor("scores"), json.loads(meta["info"])

    def save_target(self, k: int, scores: torch.Tensor, info: dict) -> None:
        from safetensors.torch import save_file

        t = {"scores": scores.detach().float().cpu().contiguous()}
        meta = {"run": self.digest, "info": json.dumps(info)}
        atomic_write(self._target_file(k), lambda tmp: save_file(t, tmp, metadata=meta))

    def close(self) -> None:
        """Release the run directory (the engine calls it when the run ends, however it ends)."""
