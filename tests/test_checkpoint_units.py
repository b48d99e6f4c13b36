"""disco_ds.trainer.checkpoint's verification and disco_ds.trainer.resume's comparison, without launching a run:
checkpoints made of plain files with a manifest, plans compared as data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from disco_ds.trainer.checkpoint import (COMPLETE, MANIFEST_FORMAT, PORTABLE, CheckpointError, _hash_file, select_checkpoint,
                                 verify_checkpoint)
from disco_ds.trainer.config import load_config
from disco_ds.trainer.resume import plan_resume, run_record
from disco_ds.trainer.scaling import plan_run

REPO = Path(__file__).resolve().parents[1]


def fake_checkpoint(run_dir: Path, step: int, files: dict[str, bytes]) -> Path:
    """A complete checkpoint holding ``files``, with the manifest a save writes."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": 2,
                "files": {name: _hash_file(path / name) for name in files}}
    (path / COMPLETE).write_text(json.dumps(manifest))
    return path


FILES = {"ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": bytes(range(256)) * 64,
         "ds/mp_rank_00_model_states.pt": b"weights" * 1000, "trainer_state.json": b"{}"}


def test_verify_names_the_corrupted_the_truncated_and_the_missing_file(tmp_path: Path) -> None:
    ckpt = fake_checkpoint(tmp_path, 8, FILES)
    assert verify_checkpoint(ckpt).ok and verify_checkpoint(ckpt).files == 3
    optim = ckpt / "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(optim, "r+b") as f:  # garbage in place: same size, other bytes
        f.seek(100)
        f.write(b"\xff" * 64)
    model = ckpt / "ds/mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])
    (ckpt / "trainer_state.json").unlink()
    problems = verify_checkpoint(ckpt).problems
    assert len(problems) == 3, problems
    assert any(p.startswith("ds/zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 differs") for p in problems)
    assert "ds/mp_rank_00_model_states.pt: 100 bytes, the manifest says 7,000 (truncated or overwritten)" in problems
    assert "trainer_state.json: missing" in problems
    # The work is split over ranks: every file is checked by exactly one rank.
    shares = [verify_checkpoint(ckpt, rank, 2).problems for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(problems) and all(shares)


def test_resume_auto_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path: Path) -> None:
    older = fake_checkpoint(tmp_path, 4, FILES)
    newer = fake_checkpoint(tmp_path, 8, FILES)
    (newer / "ds/mp_rank_00_model_states.pt").write_bytes(b"")
    logged: list[str] = []
    assert select_checkpoint("auto", tmp_path, logged.append) == older
    assert len(logged) == 1 and str(newer) in logged[0] and "ds/mp_rank_00_model_states.pt: 0 bytes" in logged[0]
    # An explicit checkpoint that does not verify is an error naming the file, never a fallback.
    with pytest.raises(CheckpointError, match=r"checkpoint.resume=.*step_00000008.*mp_rank_00_model_states.pt: 0 bytes"):
        select_checkpoint(str(newer), tmp_path, logged.append)
    (older / "trainer_state.json").write_text("[]")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        select_checkpoint("auto", tmp_path, logged.append)
    assert select_checkpoint("auto", tmp_path / "fresh", logged.append) is None


def test_checkpoint_saved_before_manifests_loads_unverified(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / COMPLETE).write_text("4\n")
    report = verify_checkpoint(ckpt)
    assert report.ok and not report.verified
    logged: list[str] = []
    assert select_checkpoint("auto", tmp_path, logged.append) == ckpt
    assert "unverified" in logged[0]


def test_verify_command_prints_every_checkpoint(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 4, FILES)
    bad = fake_checkpoint(tmp_path, 8, FILES)
    (bad / "ds/mp_rank_00_model_states.pt").write_bytes(b"x")
    (tmp_path / "checkpoints" / ".tmp_step_00000012").mkdir()
    proc = subprocess.run([sys.executable, "-m", "disco_ds", "verify", str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("step_00000004  ok: 3 files, 23,386 bytes match their sha256")
    assert lines[1].endswith("step_00000008  DAMAGED")
    assert lines[2].strip().startswith("ds/mp_rank_00_model_states.pt: 1 bytes")
    assert "step_00000012  partial" in lines[3]


def _saved(overrides: list[str], world: int) -> dict:
    cfg = load_config(REPO / "recipes/tiny.yaml", overrides)
    return {"run": run_record(cfg, plan_run(cfg, world))}


def test_resume_refuses_any_change_and_lists_old_and_new(tmp_path: Path) -> None:
    saved = _saved([], 2)
    same = plan_resume(load_config(REPO / "recipes/tiny.yaml"), 2, tmp_path, saved)
    assert same.changes == [] and not same.relayout
    cfg = load_config(REPO / "recipes/tiny.yaml", ["train.tokens=1e6", "optimizer.momentum=0.5"])
    with pytest.raises(CheckpointError) as err:
        plan_resume(cfg, 1, tmp_path, saved)
    message = str(err.value)
    old = plan_run(load_config(REPO / "recipes/tiny.yaml"), 2)
    for change in ("plan.world_size: 2 → 1", f"plan.accumulation: {old.accumulation} → {2 * old.accumulation}",
                   "plan.tokens: 2e+06 → 1e+06", f"plan.steps: {old.steps} → {-(-old.steps // 2)}",
                   "optimizer.momentum: 0.1 → 0.5", "checkpoint.allow_change=true"):
        assert change in message, message
    assert "plan.lr:" in message and "plan.batch_tokens" not in message  # η*(B, D) follows D; B is kept


def test_allowed_world_size_change_keeps_the_batch_lr_and_steps(tmp_path: Path) -> None:
    saved = _saved([], 2)
    (tmp_path / PORTABLE).write_bytes(b"")
    cfg = load_config(REPO / "recipes/tiny.yaml", ["checkpoint.allow_change=true"])
    resume = plan_resume(cfg, 1, tmp_path, saved)
    old = plan_run(load_config(REPO / "recipes/tiny.yaml"), 2)
    assert resume.changes == ["plan.world_size: 2 → 1", f"plan.accumulation: {old.accumulation} → {2 * old.accumulation}"]
    assert resume.relayout
    assert (resume.plan.batch_tokens, resume.plan.lr, resume.plan.steps) == (old.batch_tokens, old.lr, old.steps)
    # Without its portable file, a checkpoint cannot change world size: named, with the way out.
    (tmp_path / PORTABLE).unlink()
    with pytest.raises(CheckpointError, match=r"portable.pt.*plan.world_size=2"):
        plan_resume(cfg, 1, tmp_path, saved)
