"""Training checkpoints: the DeepSpeed engine's own checkpoint plus the trainer's state, written so
that a crash at any moment never damages an earlier checkpoint.

Layout of one checkpoint (``RUN_DIR/checkpoints/step_00000100``)::

    latest                 DeepSpeed's tag file ("ds")
    ds/                    engine.save_checkpoint(…, tag="ds"): model, sharded optimizer state
    model/config.json      the model configuration (what ``disco_ds export`` rebuilds the model from)
    tokenizer/             the data's Hugging Face tokenizer files, when the data has them
    trainer_state.json     step, tokens, data position, plan
    rng/rank_<r>.pt        every rank's random generators
    config.yaml            the resolved run configuration
    COMPLETE               written last

Every rank writes into ``.tmp_step_…``; once all ranks are done, rank 0 writes ``COMPLETE`` and
renames the directory into place (a rename within one file system is atomic). A run killed while
saving leaves only a ``.tmp_`` directory, which :func:`latest_checkpoint` ignores and the next
save removes. The run directory must be on storage every node sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_dir", "COMPLETE"]

COMPLETE = "COMPLETE"
TAG = "ds"
FAULT_ENV = "DISCO_DS_FAULT"
"""Test hook: ``kill-during-save@STEP`` makes rank 0 SIGKILL itself after the engine files of step
STEP are written and before the checkpoint is completed (the resume tests use it)."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    engine: Any,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    run_config: dict[str, Any],
    model_config: Any,
    tokenizer_dir: Path | None,
    keep: int,
) -> Path:
    """Save a complete checkpoint of step ``step`` (collective: every rank calls it), then keep
    only the newest ``keep`` complete checkpoints. Returns the checkpoint directory."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    rank = _rank()
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".tmp_*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # the same step saved by a run that is being repeated
            shutil.rmtree(final)
    _barrier()
    engine.save_checkpoint(str(tmp), tag=TAG)
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        tmp / "rng" / f"rank_{rank}.pt",
    )
    if rank == 0:
        model_config.save_pretrained(tmp / "model")
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (tmp / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    _barrier()
    if rank == 0:
        if os.environ.get(FAULT_ENV) == f"kill-during-save@{step}":
            os.kill(os.getpid(), 9)
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(f"{step}\n")
        os.replace(tmp, final)
        complete = sorted(p for p in final.parent.glob("step_*") if (p / COMPLETE).is_file())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (partial saves are ignored), or None."""
    root = Path(run_dir) / "checkpoints"
    complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(engine: Any, path: Path) -> dict[str, Any]:
    """Restore the engine (weights, Scion's sharded state) and this rank's generators; returns the
    trainer state. Raises ``FileNotFoundError`` naming what is missing."""
    path = Path(path)
    for required in (COMPLETE, "trainer_state.json", TAG):
        if not (path / required).exists():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {required} is missing")
    load_path, _ = engine.load_checkpoint(str(path), tag=TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / TAG}")
    rng_file = path / "rng" / f"rank_{_rank()}.pt"
    if rng_file.is_file():  # absent when resuming at a different world size
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())
