"""`torch.load(weights_only=True)` of files that hold omegaconf containers (the reference stores
its config in every checkpoint and in its dataset's metadata.pt): the allowlist of exactly the
classes such a container pickles to, and nothing else — no arbitrary code runs."""

from __future__ import annotations

import builtins
import collections
import contextlib
import typing

import torch

_SAFE_BUILTINS = (
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "int",
    "float",
    "complex",
    "str",
    "bytes",
    "bool",
    "object",
)


def omegaconf_globals() -> list:
    """The classes a pickled omegaconf container refers to (DictConfig, ListConfig, their
    metadata, every node type), plus the plain types and `typing.Any` their metadata records.
    Empty when omegaconf is not installed (then no checkpoint can hold its objects)."""
    try:
        import omegaconf
        from omegaconf import base, nodes
    except ImportError:
        return []
    out = [
        omegaconf.DictConfig,
        omegaconf.ListConfig,
        base.ContainerMetadata,
        base.Metadata,
        typing.Any,
        collections.defaultdict,
        collections.OrderedDict,
    ]
    out += [getattr(builtins, n) for n in _SAFE_BUILTINS]
    for name in dir(nodes):
        obj = getattr(nodes, name)
        if isinstance(obj, type) and issubclass(obj, base.Node) and obj not in out:
            out.append(obj)
    return out


@contextlib.contextmanager
def omegaconf_safe_globals():
    """`torch.load(weights_only=True)` inside this context accepts omegaconf containers (the
    reference's training script stores its config in every checkpoint; torch ≥ 2.6 loads with
    weights_only=True by default and refuses them). Nothing else is allowlisted."""
    allowed = omegaconf_globals()
    if not allowed:
        yield
        return
    with torch.serialization.safe_globals(allowed):
        yield


def install_omegaconf_safe_globals() -> None:
    """Process-wide version of `omegaconf_safe_globals` (for scripts that load checkpoints
    themselves, e.g. the reference's attrib.py through `python -m mucs_fast.compat`)."""
    allowed = omegaconf_globals()
    if allowed:
        torch.serialization.add_safe_globals(allowed)


def load_checkpoint(path, map_location="cpu", weights_only: bool = True):
    """`torch.load` of a reference checkpoint (or any file it writes), omegaconf objects included,
    still with weights_only=True: no arbitrary code runs."""
    with omegaconf_safe_globals():
        return torch.load(path, map_location=map_location, weights_only=weights_only)
