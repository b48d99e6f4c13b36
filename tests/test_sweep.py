"""`disco_ds sweep`: the paper's fits on synthetic sweeps with a known optimum and known exponents."""

import json
import math

import numpy as np
import pytest

from disco_ds.sweep import HorizonReading, RunResult, fit_sweep, plot_sweep, read_horizons

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
