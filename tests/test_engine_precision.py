"""The trainer's engine at every ZeRO stage: one initialisation, fp32 gradients by default.

``tests/engine_worker.py`` builds the engine exactly as ``disco_ds train`` does (2 CPU ranks,
gloo, one process per rank running every job in turn) and records the initial weights, DeepSpeed's
gradient buffers after an accumulation boundary and the dtype of every gradient reduction.

* ZeRO-3 builds the model inside ``deepspeed.zero.Init``, where Hugging Face's ``post_init`` sees
  empty partitions: without the trainer's own init pass the output layer started at an RMS→∞ norm
  of about 7 instead of 1 at d=128 and hidden matrices were not semi-orthogonal. Here the initial
  weights are equal bit for bit at ZeRO 1, 2 and 3.
* With ``bf16`` on, DeepSpeed accumulates and reduces gradients in bf16 unless told otherwise;
  ``train.grad_dtype`` (default float32) tells it, and the engine is inspected to hold fp32
  gradient partitions and to reduce in fp32. ``train.grad_dtype=bfloat16`` still trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from launching import torchrun

WORKER = Path(__file__).parent / "engine_worker.py"
JOBS = [
    {"stage": 1, "bf16": False, "grad_dtype": "float32"},
    {"stage": 3, "bf16": False, "grad_dtype": "float32"},
    *({"stage": s, "bf16": True, "grad_dtype": g} for g in ("float32", "bfloat16") for s in (1, 2, 3)),
]


def name(stage: int, bf16: bool, grad_dtype: str) -> str:
    return f"stage{stage}_{'bf16' if bf16 else 'fp32'}_{grad_dtype}"


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("engines")
    proc = torchrun(WORKER, 2, json.dumps(JOBS), str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {p.stem: torch.load(p, weights_only=False) for p in out.glob("*.pt")}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, different


@pytest.mark.parametrize("bf16", [False, True])
def test_initial_weights_are_identical_at_every_zero_stage(records: dict, bf16: bool) -> None:
    stages = (1, 3) if not bf16 else (1, 2, 3)
    reference = records[name(1, bf16, "float32")]
    for stage in stages[1:]:
        other = records[name(stage, bf16, "float32")]
        assert_same_tensors(reference["initial"], other["initial"])  # fp32 masters
        assert_same_tensors(reference["module"], other["module"])  # the model's own (bf16) weights


def test_zero3_initial_weights_carry_the_scion_init(records: dict) -> None:
    weights = records[name(3, False, "float32")]["initial"]
    head = weights["lm_head.weight"]
    assert math.sqrt(head.shape[1]) * head.norm(dim=1).max().item() == pytest.approx(1.0, rel=1e-5)  # RMS→∞ = 1
    embedding = weights["model.embed_tokens.weight"]
    assert embedding.pow(2).mean(dim=1).sqrt() == pytest.approx(torch.ones(embedding.shape[0]), rel=1e-5)
    hidden = weights["model.layers.0.mlp.w1.weight"]  # [ffn, d]: semi-orthogonal × sqrt(d_out/d_in)
    d_out, d_in = hidden.shape
    singular = torch.linalg.svdvals(hidden.double())
    assert singular == pytest.approx(torch.full_like(singular, math.sqrt(d_out / d_in)), rel=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_model_accumulates_and_reduces_gradients_in_fp32_by_default(records: dict, stage: int) -> None:
    record = records[name(stage, True, "float32")]
    assert record["engine_grad_accum_dtype"] == record["engine_comm_dtype"] == "torch.float32"
    assert record["module"]["lm_head.weight"].dtype == torch.bfloat16
    # ZeRO-1 with a bf16 model and fp32 accumulation is DeepSpeed's BF16_Optimizer (fp32 gradient buffers).
    expected = {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}[stage]
    assert record["wrapper"] == expected
    assert record["grad_buffers"] and set(record["grad_buffers"]) == {"torch.float32"}
    assert record["reduced"] == ["torch.float32"]  # every gradient reduction, at the backend
    assert math.isfinite(record["loss"]) and record["moved"] > 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_gradients_remain_an_option(records: dict, stage: int) -> None:
    record = records[name(stage, True, "bfloat16")]
    assert record["engine_grad_accum_dtype"] == record["engine_comm_dtype"] == "torch.bfloat16"
    assert set(record["grad_buffers"]) == {"torch.bfloat16"}
    assert record["reduced"] == ["torch.bfloat16"]
    assert math.isfinite(record["loss"]) and record["moved"] > 0
    # The same experiment: the same first loss (computed before any update) as with fp32 gradients.
    assert record["loss"] == records[name(stage, True, "float32")]["loss"]
