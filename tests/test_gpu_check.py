"""``benchmarks/gpu_check.py``: its dry mode (what CI can run: the plan, every case with its exact
commands) and the parts that read a run and write the report, on synthetic metrics."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def test_dry_mode_prints_every_case_and_exits_0() -> None:
    # Without CUDA the plain invocation is the dry mode (as in CI); with CUDA, ask for it.
    args = ["--dry-run"] if torch.cuda.is_available() else []
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = proc.stdout
    assert "nothing is run" in plan and "disco_ds prepare" in plan
    assert "gpt-124m: 768×768 ×48, 768×2048 ×12, 2048×768 ×24" in plan  # Newton–Schulz shapes
    blocks = {block.split("]", 1)[0]: block for block in plan.split("\n[case ")[1:]}
    assert list(blocks) == [case.name for case in gpu_check.CASES]
    for case in gpu_check.CASES:
        lines = {line.split()[0]: line for line in blocks[case.name].splitlines()[1:] if line.strip()}
        assert list(lines) == ["train", "resume", "export", "verify"], blocks[case.name]
        for phase in ("train", "resume"):
            assert f"--num_gpus {case.gpus} " in lines[phase]
            assert "--module disco_ds train recipes/" in lines[phase]
            assert f"train.zero_stage={case.zero} " in lines[phase] and f"train.tp_size={case.tp} " in lines[phase]
            assert f"train.pp_size={case.pp} " in lines[phase]
            assert f"optimizer.name={case.optimizer} " in lines[phase]
            assert ("train.deepspeed=" in lines[phase]) == case.offload
        assert lines["train"].endswith(f"train.max_steps={gpu_check.STEPS} checkpoint.resume=none")
        assert lines["resume"].endswith(
            f"train.max_steps={gpu_check.STEPS + gpu_check.RESUME_STEPS} checkpoint.resume=auto")
        assert f"-m disco_ds export runs/gpu_check/runs/{case.name} " in lines["export"]
        assert f"--verify-export runs/gpu_check/runs/{case.name}/hf " in lines["verify"]


def test_case_selection() -> None:
    assert [c.name for c in gpu_check.select_cases("124m-z1*", quick=False)] == ["124m-z1", "124m-z1-adamw"]
    quick = gpu_check.select_cases(None, quick=True)
    assert quick and all(c.quick for c in quick) and len(quick) < len(gpu_check.CASES)
    assert [c.name for c in gpu_check.select_cases("tiny-z2, tiny-tp2", quick=False)] == ["tiny-z2", "tiny-tp2"]
    with pytest.raises(SystemExit, match="unknown case"):
        gpu_check.select_cases("tiny-z9", quick=False)


def _write_run(run_dir: Path, optimizer_s: float | None) -> None:
    """metrics.jsonl of a 20-step run at 1000 tokens per 0.1 s step, and its checkpoint."""
    rows = []
    for step in range(1, gpu_check.STEPS + 1):
        row = {"step": step, "loss": 6.0 - 0.1 * step, "tokens": 1000.0 * step, "tokens_per_s": 10000.0,
               "mfu": 0.25, "memory_gib": 1.0 + step / 100}
        if optimizer_s is not None:
            row.update({"optimizer/step_s": optimizer_s, "optimizer/comm_s": 0.001, "optimizer/newton_schulz_s": 0.004})
        rows.append(row)
    rows.append({"step": gpu_check.STEPS, "val/loss": 4.1})
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint = run_dir / "checkpoints" / f"step_{gpu_check.STEPS:08d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").touch()


def test_run_checks_statistics_and_report(tmp_path: Path) -> None:
    _write_run(tmp_path / "scion", optimizer_s=0.01)
    _write_run(tmp_path / "adamw", optimizer_s=None)
    scion = gpu_check.step_statistics(gpu_check.check_first_run(tmp_path / "scion"))
    adamw = gpu_check.step_statistics(gpu_check.check_first_run(tmp_path / "adamw"))
    assert scion["step_s"] == pytest.approx(0.1) and scion["tokens_per_s"] == 10000.0 and scion["mfu"] == 0.25
    assert scion["optimizer_s_share"] == pytest.approx(0.1) and scion["newton_schulz_s_share"] == pytest.approx(0.04)
    assert scion["peak_memory_gib"] == pytest.approx(1.2)
    assert "optimizer_s" not in adamw

    (tmp_path / "scion" / "checkpoints" / f"step_{gpu_check.STEPS:08d}" / "COMPLETE").unlink()
    with pytest.raises(gpu_check.CaseFailure, match="no complete checkpoint"):
        gpu_check.check_first_run(tmp_path / "scion")

    cases = {c.name: c for c in gpu_check.CASES}
    results = [
        gpu_check.CaseResult(cases["124m-z1"], "pass", stats=scion, losses={"first": 6.0, "trained": 4.0, "resumed": 3.9,
                                                                               "val": 4.1, "export_val": 4.1, "export_rel_diff": 0.0}),
        gpu_check.CaseResult(cases["124m-z1-adamw"], "pass", stats={**adamw, "step_s": 0.08}),
        gpu_check.CaseResult(cases["tiny-z3"], "fail", reason="train exited 1: ValueError: x | y"),
        gpu_check.CaseResult(cases["tiny-2r-z2"], reason="needs 2 GPUs"),
    ]
    report = {"meta": {"device_name": "NVIDIA H200", "gpus": 1, "torch": "2.11", "deepspeed": "0.19.8",
                       "transformers": "5.17", "peak_tflops": 989.0, "date": "today", "seconds": 300.0, "command": "python x"},
              "cases": [gpu_check.asdict(r) for r in results],
              "newton_schulz": {"matmul_tflops": 790.0, "rows": [
                  {"recipe": "gpt-124m", "shape": [768, 768], "count": 48, "method": "quintic", "steps": 5,
                   "ms_one": 0.1, "tflops_one": 45.3, "ms_batched": 1.0, "tflops_batched": 217.4}]}}
    md = gpu_check.render_markdown(report)
    assert "| 124m-z1 | 1 | 1 | 1 | scion | — | pass | 6.000 → 4.000 → 3.900 | 4.1000 / 4.1000 (0.0e+00) | 1.2 |" in md
    assert "**FAIL**: train exited 1: ValueError: x / y" in md  # a '|' would break the table
    assert "skipped: needs 2 GPUs" in md
    assert "| 124m-z1 | scion | 1 | 1 | 10,000 | 25.0% | 100.0 | 10.0 (10.0%) | 1.0 | 4.0 |" in md
    assert "a Scion step takes 1.25× an AdamW step" in md
    assert "| gpt-124m | 768×768 | 48 | quintic ×5 | 0.100 | 45.3 | 4.6% | 1.00 | 217.4 | 22.0% |" in md

    gpu_check.write_report(report, tmp_path / "out" / "r.md", tmp_path / "out" / "r.json")
    assert (tmp_path / "out" / "r.md").read_text() == md
    assert json.loads((tmp_path / "out" / "r.json").read_text())["cases"][2]["status"] == "fail"
