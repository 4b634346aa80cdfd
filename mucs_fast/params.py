"""Which parameters unlearning may change (spec/MUCS.md, "Trainable parameters")."""

from __future__ import annotations

from typing import Sequence

import torch

from .config import FrozenSpec


def is_frozen(name: str, param: torch.nn.Parameter, frozen: FrozenSpec) -> bool:
    """Substring rule of the reference (any pattern in the name → frozen), or a user predicate."""
    if callable(frozen):
        return bool(frozen(name, param))
    return any(pattern in name for pattern in frozen)


def trainable_names(net: torch.nn.Module, frozen: FrozenSpec) -> list[str]:
    """Names of the parameters unlearning updates, in `named_parameters` order."""
    names = [n for n, p in net.named_parameters() if not is_frozen(n, p, frozen)]
    if not names:
        raise ValueError(
            f"the frozen parameter spec leaves no trainable parameter in {type(net).__name__} "
            f"({sum(1 for _ in net.named_parameters())} parameters, e.g. "
            f"{[n for n, _ in list(net.named_parameters())[:3]]}); pass MUCSConfig(frozen=...)"
        )
    return names


def set_trainable(net: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Parameter]:
    """requires_grad = True exactly for `names`; returns those parameters in order."""
    keep = set(names)
    params = []
    for n, p in net.named_parameters():
        p.requires_grad_(n in keep)
        if n in keep:
            params.append(p)
    return params
