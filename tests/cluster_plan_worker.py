"""One rank of tests/test_cluster_plan.py: the trainer's own engine, and the layouts Scion built live.

    torchrun --nproc_per_node W tests/cluster_plan_worker.py '[{"stage": 2, "tp": 1, "overrides": [...]}]' OUT

For every job, in this one process: the tiny recipe with the job's stage, tensor parallelism and
overrides, the engine built exactly as ``disco_ds train`` builds it (``engine_config`` +
``build_engine``), then one optimizer step. Each rank then writes ``OUT/<job>_rank<r>.pt``: every
layout its Scion built, keyed like :class:`disco_ds.trainer.cluster_plan.PlannedLayout` (``(scion
gid, ZeRO-3 sub-group)``), with its shapes, fragments, blocks, sources, ``replicated`` flag, rank and
the exchange plans cached in ``layout.plans``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import deepspeed

from disco_ds.distributed import shutdown_and_exit
from disco_ds.distributed.providers import TensorParallelProvider
from disco_ds.trainer.build import build_engine, build_model_config, communication_device, engine_config
from disco_ds.trainer.config import load_config
from disco_ds.trainer.scaling import data_parallel_size, plan_run

REPO = Path(__file__).resolve().parents[1]


def live_layouts(provider: Any) -> dict[tuple[int, int], Any]:
    """The layouts a provider built, by ``(scion gid, ZeRO-3 sub-group or 0)``; under tensor
    parallelism the lifted layouts of the inner provider's."""
    inner = provider.inner if isinstance(provider, TensorParallelProvider) else provider
    out = {}
    for key, entry in inner.layouts.items():
        layout = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(provider, TensorParallelProvider):
            layout = provider.layouts[id(layout)][0]
        if key[0] == "flat":
            out[(key[1], 0)] = layout
        elif key[0] == "zero3":
            out[(key[1], key[2])] = layout
        else:  # replicated: (gid, members with a gradient)
            out[(key[0], 0)] = layout
    return out


def describe(layout: Any) -> dict[str, Any]:
    return {
        "shapes": [tuple(s) for s in layout.shapes], "fragments": layout.fragments, "blocks": dict(layout.blocks),
        "sources": layout.sources, "replicated": layout.replicated, "rank": layout.rank,
        "plans": {(kind.__name__, steps, gram, bound): (plan.owners, plan.rounds)
                  for (kind, steps, gram, bound, *_), plan in layout.plans.items()},
    }


def run_job(job: dict[str, Any], out: Path, rank: int, world: int) -> None:
    cfg = load_config(REPO / "recipes/tiny.yaml", [f"train.zero_stage={job['stage']}", f"train.tp_size={job['tp']}",
                                                   *job["overrides"]])
    plan = plan_run(cfg, data_parallel_size(cfg, world))
    # The job fixes the vocabulary in model.overrides: no data folder is read.
    model_config = build_model_config(cfg, {"vocab_size": cfg.model.overrides["vocab_size"]})
    device = communication_device()
    engine, optimizer = build_engine(cfg, model_config, plan, engine_config(cfg, plan, model_config), device)
    # Every rank of a TP group reads the same micro-batch.
    gen = torch.Generator().manual_seed(1000 + rank // job["tp"])
    for _ in range(plan.accumulation):
        ids = torch.randint(0, model_config.vocab_size, (plan.micro_batch, cfg.data.seq_len + 1), generator=gen).to(device)
        logits = engine(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    record = {key: describe(layout) for key, layout in live_layouts(optimizer.provider).items()}
    torch.save({"layouts": record, "wrapper": type(engine.optimizer).__name__}, out / f"{job['name']}_rank{rank}.pt")
    engine.destroy()
    dist.barrier()


def main() -> None:
    jobs = json.loads(sys.argv[1])
    out = Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    for job in jobs:
        run_job(job, out, dist.get_rank(), dist.get_world_size())
    shutdown_and_exit()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
