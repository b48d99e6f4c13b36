"""One rank of a NormGPT run built by the trainer's own ``build_engine``; launched by
tests/test_pipeline.py, with ``train.pp_size`` 1 (plain engine) or more (DeepSpeed's pipeline engine).

    torchrun --nproc_per_node W tests/pipeline_worker.py '{"pp_size": 2, "zero_stage": 1, ...}' OUT_DIR

Trains ``steps`` optimizer steps at the plan's peak learning rates (no schedule) on fixed global
batches (:func:`global_batches`: the same tokens whatever the layout; data-parallel rank ``r``
takes micro-batches ``r·accumulation … (r+1)·accumulation − 1`` of each step), then writes:

* ``OUT_DIR/rank_<r>.json``: the step losses as the rank saw them, its per-matrix
  orthogonalisation counters (Hugging Face names), the monitored norms of every step combined over
  the stages (:func:`disco_ds.trainer.loop.combine_stage_norms`) and, with ``"count_syncs"``, the
  host–device syncs of the last pipeline step;
* ``OUT_DIR/portable.pt``: the whole model's fp32 weights and Scion momentum
  (:func:`disco_ds.integrations.reshard.save_portable`, under Hugging Face names at any pp_size).

With ``"load": FILE`` it only loads that portable file into the fresh engine and writes what each
rank raised (``OUT_DIR/rank_<r>.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from disco_ds.distributed import RankCheckError, shutdown_and_exit
from disco_ds.integrations.reshard import load_portable, save_portable
from disco_ds.optim.monitor import NormMonitor
from disco_ds.trainer.build import build_engine, build_model_config, communication_device, engine_config
from disco_ds.trainer.config import load_config
from disco_ds.trainer.loop import _data_parallel_rank_and_size, _loss, _pipeline_batches, combine_stage_norms
from disco_ds.trainer.scaling import plan_run

VOCAB, SEQ = 256, 32


def overrides(spec: dict) -> list[str]:
    """The recipe overrides of a worker spec (also what the test's single-process oracle builds)."""
    return [
        f"data.seq_len={SEQ}", "train.micro_batch=2", f"train.global_batch_tokens={spec['global_sequences'] * SEQ}",
        f"train.zero_stage={spec['zero_stage']}", f"train.pp_size={spec['pp_size']}", f"train.bf16={spec.get('bf16', False)}",
        f"train.grad_dtype={spec.get('grad_dtype', 'float32')}", "train.seed=7",
        f"optimizer.comm_dtype={spec.get('comm_dtype', 'float32')}", f"optimizer.ns_method={spec.get('ns_method', 'svd')}",
        "optimizer.momentum=0.5", "checkpoint.portable=true",
    ]


def global_batches(steps: int, sequences: int) -> list[torch.Tensor]:
    """Every step's global batch of ``sequences`` windows of ``SEQ + 1`` tokens (inputs and targets)."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (sequences, SEQ + 1), generator=gen) for _ in range(steps)]


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config("recipes/tiny.yaml", overrides(spec))
    world = dist.get_world_size()
    plan = plan_run(cfg, world // cfg.train.pp_size)
    model_config = build_model_config(cfg, {"vocab_size": VOCAB})
    device = communication_device()
    engine, optimizer = build_engine(cfg, model_config, plan, engine_config(cfg, plan, model_config), device)
    if "load" in spec:
        # Load a portable file (which may not fit) and report what every rank raised.
        try:
            load_portable(engine, optimizer, spec["load"])
            raised = None
        except RankCheckError as err:
            raised = str(err)
        (out / f"rank_{dist.get_rank()}.json").write_text(json.dumps({"raised": raised}))
        shutdown_and_exit(0)
    dp_rank, _ = _data_parallel_rank_and_size(cfg, engine)
    micro, accumulation = plan.micro_batch, plan.accumulation

    def micro_batches(batch: torch.Tensor):
        for k in range(accumulation):
            rows = batch[(dp_rank * accumulation + k) * micro:(dp_rank * accumulation + k + 1) * micro].to(device)
            yield rows[:, :-1], rows[:, 1:]

    losses, norms = [], []
    optimizer.track_norms = True
    syncs = None
    for step, batch in enumerate(global_batches(spec["steps"], spec["global_sequences"])):
        if cfg.train.pp_size > 1 and step == spec["steps"] - 1 and spec.get("count_syncs"):
            # Host–device syncs of one pipeline step (every .item(), float(t), .tolist() runs
            # aten::_local_scalar_dense, on every device).
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                losses.append(engine.train_batch(_pipeline_batches(micro_batches(batch), None)))
            syncs = sum(e.name == "aten::_local_scalar_dense" for e in prof.events())
        elif cfg.train.pp_size > 1:
            losses.append(engine.train_batch(_pipeline_batches(micro_batches(batch), None)))
        else:
            total = torch.zeros((), device=device)
            for inputs, targets in micro_batches(batch):
                loss = _loss(engine, inputs, targets, None)
                engine.backward(loss)
                engine.step()
                total += loss.detach()
            losses.append(total / accumulation)
        norms.append(optimizer.pop_norms())
    if cfg.train.pp_size > 1:
        norms = combine_stage_norms(norms, engine.grid.get_pipe_parallel_group())
    stacked = torch.stack(losses)
    if cfg.train.pp_size == 1 and world > 1:  # the pipeline engine already averaged over its replicas
        dist.all_reduce(stacked)
        stacked /= world
    save_portable(engine, optimizer, out / "portable.pt")
    record = {"losses": stacked.tolist(), "orthogonalized": dict(optimizer.stats.per_member),
              "norms": [NormMonitor.read(step_norms) for step_norms in norms],
              "stage": engine.stage_id if cfg.train.pp_size > 1 else 0, "wrapper": type(engine.optimizer).__name__,
              "parameters": sum(p.numel() for p in engine.module.parameters()), "syncs": syncs}
    (out / f"rank_{dist.get_rank()}.json").write_text(json.dumps(record))
    shutdown_and_exit(0)


if __name__ == "__main__":
    main()
