"""MUCS configuration: every default is the reference implementation's (spec/MUCS.md)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import torch

# Parameters whose name contains any of these substrings stay frozen during unlearning
# (the reference's `frozen_params`). On the reference DiT this leaves the block-MLP weights
# (and the condition embedder's weights of conditional models) trainable.
REFERENCE_FROZEN: tuple[str, ...] = (
    "encoder.",
    "decoder.",
    "s_embedder.",
    ".xdrop",
    "a_embedder.",
    "x_embedder.",
    "pos_enc.",
    ".attention.qkv",
    ".attention.proj",
    ".adapter.",
    "unpatchify.",
    "last.",
    ".bias",
)

# A predicate gets (name, parameter) and returns True when the parameter is FROZEN.
FrozenSpec = Union[Sequence[str], Callable[[str, torch.nn.Parameter], bool], None]


@dataclasses.dataclass
class MUCSConfig:
    """Hyper-parameters of MUCS attribution.

    Every default is the reference's (spec/MUCS.md; where a run still differs from the reference's,
    e.g. its random streams, README "Differences from the reference" says). The fields below `seed`
    are engine options that do not change scores (except where a docstring line says so).
    """

    num_noises: int = 100
    """M: size of the shared inference noise bank."""
    t_sched_infer: Union[float, str, None] = 0.7
    """Fraction of the Karras grid spanned by the bank (M of int(M / t) levels, largest first);
    None: log-normal σ as in training; "auto": estimated from training-image distances."""
    t_sched_train: Union[float, str, None] = None
    """Training/unlearning σ schedule (None: log-normal, the reference default)."""
    lamb: float = 0.2
    """λ: weight of the (bounded) ascent term, objective = L_r − λ·L_f."""
    tolerance: float = 0.05
    """Stop once L_f ≥ (1 − tolerance)·L_null."""
    lr: Optional[float] = None
    """Unlearning learning rate; None: the model's training lr / lr_factor."""
    lr_factor: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    loss_null: Union[str, float] = "auto"
    """L_null: "auto" (mean loss of a freshly initialized model) or a number."""
    loss_null_batches: int = 200
    """Up to this many retain batches (one epoch at most, as the reference) for loss_null="auto"."""
    max_steps: Optional[int] = None
    """None: stop rule. An int S: exactly S steps, no stop rule (the reference's semantics)."""
    safety_steps: int = 1000
    """Cap on unlearning steps under the stop rule (the reference can loop forever); hits are
    reported per target in the result (stop reason "cap")."""
    batch_size: Optional[int] = None
    """B: retain and forget batch size; None: num_noises (the reference default)."""
    bounded: bool = True
    """Clamp each forget-sample loss at L_null (the bound). False: the "unbounded" ablation (plain
    gradient ascent on the target; the stop rule still applies)."""
    use_loss_ratio: bool = True
    use_same_noise_infer: bool = True
    use_same_noise_train: bool = False
    eps: float = 1e-3
    frozen: FrozenSpec = None
    """Substrings, or a predicate (name, param) -> frozen; None: the denoiser's default
    (REFERENCE_FROZEN for EDM nets)."""
    seed: int = 45
    precision: str = "auto"
    """Scoring precision: "auto" (the reference's policy: bf16 autocast on CUDA with fp32 loss
    accumulation, fp32 elsewhere), "fp32" or "bf16". Unlearning always runs in fp32."""

    # Adaptive scoring (opt-in; adaptive.py): changes which scores are computed exactly.
    adaptive_top_k: Optional[int] = None
    """None: exact scoring (every image on the full bank). k: screen the training images on a
    stratified prefix of the bank and score on the full bank only those that can still reach each
    target's top-k (plus an audit sample); the others keep their screening estimate (res.exact)."""
    adaptive_margin: float = 3.0
    """z: an image is set aside when its paired upper bound (estimate + z·standard error) is below
    the k-th largest lower bound; larger = safer and slower."""
    adaptive_screen_noises: Optional[int] = None
    """Noises per screening segment (set-aside checks after 1, 2, 4, … segments); None: ⌈M/16⌉, at
    least 2."""
    adaptive_audit: float = 0.02
    """Fraction of the set-aside images scored on the full bank anyway, to estimate the miss
    rate."""

    # Engine options (do not change scores).
    targets_per_batch: int = 1
    """K targets unlearned and scored together."""
    score_batch: Optional[int] = None
    """Image·noise pairs per scoring forward; None: a device-dependent default."""
    compile: Union[bool, str] = "auto"
    """torch.compile the scoring passes (the original model's and the unlearned copies', one graph):
    "auto" = when a pass has ≥ 100,000 image·noise pairs (where the one-off compile pays; see
    BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> None:
            raise ValueError(
                f"MUCSConfig.{field}: expected {expected}, got {getattr(self, field)!r}"
            )

        if not (isinstance(self.num_noises, int) and self.num_noises >= 1):
            bad("num_noises", "an int >= 1")
        for field in ("t_sched_infer", "t_sched_train"):
            v = getattr(self, field)
            if not (v is None or v == "auto" or (isinstance(v, (int, float)) and 0 < v <= 1)):
                bad(field, 'a float in (0, 1], None or "auto"')
        if isinstance(self.loss_null, str):
            if self.loss_null != "auto":
                bad("loss_null", '"auto" or a positive number')
        elif not (
            isinstance(self.loss_null, (int, float))
            and math.isfinite(self.loss_null)
            and self.loss_null > 0
        ):
            bad("loss_null", '"auto" or a positive number')
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "a positive number or None")
        if self.max_steps is not None and not (
            isinstance(self.max_steps, int) and self.max_steps >= 1
        ):
            # 0 steps would score the original model against itself: all scores 0
            bad("max_steps", "None or an int >= 1")
        if not (isinstance(self.safety_steps, int) and self.safety_steps >= 1):
            bad("safety_steps", "an int >= 1")
        if self.batch_size is not None and not (
            isinstance(self.batch_size, int) and self.batch_size >= 1
        ):
            bad("batch_size", "None or an int >= 1")
        if not (isinstance(self.targets_per_batch, int) and self.targets_per_batch >= 1):
            bad("targets_per_batch", "an int >= 1")
        if self.score_batch is not None and not (
            isinstance(self.score_batch, int) and self.score_batch >= 1
        ):
            bad("score_batch", "None or an int >= 1")
        if not 0 <= self.tolerance < 1:
            bad("tolerance", "a float in [0, 1)")
        if not self.eps >= 0:
            bad("eps", "a float >= 0")
        if self.compile not in (True, False, "auto"):
            bad("compile", 'True, False or "auto"')
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", '"auto", "fp32" or "bf16"')
        if self.adaptive_top_k is not None:
            if not (
                isinstance(self.adaptive_top_k, int)
                and not isinstance(self.adaptive_top_k, bool)
                and self.adaptive_top_k >= 1
            ):
                bad("adaptive_top_k", "None or an int >= 1")
            if not self.use_same_noise_infer:
                raise ValueError(
                    "MUCSConfig.adaptive_top_k needs the shared bank (use_same_noise_infer=True): "
                    "screening compares images under the same noises"
                )
            if self.num_noises < 2:
                bad(
                    "num_noises",
                    "an int >= 2 with adaptive_top_k (a screening bound needs two noises)",
                )
        if not (isinstance(self.adaptive_margin, (int, float)) and self.adaptive_margin >= 0):
            bad("adaptive_margin", "a number >= 0")
        if self.adaptive_screen_noises is not None and not (
            isinstance(self.adaptive_screen_noises, int) and 2 <= self.adaptive_screen_noises
        ):
            bad("adaptive_screen_noises", "None or an int >= 2")
        if not (isinstance(self.adaptive_audit, (int, float)) and 0 <= self.adaptive_audit <= 1):
            bad("adaptive_audit", "a fraction in [0, 1]")
        if isinstance(self.frozen, str):
            bad("frozen", "a sequence of substrings (not one string), a predicate or None")

    @property
    def B(self) -> int:
        return self.num_noises if self.batch_size is None else self.batch_size

    def to_dict(self) -> dict:
        """JSON-able view (a predicate in `frozen` is recorded by its name)."""
        d = dataclasses.asdict(self)
        if callable(self.frozen):
            d["frozen"] = f"<predicate {getattr(self.frozen, '__qualname__', repr(self.frozen))}>"
        elif self.frozen is not None:
            d["frozen"] = list(self.frozen)
        d["betas"] = list(self.betas)
        return d

    # Fields that change the unlearned models or the scores: the cache/resume key.
    def score_fields(self) -> dict:
        d = self.to_dict()
        for k in ("targets_per_batch", "score_batch", "compile"):
            d.pop(k)
        return d
