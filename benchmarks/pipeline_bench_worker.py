"""One rank of ``benchmarks/bench_pipeline_step.py``: the trainer's engine (``build_engine``) at one
layout, timed over a few optimizer steps on synthetic tokens; writes ``<out>/rank_<r>.json``.

    deepspeed --num_gpus 2 benchmarks/pipeline_bench_worker.py '{"preset": "tiny", "pp_size": 2, ...}'
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from disco_ds.distributed import shutdown_and_exit
from disco_ds.models.norm_gpt.configuration_norm_gpt import PRESETS
from disco_ds.trainer.build import build_engine, build_model_config, communication_device, engine_config
from disco_ds.trainer.config import load_config
from disco_ds.trainer.loop import _data_parallel_rank_and_size, _loss, _pipeline_batches
from disco_ds.trainer.scaling import plan_run


def main() -> None:
    spec = json.loads(sys.argv[-1])
    deepspeed.init_distributed()
    world, pp = dist.get_world_size(), spec["pp_size"]
    dp = world // pp
    seq, micro, sequences = spec["seq_len"], spec["micro_batch"], spec["global_sequences"]
    vocab = PRESETS[spec["preset"]]["vocab_size"]
    cfg = load_config("recipes/tiny.yaml", [
        f"model.preset={spec['preset']}", f"model.overrides={{n_layer: {spec['n_layer']}}}", f"data.seq_len={seq}",
        f"train.micro_batch={micro}", f"train.global_batch_tokens={sequences * seq}", "train.zero_stage=1",
        "train.bf16=false", f"train.pp_size={pp}", "optimizer.comm_dtype=bfloat16",
    ])
    plan = plan_run(cfg, dp)
    model_config = build_model_config(cfg, {"vocab_size": vocab})
    device = communication_device()
    engine, optimizer = build_engine(cfg, model_config, plan, engine_config(cfg, plan, model_config), device)
    dp_rank, _ = _data_parallel_rank_and_size(cfg, engine)
    generator = torch.Generator().manual_seed(dp_rank)

    def micro_batches():
        while True:
            rows = torch.randint(0, vocab, (micro, seq + 1), generator=generator).to(device)
            yield rows[:, :-1], rows[:, 1:]

    stream = micro_batches()
    piped = _pipeline_batches(stream, None) if pp > 1 else None

    def step() -> None:
        if piped is not None:
            engine.train_batch(piped)
            return
        for _ in range(plan.accumulation):
            inputs, targets = next(stream)
            engine.backward(_loss(engine, inputs, targets, None))
            engine.step()

    timings = []
    for k in range(spec["warmup"] + spec["steps"]):
        get_accelerator().synchronize()
        start = time.perf_counter()
        step()
        get_accelerator().synchronize()
        if k >= spec["warmup"]:
            timings.append(time.perf_counter() - start)
    params = list(engine.module.parameters())
    masters = getattr(engine.optimizer, "single_partition_of_fp32_groups", [])
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    record = {
        "rank": dist.get_rank(), "stage": engine.stage_id if pp > 1 else 0, "accumulation": plan.accumulation,
        "parameters": sum(p.numel() for p in params),
        "weights_bytes": sum(p.numel() * p.element_size() for p in params),
        # ZeRO-1 keeps every gradient of the rank's parameters whole, in fp32 (train.grad_dtype).
        "gradients_bytes": 4 * sum(p.numel() for p in params),
        "masters_bytes": sum(t.numel() * t.element_size() for t in masters),
        "momentum_bytes": sum(t.numel() * t.element_size() for t in states),
        "step_s": statistics.median(timings),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (Path(spec["out"]) / f"rank_{dist.get_rank()}.json").write_text(json.dumps(record))
    shutdown_and_exit(0)


if __name__ == "__main__":
    main()
