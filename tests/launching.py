"""Real multi-process launches for the tests: ``torchrun`` workers on the CPU accelerator (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now (for --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a launched rank: CPU accelerator, this checkout importable, one thread each."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def torchrun(script: Path, world: int, *args: str, env: dict[str, str] | None = None,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script *args`` as ``world`` ranks under ``torch.distributed.run``; output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, env=env or worker_env(), capture_output=True, text=True, timeout=timeout)
