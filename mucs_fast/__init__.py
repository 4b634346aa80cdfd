"""mucs_fast: fast MUCS training-data attribution for diffusion models.

import mucs_fast as mf
res = mf.attribute(mf.EDMDenoiser(net), train, targets, config=mf.MUCSConfig())
res.scores, res.topk(8), res.save("out/")

Text-to-image pipelines (diffusers, LoRA): mf.pipeline.load_pipeline / encode_training_set /
prepare build what `attribute` takes (README "Text-to-image pipelines").
"""

from . import pipeline
from ._version import __version__
from .config import REFERENCE_FROZEN, MUCSConfig
from .denoisers import DiffusersDenoiser, EDMDenoiser, LatentTextDenoiser
from .engine import attribute
from .result import Attribution

__all__ = [
    "MUCSConfig",
    "REFERENCE_FROZEN",
    "EDMDenoiser",
    "DiffusersDenoiser",
    "LatentTextDenoiser",
    "pipeline",
    "attribute",
    "Attribution",
    "__version__",
]
