"""`disco_ds sweep`: the paper's fits on synthetic sweeps with a known optimum and known exponents."""

import json
import math

import numpy as np
import pytest

from disco_ds.trainer.sweep import HorizonReading, RunResult, fit_sweep, plot_sweep, read_horizons

ALPHA, BETA, GAMMA = 0.62, -0.56, -0.12  # log2 η* = α log2 B + β log2 D + γ
BATCH_EXP, BATCH_C = 0.45, 2.1  # log2 B* = a log2 D + c
OPTIMAL_NORM_LOG2 = 7.0


def synthetic_sweep(batches=(2**10, 2**11, 2**12, 2**13, 2**14), horizons=(2**20, 2**22, 2**24)):
    """Loss is a parabola in log2 η around η*(B, D) plus one in log2 B around B*(D); the output norm
    is 2^7 exactly at η* (log-linear in η), as the paper finds."""
    lrs = [2.0**k for k in np.arange(-10, 0.01, 0.5)]
    runs = []
    for b in batches:
        for lr in lrs:
            readings = []
            for d in horizons:
                lr_opt = ALPHA * math.log2(b) + BETA * math.log2(d) + GAMMA
                b_opt = BATCH_EXP * math.log2(d) + BATCH_C
                log_loss = 1.5 - 0.01 * math.log2(d) + 0.02 * (math.log2(lr) - lr_opt) ** 2 + 0.01 * (math.log2(b) - b_opt) ** 2
                norm = 2.0 ** (math.log2(lr) - lr_opt + OPTIMAL_NORM_LOG2)
                readings.append(HorizonReading(d, math.exp(log_loss), math.exp(log_loss) + 0.01, norm))
            runs.append(RunResult(lr, b, readings))
    return runs


def test_fit_recovers_the_optimum_the_norm_and_the_exponents(tmp_path):
    runs = synthetic_sweep()
    fit = fit_sweep(runs)
    for h in fit["horizons"]:
        d = h["tokens"]
        assert math.log2(h["batch_opt"]) == pytest.approx(BATCH_EXP * math.log2(d) + BATCH_C, abs=1e-6)
        assert math.log2(h["optimal_norm"]) == pytest.approx(OPTIMAL_NORM_LOG2, abs=1e-6)
        for row in h["batches"]:
            expected = ALPHA * math.log2(row["batch_tokens"]) + BETA * math.log2(d) + GAMMA
            assert math.log2(row["lr_opt"]) == pytest.approx(expected, abs=1e-6)
    law = fit["lr_law"]
    assert law["lr_batch_exponent"] == pytest.approx(ALPHA, abs=1e-6)
    assert law["lr_tokens_exponent"] == pytest.approx(BETA, abs=1e-6)
    assert law["log2_constant"] == pytest.approx(GAMMA, abs=1e-5)
    assert law["lr_batch_exponent_err"] < 1e-6  # exact data: no scatter
    assert fit["batch_law"]["batch_exponent"] == pytest.approx(BATCH_EXP, abs=1e-6)
    overrides = dict(o.split("=") for o in fit["anchor_overrides"])
    assert int(overrides["scaling.anchor_tokens"]) == 2**24
    b_ref = int(overrides["scaling.anchor_batch_tokens"])
    assert b_ref == round(2 ** (BATCH_EXP * 24 + BATCH_C))
    assert math.log2(float(overrides["scaling.anchor_lr"])) == pytest.approx(ALPHA * math.log2(b_ref) + BETA * 24 + GAMMA, abs=1e-4)
    paths = plot_sweep(runs, fit, tmp_path)
    assert [p.name for p in paths] == ["loss_vs_lr.png", "loss_vs_norm.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_noisy_sweep_gives_errors_that_cover_the_truth():
    rng = np.random.default_rng(0)
    runs = synthetic_sweep()
    for r in runs:
        for h in r.horizons:
            h.loss *= math.exp(rng.normal(0, 0.002))
    law = fit_sweep(runs)["lr_law"]
    assert abs(law["lr_batch_exponent"] - ALPHA) < 4 * law["lr_batch_exponent_err"] + 0.02
    assert 0 < law["lr_batch_exponent_err"] < 0.1


def test_exponents_need_three_horizons_and_three_batches():
    fit = fit_sweep(synthetic_sweep(batches=(2**11, 2**12), horizons=(2**20, 2**22, 2**24)))
    assert "lr_law" not in fit and "anchor_overrides" not in fit
    assert len(fit["horizons"]) == 3


def test_read_horizons_takes_the_last_row_of_each_step_and_names_what_is_missing(tmp_path):
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "norm/output/weight": 1.0 + s} for s in range(1, 9)]
    rows += [{"step": 4, "val/loss": 4.7}, {"step": 8, "val/loss": 4.3}]
    rows += [{"step": 8, "loss": 4.0, "norm/output/weight": 20.0}]  # logged again after a resume
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    first, second = read_horizons(path, [4 * 256, 8 * 256], 256)
    assert (first.tokens, first.loss, first.val_loss, first.output_norm) == (1024, pytest.approx(4.6), 4.7, 5.0)
    assert (second.loss, second.output_norm) == (4.0, 20.0)
    with pytest.raises(ValueError, match="validation loss"):
        read_horizons(path, [6 * 256], 256)
    with pytest.raises(ValueError, match="whole number of batches"):
        read_horizons(path, [1000], 256)


@pytest.mark.slow
def test_sweep_end_to_end_on_tiny_runs_and_a_killed_sweep_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    source = tmp_path / "text"
    source.mkdir()
    for doc in range(20):  # documents of varied text; validation takes whole documents
        (source / f"{doc}.txt").write_text("".join(f"{doc}:{i} the quick brown fox jumps over the lazy dog {i * doc}\n" for i in range(400)))
    subprocess.run([sys.executable, "-m", "disco_ds", "prepare", "--input", str(source), "--tokenizer", "byte",
                    "--out", str(data)], check=True, capture_output=True)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "disco_ds", "sweep", str(root / "recipes" / "tiny.yaml"), f"data.path={data}",
           "train.micro_batch=16", "logging.wandb=false", "eval.tokens=8192",
           "--lr", "0.02,0.3", "--batch-tokens", "2048", "--horizons", "8192,16384", "--out", str(out)]
    first = out / "runs" / "lr0.02_b2048" / "result.json"
    proc = subprocess.Popen(cmd, cwd=root, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not first.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert first.is_file(), proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "first run timed out"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the run it started
        proc.wait()
    stamp = first.stat().st_mtime_ns
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert first.stat().st_mtime_ns == stamp  # the finished run was not redone
    assert "sweep: run lr0.02_b2048" not in done.stdout

    document = json.loads((out / "sweep.json").read_text())
    assert set(document) == {"runs", "fit"}
    assert [(r["lr"], r["batch_tokens"]) for r in document["runs"]] == [(0.02, 2048), (0.3, 2048)]
    for run in document["runs"]:
        assert set(run) == {"lr", "batch_tokens", "horizons"}
        assert [h["tokens"] for h in run["horizons"]] == [8192, 16384]
        for h in run["horizons"]:
            assert set(h) == {"tokens", "loss", "val_loss", "output_norm"}
            assert all(isinstance(h[k], float) and math.isfinite(h[k]) for k in ("loss", "val_loss", "output_norm"))
    low, high = document["runs"]
    for a, b in zip(low["horizons"], high["horizons"]):
        assert b["output_norm"] > a["output_norm"]  # the norm grows with the learning rate
    assert [h["tokens"] for h in document["fit"]["horizons"]] == [8192, 16384]
    assert (out / "loss_vs_lr.png").stat().st_size > 10_000 and (out / "loss_vs_norm.png").stat().st_size > 10_000
