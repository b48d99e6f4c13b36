"""MetricsLogger.log_steps: the trainer reads the device once per log interval and logs the
interval's steps together; every step still gets its line, the console its interval lines, the
ETA the mean step time, and device scalars are read only here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from disco_ds.trainer import metrics as metrics_module
from disco_ds.trainer.metrics import METRICS_FILE, MetricsLogger


def test_steps_logged_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    now = [10.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: now[0])
    logger = MetricsLogger(tmp_path, total_steps=20, log_interval=4)
    logger.log_steps([(s, {"loss": torch.tensor(5.0 - s)}) for s in range(1, 5)])
    now[0] = 14.0  # the next 4 steps took 4 s: 1 s per step
    logger.log_steps([(s, {"loss": 5.0 - s}) for s in range(5, 9)])
    assert logger.eta_seconds(8) == pytest.approx(12.0)  # 12 steps left at 1 s each
    logger.log_steps([])  # nothing pending: nothing happens
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [5.0 - s for s in range(1, 9)]  # device scalars read as numbers
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in printed] == ["step 4/20", "step 8/20"]
