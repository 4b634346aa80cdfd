"""Results that cannot be silent garbage: each result is allocated as NaN (so an entry never
written cannot pass for a score) and the writes to it are counted; a result leaves the function
that fills it — returned, combined over ranks or saved — only when every entry was written
exactly once. A read that drops or repeats a range of images then fails the run, naming the
entries, instead of handing back uninitialized memory or a double-counted sum.
"""

from __future__ import annotations

import math

import torch


def nan_tensor(*shape: int, device=None) -> torch.Tensor:
    """float32 tensor of `shape` filled with NaN (what an unwritten result entry reads as)."""
    return torch.full(shape, math.nan, dtype=torch.float32, device=device)


class Writes:
    """How often each of n entries (columns of a result) was written; counted on the CPU from the
    ranges the caller writes, so no device sync is needed. Under torchrun the counts of the ranks
    are summed (`Group.sum_(writes.count)`) before `require_full`."""

    def __init__(self, n: int, what: str):
        self.count = torch.zeros(int(n), dtype=torch.int32)
        self.what = what

    def mark(self, start: int, stop: int) -> None:
        self.count[start:stop] += 1

    def require_full(self) -> None:
        """RuntimeError unless every entry was written exactly once."""
        bad = (self.count != 1).nonzero().reshape(-1)
        if bad.numel():
            i = int(bad[0])
            raise RuntimeError(
                f"{self.what}: {bad.numel()} of {self.count.numel()} entries were not written "
                "exactly "
                f"once (the first, entry {i}, {int(self.count[i])} times): a read dropped or "
                "repeated "
                "a range; no result is returned"
            )
