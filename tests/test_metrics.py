"""disco_ds.trainer.metrics: the FLOPs formula, metrics.jsonl, the console, resume, the plot and wandb."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest

from disco_ds.trainer.metrics import CURVES_FILE, METRICS_FILE, MetricsLogger, RunLog, flops_per_token, memory_gib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN = {
    "loss": 2.3141,
    "lr": 0.0123,
    "tokens_per_s": 45_123.0,
    "mfu": 0.3121,
    "memory_gib": 3.12,
    "norm/output/weight": 27.31,
    "grad_norm": 0.5,
}


def read_jsonl(path: Path) -> list[dict]:
    """The rows without their clock fields (``time``, ``elapsed``: tested on their own)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("time", "elapsed")} for row in rows]


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > len(PNG_SIGNATURE) and path.read_bytes()[:8] == PNG_SIGNATURE


def test_flops_per_token_by_hand():
    # 6·N + 12·L·d·T with N = 1,000,000, L = 4, d = 256, T = 512
    assert flops_per_token(1_000_000, 4, 256, 512) == 6_000_000 + 12 * 4 * 256 * 512 == 12_291_456
    assert flops_per_token(0, 1, 1, 1) == 12.0


def test_memory_gib_is_positive():
    assert 0 < memory_gib() < 1024


def test_jsonl_console_lines_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    logger = MetricsLogger(run, total_steps=6, log_interval=3, enabled=True, wandb=None)
    for step in range(1, 7):
        logger.log(step, {**TRAIN, "loss": TRAIN["loss"] - 0.01 * step})
    logger.log_eval(6, {"loss": 2.4012})
    logger.close()

    rows = read_jsonl(run / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6]
    for row in rows[:6]:
        assert row.keys() == {"step", *TRAIN}
    assert rows[-1] == {"step": 6, "val/loss": 2.4012}

    lines = capsys.readouterr().out.splitlines()  # captured stdout is not a terminal: interval lines
    assert len(lines) == 3, lines
    fields = r"loss {} \| lr 1\.2e-02 \| 45\.1k tok/s \| MFU 31\.2% \| mem 3\.1 GiB \| ‖W_out‖ 27\.3 \| eta {}"
    assert re.fullmatch(r"step 3/6 \| " + fields.format(r"2\.284", r"\d+s"), lines[0]), lines[0]
    assert re.fullmatch(r"step 6/6 \| " + fields.format(r"2\.254", "0s"), lines[1]), lines[1]
    assert lines[2] == "eval step 6/6 | val/loss 2.401"
    assert is_png(run / CURVES_FILE)


def test_group_learning_rate_and_missing_fields(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=2, log_interval=1, enabled=True, wandb=None)
    logger.log(1, {"loss": 1.0, "lr/hidden": 3e-4, "lr/output": 1e-3})
    logger.close()
    assert capsys.readouterr().out.strip() == "step 1/2 | loss 1.000 | lr 3.0e-04 | eta ?"


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    logger = MetricsLogger(tmp_path, total_steps=4, log_interval=1, enabled=True, wandb=None)
    for step in range(1, 5):
        logger.log(step, TRAIN)
    logger.close()
    out = terminal.getvalue()
    assert "4/4" in out and "loss=" not in out
    assert "loss 2.314" in out and "45.1k tok/s" in out and "eta" in out
    assert "step 4/4 |" not in out  # no interval lines on a terminal
    assert len(read_jsonl(tmp_path / METRICS_FILE)) == 4


def test_other_ranks_write_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    logger = MetricsLogger(run, total_steps=4, log_interval=1, enabled=False,
                           wandb={"project": "p", "mode": "offline", "dir": str(tmp_path)})
    for step in range(1, 5):
        logger.log(step, TRAIN)
    logger.log_eval(4, {"loss": 1.0})
    logger.close()
    assert not run.exists()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""


def test_resume_drops_lines_after_the_checkpoint(tmp_path, capsys):
    first = MetricsLogger(tmp_path, total_steps=10, log_interval=5, enabled=True, wandb=None)
    for step in range(1, 10):  # a run that saved a checkpoint at step 6 and crashed at step 9
        first.log(step, {"loss": 3.0 - 0.1 * step, "norm/output/weight": 1.0 + step})
        if step % 4 == 0:
            first.log_eval(step, {"loss": 3.0})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 3, "lo')  # torn by the crash
    first._file.close()

    resumed = MetricsLogger(tmp_path, total_steps=10, log_interval=5, enabled=True, wandb=None, resume_step=6)
    assert [(r["step"], "val/loss" in r) for r in read_jsonl(tmp_path / METRICS_FILE)] == [
        (1, False), (2, False), (3, False), (4, False), (4, True), (5, False), (6, False)]
    for step in range(7, 11):
        resumed.log(step, {"loss": 2.0, "norm/output/weight": 9.0})
    resumed.close()
    assert [r["step"] for r in read_jsonl(tmp_path / METRICS_FILE)] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]
    assert is_png(tmp_path / CURVES_FILE)

    fresh = MetricsLogger(tmp_path, total_steps=10, log_interval=5, enabled=True, wandb=None)  # a new run
    fresh.log(1, {"loss": 5.0})
    fresh.close()
    assert read_jsonl(tmp_path / METRICS_FILE) == [{"step": 1, "loss": 5.0}]


def test_no_matplotlib_warns_and_skips_the_plot(tmp_path, monkeypatch):
    import disco_ds.trainer.metrics as metrics

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import → ImportError
    monkeypatch.setattr(metrics, "_warned_no_matplotlib", False)
    logger = MetricsLogger(tmp_path, total_steps=1, log_interval=1, enabled=True, wandb=None)
    logger.log(1, {"loss": 1.0})
    with pytest.warns(UserWarning, match="matplotlib"):
        logger.close()
    assert not (tmp_path / CURVES_FILE).exists()


def test_wandb_offline_run_and_resume(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = {"project": "disco-ds-tests", "name": "unit", "mode": "offline", "config": {"lr": 0.01}}

    logger = MetricsLogger(run, total_steps=3, log_interval=1, enabled=True, wandb=cfg)
    logger.log(1, TRAIN)
    logger.log(2, TRAIN)
    logger.close()
    run_id = (run / "wandb_id").read_text().strip()
    offline = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(run_id)
    assert (offline[0] / f"run-{run_id}.wandb").stat().st_size > 0

    resumed = MetricsLogger(run, total_steps=3, log_interval=1, enabled=True, wandb=cfg, resume_step=2)
    resumed.log(3, TRAIN)
    resumed.close()
    assert (run / "wandb_id").read_text().strip() == run_id  # the same wandb run continues
    # offline-run-<time>-<id>, with a "-1" suffix when both runs started within the same second
    runs = sorted(p.name for p in (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in name for name in runs), (run_id, runs)

    fresh = MetricsLogger(run, total_steps=3, log_interval=1, enabled=True, wandb=cfg)  # a new run, a new id
    fresh.log(1, TRAIN)
    fresh.close()
    assert (run / "wandb_id").read_text().strip() != run_id


def test_run_log_keeps_the_console_warnings_and_tracebacks(tmp_path, capsys):
    import logging

    from disco_ds.trainer.config import ConfigError

    log = tmp_path / "run" / "train.log"
    with pytest.raises(RuntimeError):
        with RunLog(log):
            print("plan line")
            print("a warning the user should see", file=sys.stderr)  # where warnings.warn writes
            logging.getLogger("DeepSpeed").warning("a DeepSpeed line")
            raise RuntimeError("boom")
    text = log.read_text()
    assert "plan line" in text and "a warning the user should see" in text and "a DeepSpeed line" in text
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom" in text
    assert "plan line" in capsys.readouterr().out  # still on the console
    with pytest.raises(ConfigError):
        with RunLog(log):
            raise ConfigError("data.path: missing")
    assert log.read_text().count("==== ") == 2 and "configuration error: data.path: missing" in log.read_text()
    with RunLog(tmp_path / "other" / "train.log", enabled=False):
        print("rank 1")
    assert not (tmp_path / "other").exists()


def test_rows_carry_wall_time_and_elapsed_seconds(tmp_path):
    import time

    started = time.time() - 5
    with MetricsLogger(tmp_path, 2, enabled=True, started=started) as logger:
        logger.log(1, {"loss": 1.0})
        logger.log_eval(2, {"loss": 0.5})
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert len(rows) == 2 and all(abs(r["time"] - time.time()) < 60 and 5 <= r["elapsed"] < 65 for r in rows)
