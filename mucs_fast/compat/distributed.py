"""Several processes (an initialized torch.distributed group) for the drop-in's engine path: rank
and world size, the device collectives run on, the targets each rank unlearns, one L_null for all
ranks, and the gather that gives every rank the full result (the reference scores only each
rank's shard and every rank writes the same files)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed group, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def collective_device(device: torch.device) -> torch.device:
    """Where the group's collectives take tensors: `device` for NCCL, the CPU otherwise."""
    return device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def rank_targets(K: int, rank: int, world: int) -> torch.Tensor:
    """Indices into the K targets that this rank unlearns (contiguous, near-equal shares)."""
    return torch.tensor_split(torch.arange(K), world)[rank]


def rank_run_dir(run_dir, rank: int, world: int):
    """The run directory of this rank (ranks persist their shards side by side)."""
    if run_dir is None or world == 1:
        return run_dir
    return os.path.join(run_dir, f"rank{rank}-of-{world}")


def broadcast_from_zero(compute: Callable[[], float], rank: int, device: torch.device) -> float:
    """`compute()` on rank 0, its value on every rank (e.g. L_null: identical stopping everywhere)."""
    val = torch.zeros(1, dtype=torch.float64, device=collective_device(device))
    if rank == 0:
        val[0] = compute()
    torch.distributed.broadcast(val, 0)
    return float(val[0])


def gather_results(
    scores: torch.Tensor, meta: dict | None, world: int
) -> tuple[torch.Tensor, dict]:
    """Every rank's (scores [K_r, N], meta) joined in rank order: (scores [K, N], meta) with the
    targets of all ranks, their flags and the world size. `meta` is None on a rank without targets."""
    parts = [None] * world
    torch.distributed.all_gather_object(parts, (scores.cpu(), meta))
    scores = torch.cat([p[0] for p in parts])
    metas = [p[1] for p in parts if p[1] is not None]
    meta = dict(metas[0])
    meta["targets"] = [t for m in metas for t in m["targets"]]
    meta["flagged"] = [i for i, t in enumerate(meta["targets"]) if t["stop"] in ("nan", "cap")]
    meta["world_size"] = world
    return scores, meta
