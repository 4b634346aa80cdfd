"""Import the reference implementation (github sony/mucs) from a working copy OUTSIDE this
repository, and the stand-ins it needs on a CPU dev machine. No reference code lives here.

Stubs (imported by the reference but unused in this study):
- `lightning`, only when it is not installed (`pip install lightning`, the test extra, gives the
  real one): `utils/pytorch_utils.py` imports `lightning.fabric.utilities.AttributeDict`
  and `lightning.fabric.loggers.TensorBoardLogger`; only its training/logging helpers use them.
- `lib.image_metrics` (needs torchmetrics, open_clip, lpips, DINOv2 weights): only
  `use_instance_weights=True` uses it.
omegaconf and einops are real (pip-installed into the venv: small).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types

import torch

MIRROR = "/work/.mirror/sony+mucs/repo"
DEFAULT_REF = "/tmp/mucs-ref"


def ensure_checkout(path: str = DEFAULT_REF) -> str:
    """A working copy of the reference (extracted from the bare mirror when missing)."""
    if not os.path.exists(os.path.join(path, "attribution", "mucs.py")):
        os.makedirs(path, exist_ok=True)
        arch = subprocess.run(
            ["git", "-C", MIRROR, "archive", "HEAD"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", path], input=arch, check=True)
    return path


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _stub(name: str, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def import_reference(path: str = DEFAULT_REF):
    """(attribution.mucs module, models.dit_edm module, utils.pytorch_utils module)."""
    path = ensure_checkout(path)
    if "lightning" not in sys.modules and not _importable("lightning"):

        class _Unused:  # noqa: D401
            def __init__(self, *a, **k):
                raise RuntimeError("lightning is stubbed in this harness")

        _stub("lightning")
        _stub("lightning.fabric")
        _stub("lightning.fabric.utilities", AttributeDict=dict)
        _stub("lightning.fabric.loggers", TensorBoardLogger=_Unused)
    if path not in sys.path:
        sys.path.insert(0, path)
    import lib  # noqa: F401  (the reference's package)

    if "lib.image_metrics" not in sys.modules:

        class ImageMetrics:  # only use_instance_weights=True constructs it
            def __init__(self, *a, **k):
                raise RuntimeError("lib.image_metrics is stubbed in this harness")

        m = _stub("lib.image_metrics", ImageMetrics=ImageMetrics)
        lib.image_metrics = m
    import importlib

    mucs = importlib.import_module("attribution.mucs")
    dit = importlib.import_module("models.dit_edm")
    pu = importlib.import_module("utils.pytorch_utils")
    return mucs, dit, pu


sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "compat")
)
# the tests' Fabric stand-ins; Wrapped re-exported
from refkit import FakeFabric, Wrapped  # noqa: E402,F401


class CPUFabric(FakeFabric):
    """The Lightning-Fabric methods attrib.py and the Attributor call, on one CPU process; seeds
    numpy too, as lightning.fabric.seed_everything does (the reference's code may draw from it)."""

    def seed_everything(self, seed, workers=False):
        import numpy as np

        super().seed_everything(seed, workers)
        np.random.seed(seed % (1 << 32))


class RefDataset(torch.utils.data.Dataset):
    """The reference's dataset item format (idx, x [C,H,W] in [-1,1], y [label_dim]) and `meta`."""

    def __init__(self, ids, x, y):
        self.ids, self.x, self.y = ids, x, y
        self.meta = {
            "image_size": list(x.shape[1:]),
            "label_dim": y.shape[1],
            "num_samples": len(ids),
        }

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], self.x[i], self.y[i]


@contextlib.contextmanager
def loader_workers(num_workers: int | None):
    """Force the reference's DataLoaders to `num_workers` (None: leave its 8). Worker processes do
    not touch the main process's global RNG (each iterator draws its base seed there whatever the
    number of workers), and items are deterministic, so results are the same; on 2 cores the 8
    re-spawned workers per epoch only cost time."""
    if num_workers is None:
        yield
        return
    orig = torch.utils.data.DataLoader

    class DL(orig):
        def __init__(self, *a, **k):
            k["num_workers"] = num_workers
            super().__init__(*a, **k)

    torch.utils.data.DataLoader = DL
    try:
        yield
    finally:
        torch.utils.data.DataLoader = orig
