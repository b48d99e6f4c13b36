"""A check that fails on one rank fails on every rank, promptly, instead of hanging the others.

Each case starts W real processes (DeepSpeed on the CPU accelerator, gloo) and makes one check fail
on one rank only through the ``DISCO_DS_FAULT=<check>@<rank>`` test hook. Without agreement the
failing rank would exit while the others wait in the step's next collective until gloo's
30-minute timeout. The ranks are started directly, not under ``torchrun``, whose agent would
terminate the survivors as soon as one rank exits and so hide a hang: here every process must
exit by itself, with the error, within 60 s of the first one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import free_port, worker_env

TESTS = Path(__file__).parent
GRACE_S = 60
STARTUP_S = 600  # DeepSpeed's import and first-run op build on a loaded machine


def launch_ranks(script: Path, world: int, args: list[str], fault: str, tmp_path: Path) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = worker_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                         LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DISCO_DS_FAULT=fault)
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen]) -> list[float | None]:
    """Seconds after the first exit at which each rank exited (None: still running after the grace)."""
    deadline = time.monotonic() + STARTUP_S
    while all(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    first = time.monotonic()
    exits: list[float | None] = [None] * len(procs)
    while time.monotonic() < first + GRACE_S:
        for i, p in enumerate(procs):
            if exits[i] is None and p.poll() is not None:
                exits[i] = time.monotonic() - first
        if all(e is not None for e in exits):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return exits


def assert_every_rank_fails(worker: Path, cfg: str, fault: str, tmp_path: Path, needles: list[str]) -> None:
    """Two ranks of ``worker`` with ``fault`` injected on one: every rank must exit non-zero within
    GRACE_S of the first, each reporting every needle (the same error everywhere)."""
    procs = launch_ranks(worker, 2, [cfg, str(tmp_path / "result.pt")], fault, tmp_path)
    exits = wait_all(procs)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(len(procs))]
    assert all(e is not None for e in exits), f"ranks still running {GRACE_S} s after the first exit: {exits}\n" + \
        "\n".join(log[-2000:] for log in logs)
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode != 0, f"rank {r} exited 0:\n{log[-3000:]}"
        assert all(n in log for n in needles), f"rank {r}:\n{log[-3000:]}"


ZERO_CFG = {"micro_batch": 3, "accum": 1, "steps": 2, "lr": 0.05, "comm_dtype": "float32", "ns_method": "svd"}
CASES = [
    # (check that fails, its rank, ZeRO stage, what every rank must report)
    ("layout-self-test", 1, 2, "the first-step check of a ZeRO flat partition failed on 1 of 2 ranks"),
    ("missing-gradient", 0, 3, "the first-step check of a ZeRO flat partition failed on 1 of 2 ranks"),
    ("zero-gradient-skip", 1, 0, "gradients differ across data-parallel ranks"),
]


@pytest.mark.parametrize("check,rank,stage,message", CASES, ids=[c[0] for c in CASES])
def test_a_fault_on_one_rank_stops_every_rank(tmp_path: Path, check: str, rank: int, stage: int, message: str) -> None:
    cfg = json.dumps({**ZERO_CFG, "stage": stage})
    assert_every_rank_fails(TESTS / "zero_worker.py", cfg, f"{check}@{rank}", tmp_path, ["RankCheckError", message])


def test_a_tensor_parallel_layout_fault_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    cfg = json.dumps({"tp": 2, "stage": 1, "micro_batch": 2, "steps": 1, "lr": 0.02})
    assert_every_rank_fails(TESTS / "tp_worker.py", cfg, "tp-layout@1", tmp_path,
                            ["the tensor-parallel layout check failed on 1 of 2 ranks"])
