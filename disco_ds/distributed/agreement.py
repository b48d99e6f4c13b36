"""Failing together, and ending cleanly: checks that can fail on one rank only are agreed over the
group before anyone raises (a rank raising alone leaves the others waiting in the next collective
until the process group's timeout), the test hook that injects such failures, and the device
collectives must use.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from disco_ds.distributed.layout import group_rank_and_size

__all__ = ["accelerator_device", "FAULT_ENV", "injected_fault", "RankCheckError", "raise_if_any_failed", "shutdown_and_exit"]


def accelerator_device() -> torch.device:
    """DeepSpeed's accelerator device of this rank, where its collectives expect tensors (the
    CPU under DeepSpeed's CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())

FAULT_ENV = "DISCO_DS_FAULT"
"""Test hook shared with :mod:`disco_ds.trainer.checkpoint`: ``<check>@<rank>`` makes the named check of
:func:`injected_fault` fail on that global rank only (tests/test_fault_agreement.py)."""


def injected_fault(check: str) -> bool:
    """Whether the test hook :data:`FAULT_ENV` asks ``check`` to fail on this rank."""
    name, _, rank = os.environ.get(FAULT_ENV, "").partition("@")
    if name != check or not rank.isdigit():
        return False
    return int(rank) == (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)


class RankCheckError(RuntimeError):
    """A check failed on some ranks of a process group; every rank of the group raises this, with
    the same message."""


def raise_if_any_failed(error: str | None, group: Any, device: torch.device, what: str) -> None:
    """Turn a check that can fail on some ranks only into the same error on every rank.

    A rank that raised alone would leave the others waiting in the step's next collective until
    the process group's timeout (30 minutes by default). Instead every rank reports its verdict
    (``error``: None when its check passed) in one all-reduce of one flag per rank, on ``device``
    (the communication device). If any rank failed, the failing ranks' messages are shared (one
    ``all_gather_object``) and every rank raises :class:`RankCheckError` naming them.

    Reading the verdict waits for the device: call it for first-step and new-layout checks, not
    on every step.
    """
    rank, world = group_rank_and_size(group)
    if world == 1:
        if error is not None:
            raise RankCheckError(f"{what} failed: {error}")
        return
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    if error is not None:
        flags[rank] = 1
    dist.all_reduce(flags, group=group)
    failed = [r for r, flag in enumerate(flags.tolist()) if flag]
    if not failed:
        return
    messages: list[Any] = [None] * world
    dist.all_gather_object(messages, error, group=group)
    details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
    raise RankCheckError(f"{what} failed on {len(failed)} of {world} ranks ({details})")


def shutdown_and_exit(code: int = 0) -> NoReturn:
    """End a launched rank cleanly: barrier, destroy the process group, exit with ``code``.

    gloo on CPU sometimes aborts in its destructors after all work is done, which would turn a
    finished run into a failed one; the process therefore leaves without running them, after
    flushing its output. Call it last, once results are written.

    DeepSpeed's CPU accelerator creates a 67 MB shared-memory buffer per rank for its all-reduce
    (``/dev/shm/deepspeed_allreduce_buffer_*``) and never removes it, so every run on a host would
    leave them behind until memory-backed ``/dev/shm`` fills up; this rank's is removed here, after
    the barrier (no rank uses it any more; unlinking keeps existing mappings valid).
    """
    rank = None
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.barrier()
        dist.destroy_process_group()
    if rank is not None:
        _remove_deepspeed_shm_buffer(rank)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _remove_deepspeed_shm_buffer(rank: int) -> None:
    """Unlink the all-reduce buffer DeepSpeed's CPU shm op named after this rank (its name is built
    from the user id, ``MASTER_ADDR``, ``MASTER_PORT`` and the global rank); nothing if absent."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if address is None or port is None or not hasattr(os, "getuid"):
        return
    try:
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}")
    except FileNotFoundError:
        pass
