"""Training batches on the accelerator before the step asks for them.

:class:`DevicePrefetcher` keeps the next ``depth`` micro-batches of a :class:`TokenStream` read,
in page-locked host memory, and already copying to the device: on CUDA the copies run on a side
stream, so they overlap the step's kernels, and the step's stream waits for them with a stream
dependency (an event on the device), never with a host sync. Without an accelerator the batches
are the stream's own tensors (pinning needs a device to copy to). The batches are read with
:meth:`TokenStream.peek` and the position moves only when a batch is handed out, so the
stream's :meth:`~TokenStream.state_dict` counts exactly the batches trained on: a checkpoint
taken between steps resumes with the batch that was prefetched but not yet used.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import torch

__all__ = ["DevicePrefetcher", "to_device"]


class _Peekable(Protocol):
    def peek(self, ahead: int = 0) -> tuple[torch.Tensor, ...]: ...

    def skip(self, steps: int = 1) -> None: ...


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``batch`` (host memory) on ``device`` without waiting, on the current stream: a copy from
    pageable memory would block the host until the accelerator has finished all queued work; from
    pinned memory it is queued like a kernel. On the CPU, ``batch`` itself."""
    if device.type == "cpu":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


class DevicePrefetcher:
    """The micro-batches of ``stream`` on ``device``, the next ``depth`` of them already on their way.

    Args:
        stream: a :class:`~disco_ds.data.TokenStream` (anything with ``peek(ahead)`` and ``skip()``).
        device: where the batches go. ``cpu``: no pinning, no copy (the stream's tensors as they
            are). ``cuda``: pinned, copied with ``non_blocking=True`` on a side stream. Any other
            accelerator: pinned and copied ``non_blocking`` on its current stream.
        depth: batches kept ahead (1 hides one batch's read and copy behind a micro-step; more
            only hold more pinned and device memory).

    :meth:`next_batch` returns exactly what ``stream.next_batch()`` would, on ``device``. The
    batches ahead are read from the stream's position at the time: set it (resume) first.
    """

    def __init__(self, stream: _Peekable, device: torch.device | str, depth: int = 1):
        if int(depth) != depth or depth < 1:
            raise ValueError(f"prefetch depth must be a positive integer, got {depth!r}")
        self.stream = stream
        self.device = torch.device(device)
        self.depth = int(depth)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: deque[tuple[torch.Tensor, ...]] = deque()

    def _start(self, ahead: int) -> tuple[torch.Tensor, ...]:
        """Read the batch ``ahead`` steps after the next one and start its copy to the device."""
        batch = self.stream.peek(ahead)
        if self.device.type == "cpu":
            return batch
        if self._side is None:
            return tuple(to_device(t, self.device) for t in batch)
        # No wait for the consumer's stream: the caching allocator keeps a pool per stream, so
        # the side stream never gets memory the consumer's queued kernels may still use.
        pinned = [t.pin_memory() for t in batch]
        with torch.cuda.stream(self._side):
            return tuple(t.to(self.device, non_blocking=True) for t in pinned)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The stream's next micro-batch on the device (its position moves on by one step); the
        copies of the following ``depth`` batches are started before it returns."""
        while len(self._ahead) < self.depth:
            self._ahead.append(self._start(len(self._ahead)))
        batch = self._ahead.popleft()
        self.stream.skip()
        if self._side is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(self._side)
            for t in batch:
                # Allocated on the side stream, used on the consumer's: the allocator must not
                # reuse the memory until the consumer's work on it is done.
                t.record_stream(consumer)
        self._ahead.append(self._start(self.depth - 1))
        return batch
