"""The main job end to end: ``deepspeed --module disco_ds train`` on shards made by ``prepare``,
checkpoints, resume after SIGKILL (mid-training and mid-save), two simulated nodes, a NaN stop,
and export to ``transformers``.

Every run is a real launch (the ``deepspeed`` launcher, 2 CPU ranks, gloo). Losses are compared
exactly: the same world size, data order and DeepSpeed checkpoints make resumed and multi-node
trajectories bit-identical on CPU, so any difference is a bug, not noise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from disco_ds.data import eval_batches, list_shards
from launching import free_port

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STEPS, CKPT_EVERY, MICRO, SEQ = 24, 8, 4, 64
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stdlib"
    stdlib = sysconfig.get_paths()["stdlib"]
    subprocess.run([sys.executable, "-m", "disco_ds", "prepare", "--input", stdlib, "--glob", "*.py", "--exclude", "site-packages",
                    "--out", str(out), "--tokenizer", "byte", "--max-bytes", "600KB", "--val-fraction", "0.05", "--quiet"],
                   check=True, env=ENV, cwd=REPO, timeout=300)
    return out


def overrides(data: Path, run_dir: Path, stage: int = 2, **extra: object) -> list[str]:
    args = {
        "data.path": data, "data.seq_len": SEQ, "train.run_dir": run_dir, "train.zero_stage": stage,
        "train.micro_batch": MICRO, "train.tokens": 2e5, "train.global_batch_tokens": 2 * MICRO * SEQ,
        "train.max_steps": STEPS, "optimizer.lr": 0.1, "schedule.warmup": 0.0, "checkpoint.interval": CKPT_EVERY,
        "eval.interval": 0, "eval.tokens": 4096, "logging.interval": 4, **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def launcher(args: list[str], port: int, launcher_args: list[str] | None = None) -> list[str]:
    return [str(DEEPSPEED), *(launcher_args or ["--num_gpus", "2"]), "--master_port", str(port),
            "--module", "disco_ds", "train", str(REPO / "recipes/tiny.yaml"), *args]


def run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env or ENV, cwd=REPO, capture_output=True, text=True, timeout=900)
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "val/loss" not in r}


def val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["val/loss"] for r in rows if "val/loss" in r][-1]


_RUNS: dict[int, Path] = {}


def single_node_run(data: Path, tmp: Path, stage: int) -> Path:
    """One uninterrupted 2-rank run per stage, shared by the tests that compare against it."""
    if stage not in _RUNS:
        run_dir = tmp / f"stage{stage}"
        proc = run(launcher(overrides(data, run_dir, stage), free_port()))
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        _RUNS[stage] = run_dir
    return _RUNS[stage]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_launcher_trains_checkpoints_and_exports(data_dir: Path, runs_root: Path, stage: int) -> None:
    run_dir = single_node_run(data_dir, runs_root, stage)
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    first, last = curve[1], sum(curve[s] for s in range(STEPS - 3, STEPS + 1)) / 4
    assert last < first - 0.5, curve  # from ~ln(320) towards byte statistics
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000016", "step_00000024"]  # keep: 2
    assert all((p / "COMPLETE").is_file() for p in ckpts)
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"] == STEPS

    out = run_dir / "hf"
    proc = run([sys.executable, "-m", "disco_ds", "export", str(run_dir), str(out), "--dtype", "float32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    # The exported model reproduces the trained engine's last validation loss on the very same
    # windows (both ranks' shares): its logits are the trained model's (fp32, no bf16 here).
    total = count = 0.0
    with torch.no_grad():
        for rank in range(2):
            for inputs, targets in eval_batches(list_shards(str(data_dir / "val_*.bin")), SEQ, MICRO, rank, 2, 4096):
                logits = model(input_ids=inputs).logits
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
                count += targets.numel()
    assert total / count == pytest.approx(val_loss(run_dir), rel=1e-5)


def first_row(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def test_the_same_experiment_at_every_zero_stage(data_dir: Path, runs_root: Path) -> None:
    """ZeRO-3 builds the model inside deepspeed.zero.Init, where Hugging Face's init sees empty
    partitions; the trainer initialises the gathered weights from the same seed instead. So the
    first loss (before any update) is the same at every stage, and the first logged output-layer
    norm (after one update from RMS→∞ = 1; about 7 at this width without the init) matches too."""
    rows = {stage: first_row(single_node_run(data_dir, runs_root, stage)) for stage in (1, 2, 3)}
    assert rows[1]["step"] == rows[2]["step"] == rows[3]["step"] == 1
    assert rows[1]["loss"] == rows[2]["loss"] == rows[3]["loss"]
    norm = "norm/output/weight"
    assert abs(rows[2][norm] - 1.0) < 0.2  # one step of lr·‖update‖ = 0.1 from the init
    assert rows[3][norm] == pytest.approx(rows[2][norm], rel=1e-6)


def test_shipped_deepspeed_template_runs_in_the_trainer(data_dir: Path, runs_root: Path, tmp_path: Path) -> None:
    """recipes/deepspeed/zero3.json (written for the Hugging Face Trainer, "auto" batch sizes,
    precision and buckets) as train.deepspeed: it runs, and it is the same experiment."""
    reference = losses(single_node_run(data_dir, runs_root, 3))
    run_dir = tmp_path / "template"
    args = overrides(data_dir, run_dir, 3, **{"train.deepspeed": REPO / "recipes/deepspeed/zero3.json", "train.max_steps": 4})
    proc = run(launcher(args, free_port()))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    curve = losses(run_dir)
    assert sorted(curve) == [1, 2, 3, 4] and curve[1] == reference[1]
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").is_file()


def two_simulated_nodes(args: list[str], tmp_path: Path) -> None:
    """``train`` with ``args`` on two simulated nodes of one rank each (the launcher's ``--no_ssh
    --node_rank 0|1`` on loopback, one hostfile); asserts both nodes ran and ended cleanly."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    procs = [subprocess.Popen(launcher(args, port, ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                                                    "--master_addr", "127.0.0.1"]),
                              env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "node_rank=1" in outputs[1]


def test_two_simulated_nodes_match_one_node(data_dir: Path, runs_root: Path, tmp_path: Path) -> None:
    reference = losses(single_node_run(data_dir, runs_root, 2))
    run_dir = tmp_path / "multinode"
    two_simulated_nodes(overrides(data_dir, run_dir), tmp_path)
    assert losses(run_dir) == reference


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def test_resume_after_sigkill_mid_training(data_dir: Path, runs_root: Path, tmp_path: Path) -> None:
    reference = losses(single_node_run(data_dir, runs_root, 2))
    run_dir = tmp_path / "killed"
    cmd = launcher(overrides(data_dir, run_dir), free_port())
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_step(run_dir, CKPT_EVERY + 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-training
    proc.wait()
    complete = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    assert complete[-1] == f"step_{CKPT_EVERY:08d}"
    resumed = run(launcher(overrides(data_dir, run_dir), free_port()))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed     {run_dir / 'checkpoints' / f'step_{CKPT_EVERY:08d}'}" in resumed.stdout
    assert losses(run_dir) == reference


def test_resume_after_kill_during_save(data_dir: Path, runs_root: Path, tmp_path: Path) -> None:
    reference = losses(single_node_run(data_dir, runs_root, 2))
    run_dir = tmp_path / "killed-saving"
    env = {**ENV, "DISCO_DS_FAULT": f"kill-during-save@{2 * CKPT_EVERY}"}
    crashed = run(launcher(overrides(data_dir, run_dir), free_port()), env=env)
    assert crashed.returncode != 0
    checkpoints = run_dir / "checkpoints"
    # The engine files of step 16 were written, the checkpoint was never completed: the previous
    # one is untouched and is what resume=auto picks.
    assert (checkpoints / f".tmp_step_{2 * CKPT_EVERY:08d}" / "ds").is_dir()
    assert not (checkpoints / f"step_{2 * CKPT_EVERY:08d}").exists()
    assert (checkpoints / f"step_{CKPT_EVERY:08d}" / "COMPLETE").is_file()
    resumed = run(launcher(overrides(data_dir, run_dir), free_port()))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert losses(run_dir) == reference
    assert not list(checkpoints.glob(".tmp_*"))


def test_nan_loss_stops_with_last_good_checkpoint_intact(data_dir: Path, tmp_path: Path) -> None:
    """A single-process run (no launcher) whose learning rate blows the model up."""
    run_dir = tmp_path / "nan"
    args = overrides(data_dir, run_dir, **{"optimizer.lr": 1e30, "checkpoint.interval": 1, "train.max_steps": 6})
    proc = run([sys.executable, "-m", "disco_ds", "train", str(REPO / "recipes/tiny.yaml"), *args])
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "is the last good one and was not touched" in proc.stdout
    failed_step = int(proc.stdout.split(" at step ")[1].split(":")[0])
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert saved and all((p / "COMPLETE").is_file() for p in saved)
    assert int(saved[-1].name.split("_")[1]) == failed_step - 1
    state = json.loads((saved[-1] / "trainer_state.json").read_text())
    assert torch.isfinite(torch.tensor(state["loss"]))


def test_adamw_baseline_single_process_with_wandb_offline(data_dir: Path, tmp_path: Path) -> None:
    """The paper's baseline is the same recipe with one switch; wandb logs offline without an account."""
    run_dir = tmp_path / "adamw"
    env = {**ENV, "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    args = overrides(data_dir, run_dir, **{"optimizer.name": "adamw", "optimizer.lr": 3e-3, "train.max_steps": 12,
                                           "logging.wandb": True, "logging.wandb_mode": "offline"})
    proc = run([sys.executable, "-m", "disco_ds", "train", str(REPO / "recipes/tiny.yaml"), *args], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "optimizer adamw" in proc.stdout
    curve = losses(run_dir)
    assert curve[12] < curve[1] - 0.5, curve
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr/hidden"] == pytest.approx(rows[0]["lr/output"] / 8)  # per-group rates kept
    assert not any(k.startswith("norm/") for k in rows[0])  # the instrument lives in Scion's step
    assert list(run_dir.rglob("offline-run-*")), "no offline wandb run was written"


def test_document_mask_trains_single_process(data_dir: Path, tmp_path: Path) -> None:
    """data.document_mask: positions restart after every end-of-text, documents attend apart."""
    run_dir = tmp_path / "documents"
    args = overrides(data_dir, run_dir, **{"data.document_mask": "true", "train.max_steps": 8, "checkpoint.interval": 0})
    proc = run([sys.executable, "-m", "disco_ds", "train", str(REPO / "recipes/tiny.yaml"), *args])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "document_mask: true" in proc.stdout  # the resolved config says so
    curve = losses(run_dir)
    assert len(curve) == 8 and curve[8] < curve[1], curve


def test_norm_guidance_flags_a_far_too_high_lr_and_not_a_run_on_target(data_dir: Path, tmp_path: Path) -> None:
    """scaling.target_output_norm: the projection of ‖W_out‖_RMS→∞ to the end of the run, at every eval."""
    def guided(name: str, lr: float, target: float) -> tuple[subprocess.CompletedProcess, list[dict]]:
        run_dir = tmp_path / name
        args = overrides(data_dir, run_dir, **{"optimizer.lr": lr, "train.max_steps": 16, "eval.interval": 8,
                                               "checkpoint.interval": 0, "scaling.target_output_norm": target})
        proc = run([sys.executable, "-m", "disco_ds", "train", str(REPO / "recipes/tiny.yaml"), *args])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    high, rows = guided("high", 3.0, 128.0)
    assert "lr likely too high" in high.stdout, high.stdout[-3000:]
    projected = [r["norm/output/projected"] for r in rows if "norm/output/projected" in r]
    assert projected and projected[-1] > 128 * 2**0.5
    # A target equal to where that run is heading: on track, and no warning at start.
    on_target, _ = guided("on_target", 3.0, round(projected[-1], 1))
    assert "on track" in on_target.stdout and "likely too" not in on_target.stdout
    # Far too small a learning rate cannot even reach the target: warned at start.
    low, _ = guided("low", 1e-4, 128.0)
    assert "can reach at most" in low.stdout


def plan_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("batch ", "lr ", "steps ", "parallel "))]


def test_recipe_previews_the_tensor_parallel_run_and_the_run_log(data_dir: Path, tmp_path: Path) -> None:
    """``recipe --world-size 2 train.tp_size=2`` (an override after the option) prints the plan that
    the 2-rank tp_size=2 launch prints: one replica, so B* and η of one replica. The launch keeps
    its console in train.log (config, plan, startup phases, the eval with perplexity, bits and a
    sample), and every metrics row carries wall time and elapsed seconds."""
    run_dir = tmp_path / "tp"
    args = overrides(data_dir, run_dir, **{"train.tp_size": 2, "train.zero_stage": 1, "train.global_batch_tokens": "null",
                                           "train.max_steps": 2, "train.bf16": False, "optimizer.lr": "null",
                                           "eval.sample_tokens": 8, "eval.sample_prompt": "def "})
    preview = run([sys.executable, "-m", "disco_ds", "recipe", str(REPO / "recipes/tiny.yaml"), "--world-size", "2", *args])
    assert preview.returncode == 0, preview.stderr[-3000:]
    proc = run(launcher(args, free_port()))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert plan_lines(proc.stdout) == plan_lines(preview.stdout) and "1 ranks × 4 seq" in preview.stdout
    assert "parallel    2 ranks = 1 data-parallel replicas × tensor parallel 2" in preview.stdout
    refused = run([sys.executable, "-m", "disco_ds", "recipe", str(REPO / "recipes/tiny.yaml"), "--world-size", "2",
                   "train.tp_size=4"])
    assert refused.returncode == 2 and "train.tp_size=4 does not divide the 2 launched ranks" in refused.stderr

    log = (run_dir / "train.log").read_text()
    for needle in ("model:\n  preset: tiny", "batch       B*", "startup     process group ready in",
                   "startup     model built in", "startup     engine ready in", "startup     first step done in",
                   "val/perplexity", "val/bits_per_byte", "val/sample 'def "):
        assert needle in log, needle
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time"] > 1.7e9 and 0 < r["elapsed"] < 900 for r in rows)


def test_divergence_watch_bound_rising_window_and_messages() -> None:
    """The rules that stop a diverging run (tests/test_checkpoint_runs.py stops a real one)."""
    from disco_ds.trainer.config import load_config
    from disco_ds.trainer.loop import _DivergenceWatch, default_max_loss

    assert default_max_loss(320) == pytest.approx(1.5 * 5.768 + 1, abs=1e-3)
    watch = _DivergenceWatch(load_config(REPO / "recipes/tiny.yaml"), 320)
    assert [watch.check(s, v) for s, v in [(1, 5.8), (2, 9.0), (3, 3.0), (4, 9.5)]] == [None] * 4  # no rising rule
    assert watch.check(5, 9.7).startswith("loss 9.7 at step 5: above train.max_loss = 9.652 (a uniform prediction "
                                          "over the 320 tokens scores 5.77; recent losses: step 1: 5.8, step 2: 9")
    assert watch.check(6, float("nan")) == "loss is nan at step 6"
    rising = _DivergenceWatch(load_config(REPO / "recipes/tiny.yaml", ["train.rise_window=2", "train.max_rise=0.5"]), 320)
    assert [rising.check(s, v) for s, v in [(1, 5.0), (2, 4.0), (3, 3.0), (4, 3.4), (5, 3.6)]] == [None] * 5
    message = rising.check(6, 4.0)  # mean 3.8 over steps 5-6, the lowest 2-step mean was 3.2 (steps 3-4)
    assert message is not None and "mean over the last 2 steps, 3.8, is 0.6 above the lowest 2-step mean so far (3.2)" in message
