"""Faults found before the process group and the engine start (disco_ds.trainer.preflight).

A missing ``data.path`` is reported by :func:`disco_ds.trainer.loop.train` within seconds, in-process,
with ``deepspeed.init_distributed`` and the engine replaced by tripwires; a truncated shard is
reported by both ranks of a real 2-rank launch as one ``configuration error`` line, before any
process group. Token ids beyond the model's vocabulary and impossible ``checkpoint.resume``
values are named the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launching import free_port, worker_env

from disco_ds.trainer.config import ConfigError, load_config
from disco_ds.data import write_shard
from disco_ds.trainer.preflight import check_data, check_resume, check_vocabulary

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def make_data(root: Path, train_tokens: np.ndarray, vocab: int = 257) -> Path:
    """A data directory as ``prepare`` writes it, without the recorded max ids (a foreign dataset)."""
    rng = np.random.default_rng(0)
    write_shard(root / "train_000000.bin", train_tokens, dtype="uint16")
    write_shard(root / "val_000000.bin", rng.integers(0, 256, 20_000), dtype="uint16")
    (root / "meta.json").write_text(json.dumps({"vocab_size": vocab, "eot_id": vocab - 1,
                                                "tokens": {"train": int(train_tokens.size), "val": 20_000}}))
    return root


def config(data: Path, run_dir: Path, *extra: str):
    return load_config(REPO / "recipes/tiny.yaml", [f"data.path={data}", f"train.run_dir={run_dir}", "data.seq_len=64",
                                                    "eval.tokens=2048", *extra])


def test_missing_data_path_is_named_before_the_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed
    import torch.distributed as dist

    from disco_ds.trainer import loop as trainer

    def tripwire(*args, **kwargs):
        raise AssertionError("started before the configuration was checked")

    monkeypatch.setattr(deepspeed, "init_distributed", tripwire)
    monkeypatch.setattr(trainer, "build_engine", tripwire)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    cfg = config(tmp_path / "missing", tmp_path / "run")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"data.path: .*missing/meta.json does not exist"):
        trainer.train(cfg)
    assert time.perf_counter() - start < 5
    assert not dist.is_initialized()
    assert "configuration error: data.path:" in (tmp_path / "run" / "train.log").read_text()


def test_truncated_shard_is_named_by_every_rank_before_the_process_group(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", np.random.default_rng(1).integers(0, 256, 50_000))
    shard = data / "train_000000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "disco_ds", "train",
           str(REPO / "recipes/tiny.yaml"), f"data.path={data}", f"train.run_dir={tmp_path / 'run'}", "data.seq_len=64"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**worker_env(), "WANDB_MODE": "offline"}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "configuration error: data.path:" in line]
    assert len(lines) == 2 and all(f"{shard}: truncated" in line for line in lines), proc.stderr[-3000:]
    assert "process group ready" not in proc.stdout and "engine ready" not in proc.stdout
    assert elapsed < 90, elapsed  # launcher and imports; the check itself takes milliseconds


def test_out_of_vocabulary_ids_are_named_with_their_shard(tmp_path: Path) -> None:
    tokens = np.random.default_rng(2).integers(0, 256, 30_000)
    tokens[12_345] = 400  # beyond the model's 320 rows (257 rounded up to 64)
    data = make_data(tmp_path, tokens)
    checked = check_data(config(data, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"train_000000.bin holds token id 400, but the model's vocabulary has 320"):
        check_vocabulary(checked, 320)
    check_vocabulary(checked, 448)
    # prepare's record of the largest id is trusted, so a prepared dataset is not read.
    recorded = json.loads((data / "meta.json").read_text()) | {"max_token_id": {"train_000000.bin": 255, "val_000000.bin": 255}}
    (data / "meta.json").write_text(json.dumps(recorded))
    check_vocabulary(check_data(config(data, tmp_path / "run")), 320)


def test_resume_value_names_the_accepted_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint.resume: 'maybe' is not 'auto' .* 'none' .* or an existing"):
        check_resume(config(tmp_path, tmp_path / "run", "checkpoint.resume=maybe"))
    assert check_resume(config(tmp_path, tmp_path / "run", f"checkpoint.resume={tmp_path}")) == tmp_path


def test_a_sample_needs_a_tokenizer_that_loads(tmp_path: Path) -> None:
    from disco_ds.trainer.preflight import check_sampling

    data = make_data(tmp_path, np.random.default_rng(3).integers(0, 256, 5_000))  # meta.json names no tokenizer
    check_sampling(config(data, tmp_path / "run"))  # no sample asked: nothing to load
    with pytest.raises(ConfigError, match=r"eval.sample_tokens=4 needs the tokenizer of data.path"):
        check_sampling(config(data, tmp_path / "run", "eval.sample_tokens=4"))
