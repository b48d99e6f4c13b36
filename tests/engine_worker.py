"""One rank of tests/test_engine_precision.py: the trainer's own engine at several ZeRO stages.

    torchrun --nproc_per_node 2 tests/engine_worker.py '[{"stage": 3, "bf16": true, "grad_dtype": "float32"}]' OUT

For every job, in this one process: the run config of ``recipes/tiny.yaml`` with the job's stage,
precision and gradient dtype, the engine built exactly as the trainer builds it
(``disco_ds.trainer.build.engine_config`` + ``build_engine``), then one optimizer step of two accumulated
micro-batches. Rank 0 writes ``OUT/<job name>.pt`` with:

* ``initial``: every parameter's full fp32 master weight before any step
  (``safe_get_full_fp32_param``) and ``module``: the model's own full weights (gathered under ZeRO-3);
* ``wrapper``: DeepSpeed's optimizer class; ``engine_comm_dtype``, ``engine_grad_accum_dtype``;
* ``grad_buffers``: the dtypes of the buffers that hold the accumulated gradient partitions after
  the last micro-batch's backward (what the ZeRO wrapper hands to Scion);
* ``reduced``: the dtypes of every reducing collective (all-reduce, reduce, reduce-scatter) issued
  during the backward passes, recorded at DeepSpeed's communication backend;
* ``loss`` and ``moved``: the loss, and the largest change of a master weight made by the step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

import deepspeed
import deepspeed.comm.comm as ds_comm
from deepspeed.utils import safe_get_full_fp32_param

from disco_ds.trainer.config import load_config
from disco_ds.distributed import shutdown_and_exit
from disco_ds.trainer.scaling import plan_run
from disco_ds.trainer.build import build_engine, build_model_config, communication_device, engine_config

REPO = Path(__file__).resolve().parents[1]
MICRO, SEQ, ACCUMULATION = 2, 32, 2
REDUCING = ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter", "all_reduce_coalesced")


def job_name(job: dict[str, Any]) -> str:
    return f"stage{job['stage']}_{'bf16' if job['bf16'] else 'fp32'}_{job['grad_dtype']}"


class ReductionSpy:
    """Records the dtype of every reducing collective that reaches DeepSpeed's backend while on."""

    def __init__(self) -> None:
        self.on = False
        self.dtypes: set[str] = set()
        backend = ds_comm.cdb
        for name in REDUCING:
            if hasattr(backend, name):
                setattr(backend, name, self._wrap(getattr(backend, name)))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any, **kwargs: Any) -> Any:
            if self.on:
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))
                            for t in a if isinstance(t, torch.Tensor)]
                self.dtypes.update(str(t.dtype) for t in tensors)
            return fn(*args, **kwargs)

        return spy


def full_weights(engine: Any, stage: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fp32 masters, the module's own weights), full, on every rank (collective)."""
    named = list(engine.module.named_parameters())
    masters = {name: safe_get_full_fp32_param(p).detach().cpu().clone() for name, p in named}
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            module = {name: p.detach().cpu().clone() for name, p in named}
    else:
        module = {name: p.detach().cpu().clone() for name, p in named}
    return masters, module


def grad_buffers(optimizer: Any) -> list[str]:
    """dtypes of the wrapper's accumulated gradient partitions (read after the boundary backward)."""
    kind = type(optimizer).__name__
    if kind == "BF16_Optimizer":  # ZeRO-1 with a bf16 model and fp32 accumulation
        return [str(t.dtype) for t in optimizer.fp32_groups_gradients_flat]
    if kind == "DeepSpeedZeroOptimizer":  # ZeRO-1/2
        return [str(t.dtype) for grads in optimizer.averaged_gradients.values() for t in grads]
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        return [str(optimizer.grad_partitions_flat_buffer.dtype)]
    raise AssertionError(f"unexpected ZeRO wrapper {kind}")


def run_job(job: dict[str, Any], out: Path, spy: ReductionSpy, rank: int, world: int) -> None:
    cfg = load_config(REPO / "recipes/tiny.yaml", [
        f"train.zero_stage={job['stage']}", f"train.bf16={str(job['bf16']).lower()}", f"train.grad_dtype={job['grad_dtype']}",
        f"data.seq_len={SEQ}", f"train.micro_batch={MICRO}", f"train.global_batch_tokens={MICRO * SEQ * ACCUMULATION * world}",
        "train.tokens=1e5", "optimizer.lr=0.05", "schedule.warmup=0.0",
    ])
    plan = plan_run(cfg, world)
    assert plan.accumulation == ACCUMULATION, plan
    model_config = build_model_config(cfg, {"vocab_size": 257})
    device = communication_device()
    engine, _ = build_engine(cfg, model_config, plan, engine_config(cfg, plan, model_config), device)
    initial, module = full_weights(engine, job["stage"])

    gen = torch.Generator().manual_seed(1000 + rank)
    spy.dtypes.clear()
    for _ in range(ACCUMULATION):
        ids = torch.randint(0, model_config.vocab_size, (MICRO, SEQ + 1), generator=gen).to(device)
        logits = engine(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        spy.on = True
        engine.backward(loss)
        spy.on = False
        if engine.is_gradient_accumulation_boundary():
            buffers = grad_buffers(engine.optimizer)
        engine.step()
    after, _ = full_weights(engine, job["stage"])
    record = {
        "initial": initial, "module": module, "wrapper": type(engine.optimizer).__name__,
        "engine_comm_dtype": str(engine.communication_data_type), "engine_grad_accum_dtype": str(engine.get_data_types()[1]),
        "grad_buffers": buffers, "reduced": sorted(spy.dtypes), "loss": float(loss),
        "moved": max(float((after[n] - initial[n]).abs().max()) for n in initial),
    }
    if rank == 0:
        torch.save(record, out / f"{job_name(job)}.pt")
    engine.destroy()
    dist.barrier()


def main() -> None:
    jobs = json.loads(sys.argv[1])
    out = Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    spy = ReductionSpy()
    for job in jobs:
        run_job(job, out, spy, dist.get_rank(), dist.get_world_size())
    shutdown_and_exit()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
