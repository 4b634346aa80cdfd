"""Reading ahead: the next chunks of a streamed source on a background thread, so that the disk
(or page cache) and the model's forward overlap.

The thread only reads; the consumer moves each chunk to the device on its own stream. One reader
per pass; closing the iterator joins it, and an error in it re-raises in the consumer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def prefetch(source, ranges, device, depth: int = 2) -> Iterator[tuple[int, int, torch.Tensor]]:
    """`source`: a `Source` (anything with `read(start, stop)` and `check_range`). Yield (start,
    stop, images float32 [stop−start, C, H, W] on device) for each range, in order, while a
    background thread reads up to `depth` ranges ahead. On CUDA the host tensor is pinned and copied
    with non_blocking=True (on the current stream). An error in the reader re-raises here; closing
    the iterator (break + close(), garbage collection, an exception in the caller) stops and joins
    the thread. Ranges are checked before anything is read."""
    ranges = [source.check_range(a, b) for a, b in ranges]
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"prefetch: depth must be a positive int, got {depth!r}")
    return _prefetch(source, ranges, torch.device(device), depth)


def _prefetch(source, ranges, device: torch.device, depth: int):
    pin = device.type == "cuda"
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def reader():
        try:
            for a, b in ranges:
                if stop.is_set():
                    return
                x = source.read(a, b)
                if pin:
                    x = x.pin_memory()
                if not put((a, b, x)):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
            put(_Failure(e))

    t = threading.Thread(target=reader, name=f"mucs_fast-prefetch-{id(q):x}", daemon=True)
    t.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if not t.is_alive() and q.empty():
                    raise RuntimeError(
                        "prefetch: the reader thread stopped without a result"
                    ) from None
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            a, b, x = item
            yield a, b, x.to(device, non_blocking=pin)
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)
