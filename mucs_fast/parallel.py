"""Which work runs where: the process group and the plan of units (blocks of targets × shards).

Ranks come from torch.distributed: a group the caller initialized, or torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK and the c10d rendezvous it set up), initialized here — NCCL on CUDA,
gloo on CPU. One plain process is rank 0 of 1 and needs no group.

The plan. The training set is cut into shards of whole scoring chunks; the chunk grid and the shards
depend on N and the chunk size only, never on the number of processes, so every loss and every score
comes from the same chunk call whatever the world size — results are bitwise the same for 1 or W
processes on CPU. Shards go to ranks round-robin. Blocks of targets go to ranks in rounds of W: in a
round, rank r unlearns block r; then each block's trainable weights are broadcast from its owner and
every rank scores its own shards with them. So one target on W ranks scores as fast as W targets,
and unlearning (a few percent of the work) runs in parallel whenever there are blocks to spread.
Partial results are combined with a sum over ranks of tensors that are zero outside each rank's
shards: exactly one rank contributes to each entry, so the sum is exact.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

# A shard is at most this many images (rounded to whole chunks) and the set has at least
# MIN_SHARDS shards when it has that many chunks: enough units to balance W ranks.
SHARD_IMAGES = 4096
MIN_SHARDS = 16


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@dataclasses.dataclass
class Group:
    """This process's place in the job: rank, world size, and where collectives take tensors."""

    rank: int = 0
    world: int = 1
    comm_device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (exact here: other ranks contribute zeros at this rank's
        entries)."""
        if not self.distributed:
            return t
        buf = t.to(self.comm_device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
        return t

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        if not self.distributed:
            return t
        buf = t.to(self.comm_device)
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf)
        return t

    def broadcast_object(self, obj: Any, src: int) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src, device=self.comm_device)
        return box[0]


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join(device) -> tuple[Group, torch.device]:
    """(this process's Group, its device). Initializes the default group from torchrun's
    environment when WORLD_SIZE > 1 and no group exists yet; device None / "cuda" under several
    processes means this rank's GPU, cuda:LOCAL_RANK."""
    world = _env_world()
    if world > 1 and dist.is_available() and not dist.is_initialized():
        on_cpu = (
            device is not None and torch.device(device).type == "cpu"
        )  # torch.device("cpu") != "cpu"
        backend = "nccl" if torch.cuda.is_available() and not on_cpu else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        # the group we made is ours to tear down: a gloo group left to interpreter shutdown can
        # abort
        # the process ("terminate called without an active exception") after the work is done
        atexit.register(_destroy_group)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Group(), _device(device, None)
    local = int(
        os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count() or 1))
    )
    dev = _device(device, local)
    comm = dev if dist.get_backend() == "nccl" else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), comm), dev


def _device(device, local_rank: Optional[int]) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: unknown device {device!r} ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} is not available (torch sees no CUDA device)")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {device!r} is not available ({torch.cuda.device_count()} CUDA devices)"
            )
    return dev


@dataclasses.dataclass
class Plan:
    """Shards of the training set (start, stop) and blocks of targets, and who does what."""

    shards: list
    blocks: list
    group: Group

    @classmethod
    def make(cls, N: int, per: int, todo: list, K_block: int, group: Group) -> "Plan":
        chunks = math.ceil(N / per)
        per_shard = max(1, min(math.ceil(SHARD_IMAGES / per), math.ceil(chunks / MIN_SHARDS)))
        step = per_shard * per
        shards = [(s, min(N, s + step)) for s in range(0, N, step)]
        blocks = [todo[i : i + K_block] for i in range(0, len(todo), K_block)]
        return cls(shards, blocks, group)

    def my_shards(self) -> list:
        """Indices of the shards this rank computes."""
        g = self.group
        return [i for i in range(len(self.shards)) if i % g.world == g.rank]

    def rounds(self) -> list:
        """[[(block index, owner rank), ...], ...]: each round's blocks, one per rank at most."""
        W = self.group.world
        idx = list(range(len(self.blocks)))
        return [[(b, b % W) for b in idx[r : r + W]] for r in range(0, len(idx), W)]
