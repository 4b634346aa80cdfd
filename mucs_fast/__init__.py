"""mucs_fast: fast MUCS training-data attribution for diffusion models.

    import mucs_fast as mf
    res = mf.attribute(mf.EDMDenoiser(net), train, targets, config=mf.MUCSConfig())
    res.scores, res.topk(8), res.save("out/")
"""

__version__ = "0.1.0"

from .config import REFERENCE_FROZEN, MUCSConfig  # noqa: E402
from .denoisers import DiffusersDenoiser, EDMDenoiser  # noqa: E402
from .engine import attribute  # noqa: E402
from .result import Attribution  # noqa: E402

__all__ = ["MUCSConfig", "REFERENCE_FROZEN", "EDMDenoiser", "DiffusersDenoiser", "attribute", "Attribution",
           "__version__"]
