"""Measures the peak tensor memory of the tiny recipe's engine for tests/test_memory.py.

    python tests/memory_worker.py RECIPE [key=value ...]

One process (a world of one, CPU accelerator): the trainer's engine is built and takes two
optimizer steps under the PyTorch profiler, whose allocation events carry the CPU allocator's
running total; its peak is the most bytes tensors held at once (weights, gradients, optimizer
state, DeepSpeed's buffers, activations). Prints one JSON line: ``{"peak": bytes}``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from disco_ds.trainer import loop as trainer
    from disco_ds.trainer.build import build_engine, communication_device, engine_config
    from disco_ds.trainer.config import load_config
    from disco_ds.trainer.memory import profiled_peak_bytes, recipe_model
    from disco_ds.trainer.scaling import plan_run

    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer._single_process_defaults()
    deepspeed.init_distributed(dist_backend="gloo")
    plan = plan_run(cfg, 1)
    model_config = recipe_model(cfg)
    ds_config = engine_config(cfg, plan, model_config)
    device = communication_device()
    generator = torch.Generator().manual_seed(0)
    # Everything the run allocates happens inside the profile, so the timeline knows every tensor.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine, _ = build_engine(cfg, model_config, plan, ds_config, device)
        for _ in range(2):
            window = torch.randint(0, model_config.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len + 1), generator=generator)
            loss = trainer._loss(engine, window[:, :-1], window[:, 1:], None)
            engine.backward(loss)
            engine.step()
    print(json.dumps({"peak": profiled_peak_bytes(prof)}))


if __name__ == "__main__":
    main()
