"""Runs you can trust, end to end: damaged checkpoints fall back, a resume never silently changes
the run, a diverging run stops, a full disk is named.

One 2-rank run (``deepspeed`` launcher, CPU, gloo: 12 steps, checkpoints at 4, 8 and 12) is the
reference; every test works on a copy of its run directory. Launches that stop before the engine
(a refused resume) or that do not need two ranks run as a single process, which is also the world
size change under test (2 ranks → 1).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port
from test_train import ENV, REPO, data_dir, launcher, losses, overrides, run  # noqa: F401 -- data_dir is a fixture

STEPS, EVERY = 12, 4
EXTRA = {"train.max_steps": STEPS, "checkpoint.interval": EVERY, "checkpoint.keep": 3}


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run(launcher(overrides(data_dir, run_dir, **EXTRA), free_port()))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step_*"))] == \
        [ckpt(run_dir, s).name for s in (4, 8, 12)]
    return run_dir


def copy_of(reference: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


def single_process(data: Path, run_dir: Path, env: dict | None = None, **extra: object) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "disco_ds", "train", str(REPO / "recipes/tiny.yaml"),
                *overrides(data, run_dir, **{**EXTRA, **extra})], env=env)


def test_damaged_newest_checkpoints_fall_back_to_the_one_that_verifies(data_dir: Path, reference: Path,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    run_dir = copy_of(reference, tmp_path)
    optim = ckpt(run_dir, 12) / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(optim, "r+b") as f:  # 4 KiB of garbage inside the momentum: torch would load it silently
        f.seek(optim.stat().st_size // 2)
        f.write(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    model = ckpt(run_dir, 8) / "ds" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])

    verify = run([sys.executable, "-m", "disco_ds", "verify", str(run_dir)])
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert f"{ckpt(run_dir, 4)}  ok" in verify.stdout
    assert f"{ckpt(run_dir, 8)}  DAMAGED\n    ds/mp_rank_00_model_states.pt: " in verify.stdout
    assert f"{ckpt(run_dir, 12)}  DAMAGED\n    ds/zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 differs" in verify.stdout

    resumed = run(launcher(overrides(data_dir, run_dir, **EXTRA), free_port()))
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    out = resumed.stdout
    assert (f"checkpoint {ckpt(run_dir, 12)} is damaged, skipping it: ds/zero_pp_rank_1_mp_rank_00_optim_states.pt: "
            "sha256 differs") in out
    assert f"checkpoint {ckpt(run_dir, 8)} is damaged, skipping it: ds/mp_rank_00_model_states.pt: " in out
    assert f"resumed     {ckpt(run_dir, 4)} (step 4" in out
    assert losses(run_dir) == losses(reference)  # the same run, from step 4 on
    assert run([sys.executable, "-m", "disco_ds", "verify", str(run_dir)]).returncode == 0


def test_resume_refuses_another_world_size_and_recipe(data_dir: Path, reference: Path, tmp_path: Path) -> None:  # noqa: F811
    run_dir = copy_of(reference, tmp_path)
    refused = single_process(data_dir, run_dir, **{"optimizer.momentum": 0.5})
    assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
    for expected in (f"resuming {ckpt(run_dir, 12)} would change the run", "plan.world_size: 2 → 1",
                     "plan.accumulation: 1 → 2", "optimizer.momentum: 0.1 → 0.5", "checkpoint.allow_change=true"):
        assert expected in refused.stderr, refused.stderr[-3000:]
    assert "plan.batch_tokens" not in refused.stderr and "plan.lr" not in refused.stderr  # the batch is kept


def test_allowed_change_resumes_on_one_rank_through_the_portable_file(data_dir: Path, reference: Path,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    run_dir = copy_of(reference, tmp_path)
    shutil.rmtree(ckpt(run_dir, 12))
    proc = single_process(data_dir, run_dir, **{"checkpoint.allow_change": "true", "optimizer.momentum": 0.5})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    changes = [line.split("checkpoint.allow_change: ")[1] for line in proc.stdout.splitlines()
               if line.startswith("resume      change allowed")]
    assert changes == ["plan.world_size: 2 → 1", "plan.accumulation: 1 → 2", "optimizer.momentum: 0.1 → 0.5"]
    assert f"resumed     {ckpt(run_dir, 8)} (step 8, " in proc.stdout and "through its portable.pt" in proc.stdout
    # Step 9's loss is measured on the restored weights, before any update: the two-rank run's, on
    # one rank (the same global batch, the data position carried over; only fp32 sums reassociate).
    assert losses(run_dir)[9] == pytest.approx(losses(reference)[9], rel=1e-5)
    # The run continued with the new momentum, not the one the checkpoint's optimizer state held.
    saved = torch.load(ckpt(run_dir, 12) / "portable.pt", weights_only=True)
    assert {g["hyperparameters"]["momentum"] for g in saved["param_groups"]} == {0.5}
    state = json.loads((ckpt(run_dir, 12) / "trainer_state.json").read_text())
    assert state["run"]["plan.world_size"] == 1 and state["run"]["plan.batch_tokens"] == state["batch_tokens"]


def test_full_disk_during_save_is_named_and_keeps_the_previous_checkpoints(data_dir: Path, reference: Path,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    run_dir = copy_of(reference, tmp_path)
    env = {**ENV, "DISCO_DS_FAULT": "save-enospc@1"}  # every write of rank 1 fails as on a full disk
    proc = run(launcher(overrides(data_dir, run_dir, **{**EXTRA, "train.max_steps": 14}), free_port()), env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    partial = run_dir / "checkpoints" / ".tmp_step_00000014"
    assert f"disco-ds: checkpoint error: saving the checkpoint of step 14 to {ckpt(run_dir, 14)} failed (rank 1: {partial}" \
        in proc.stderr, proc.stderr[-3000:]
    assert f"{partial}/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt: No space left on device (ENOSPC)" in proc.stderr
    assert not partial.exists() and not ckpt(run_dir, 14).exists()
    assert run([sys.executable, "-m", "disco_ds", "verify", str(run_dir)]).returncode == 0  # 4, 8, 12 intact


def test_diverging_loss_stops_with_exit_3(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """lr 1e6: the loss explodes but stays finite (the issue's 1.48e6); the default bound stops it."""
    run_dir = tmp_path / "diverged"
    proc = single_process(data_dir, run_dir, **{"optimizer.lr": 1e6, "checkpoint.interval": 1, "train.max_steps": 6,
                                                "logging.interval": 1})
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if "above train.max_loss" in line)
    step = int(line.split(" at step ")[1].split(":")[0])
    assert "train.max_loss = 9.65" in line and "the run diverged: stopping" in line  # 1.5·ln(320) + 1
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert saved[-1] == ckpt(run_dir, step - 1) and (saved[-1] / "COMPLETE").is_file()
    assert json.loads((saved[-1] / "trainer_state.json").read_text())["loss"] < 9.65
