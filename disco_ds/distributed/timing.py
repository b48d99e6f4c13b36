"""Counters and timers of the distributed optimizer step, read at logging time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Stopwatch", "ExchangeStats"]


class Stopwatch:
    """Accumulated duration of timed regions, read at logging time.

    On a CUDA device a region is bracketed by two CUDA events on the device's current stream: the
    host only enqueues work there, so its own clock would measure the launch, not the work, and
    waiting for the work would stall the step. The events are read by :meth:`seconds` (the logging
    step calls it), which waits for them. Elsewhere (the CPU, where work runs synchronously) the
    host clock measures the region.
    """

    _MAX_PENDING = 256
    """Unread event pairs kept before the completed ones are folded in without waiting (bounds
    memory when nobody reads the timer)."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._pending: list[tuple[Any, Any]] = []

    @contextmanager
    def region(self, device: torch.device) -> Iterator[None]:
        """Time the enclosed code's work on ``device``."""
        if device.type != "cuda":
            start = time.perf_counter()
            try:
                yield
            finally:
                self._seconds += time.perf_counter() - start
            return
        stream = torch.cuda.current_stream(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            self._pending.append((begin, end))
            if len(self._pending) > self._MAX_PENDING:
                self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        unread = []
        for begin, end in self._pending:
            if wait:
                end.synchronize()
            elif not end.query():
                unread.append((begin, end))
                continue
            self._seconds += begin.elapsed_time(end) / 1000.0  # milliseconds
        self._pending = unread

    def seconds(self) -> float:
        """Total seconds so far (waits for the device work of pending regions)."""
        self._collect(wait=True)
        return self._seconds


@dataclass
class ExchangeStats:
    """Counters of one rank, cumulative over steps (read by tests and the instrumentation)."""

    matrices_orthogonalized: int = 0
    rounds: int = 0
    elements_sent: int = 0
    bytes_sent: int = 0
    all_to_all_calls: int = 0
    all_reduce_calls: int = 0
    all_gather_calls: int = 0
    """Stage 0 / DDP rounds returning every owner's updates with one ``all_gather_into_tensor``."""
    broadcast_calls: int = 0
    """Stage 0 / DDP rounds returning them with one ``broadcast`` per owner instead."""
    comm: Stopwatch = field(default_factory=Stopwatch)
    """Time inside the optimizer's collectives (includes waiting for the slowest rank)."""
    ns: Stopwatch = field(default_factory=Stopwatch)
    """Time of the matrix LMOs (Newton–Schulz) this rank ran."""
    step: Stopwatch = field(default_factory=Stopwatch)
    """Time of the optimizer's ``step()`` calls (communication and Newton–Schulz included)."""
    per_member: dict[Any, int] = field(default_factory=dict)

    @property
    def comm_seconds(self) -> float:
        return self.comm.seconds()

    @property
    def ns_seconds(self) -> float:
        return self.ns.seconds()

    @property
    def step_seconds(self) -> float:
        return self.step.seconds()
